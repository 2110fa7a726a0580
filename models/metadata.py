"""Read and write what a ``.tflite`` flatbuffer says about itself: metadata and op codes.

Uses the TFLite schema bindings that ship with ai-edge-litert (``flatbuffers`` is
one of its dependencies), so devices need nothing extra to inspect a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import flatbuffers

try:  # the schema bindings ship with ai-edge-litert; TensorFlow has the same module
    from ai_edge_litert import schema_py_generated as schema
except ImportError:  # pragma: no cover - exercised only where LiteRT is absent
    from tensorflow.lite.python import schema_py_generated as schema  # type: ignore[no-redef]

_FILE_IDENTIFIER = b"TFL3"
_BUILTIN_NAMES = {
    value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")
}


class ModelFileError(ValueError):
    """The bytes are not a TFLite flatbuffer."""


@dataclass(frozen=True)
class OpCode:
    builtin: str  # e.g. "FULLY_CONNECTED", or "CUSTOM"
    custom_code: str | None  # set for custom and Flex ops, e.g. "FlexReluGrad"

    @property
    def is_custom(self) -> bool:
        return self.builtin == "CUSTOM" or self.custom_code is not None


def _model(data: bytes):  # type: ignore[no-untyped-def]
    if len(data) < 8 or data[4:8] != _FILE_IDENTIFIER:
        raise ModelFileError("not a TFLite model (missing TFL3 identifier)")
    return schema.Model.GetRootAs(data, 0)


def op_codes(data: bytes) -> list[OpCode]:
    """Every operator code the model uses."""
    model = _model(data)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        # Builtin codes above 127 live in BuiltinCode; DeprecatedBuiltinCode holds the rest.
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        custom = oc.CustomCode()
        codes.append(
            OpCode(_BUILTIN_NAMES.get(code, str(code)), custom.decode() if custom else None)
        )
    return codes


def read_metadata(data: bytes, key: str) -> bytes | None:
    model = _model(data)
    for i in range(model.MetadataLength()):
        meta = model.Metadata(i)
        if meta.Name() is not None and meta.Name().decode() == key:
            buf = model.Buffers(meta.Buffer())
            return bytes(buf.DataAsNumpy().tobytes()) if buf.DataLength() else b""
    return None


def add_metadata(data: bytes, key: str, value: bytes) -> bytes:
    """Return a copy of the model with ``key`` set to ``value`` (replacing an older entry)."""
    model = schema.ModelT.InitFromObj(_model(data))
    buffer = schema.BufferT()
    buffer.data = list(value)
    model.buffers.append(buffer)
    meta = schema.MetadataT()
    meta.name = key
    meta.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != key.encode()] + [meta]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())
