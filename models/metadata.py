"""Read and write what a ``.tflite`` flatbuffer says about itself: metadata and op codes.

Reading goes through :mod:`fedge.models.tflite_schema` (pure Python over ``flatbuffers``),
so every device can inspect a model and load its embedded spec, with or without LiteRT.
Writing (:func:`add_metadata`) happens at authoring time and borrows the TFLite schema
object API from ai-edge-litert or TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import flatbuffers

from .tflite_schema import FILE_IDENTIFIER, ModelReader, builtin_name


@dataclass(frozen=True)
class OpCode:
    builtin: str  # e.g. "FULLY_CONNECTED", or "CUSTOM"
    custom_code: str | None  # set for custom and Flex ops, e.g. "FlexReluGrad"

    @property
    def is_custom(self) -> bool:
        return self.builtin == "CUSTOM" or self.custom_code is not None


def op_codes(data: bytes) -> list[OpCode]:
    """Every operator code the model uses."""
    return [
        OpCode(builtin_name(code), custom) for code, custom in ModelReader(data).operator_codes()
    ]


def read_metadata(data: bytes, key: str) -> bytes | None:
    """The value stored under ``key`` in the model's metadata, or None if there is none."""
    model = ModelReader(data)
    for name, buffer in model.metadata():
        if name == key:
            return model.buffer(buffer)
    return None


def _schema_object_api() -> ModuleType:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        try:
            from tensorflow.lite.python import schema_py_generated as schema  # type: ignore[no-redef]
        except ImportError as exc:
            raise ImportError(
                "writing model metadata needs ai-edge-litert or TensorFlow:"
                " pip install 'fedge[build]'"
            ) from exc
    return schema


def add_metadata(data: bytes, key: str, value: bytes) -> bytes:
    """Return a copy of the model with ``key`` set to ``value`` (replacing an older entry)."""
    ModelReader(data)  # a clear error for bytes that are not a model
    schema = _schema_object_api()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    buffer = schema.BufferT()
    buffer.data = list(value)
    model.buffers.append(buffer)
    meta = schema.MetadataT()
    meta.name = key
    meta.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != key.encode()] + [meta]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())
