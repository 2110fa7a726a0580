"""The envelope: one binary format for every payload on the wire (version 1)::

    offset  size  field
    0       3     magic b"FDG"
    3       1     envelope version, 1
    4       4     header length N, big-endian uint32
    8       N     header, UTF-8 JSON: {"msg": {...}, "tensors": [{"name", "dtype", "shape"}, ...]}
    8+N     ...   tensor bytes in header order, little-endian, C order, no padding

``decode`` checks every declared size against ``Limits`` before it slices or allocates, and
raises nothing but ``DecodeError`` on any bytes. The message is validated strictly (no "5"
for 5). Decoded tensors are read-only, zero-copy views into the payload: ``.copy()`` one to
modify it.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import DecodeError, EncodeError
from .messages import MESSAGE_TYPES, Header

MAGIC = b"FDG"
VERSION = 1
DTYPES: Mapping[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "int8", "uint8", "int32")
}
MAX_NDIM = 32
MAX_NAME = 256  # characters in a tensor name

# Over MQTT: an update's ``UpdateHeader.codec`` and the one uint8 tensor that carries an
# update or model payload in the envelope (the global model under HE is that tensor alone;
# fedge.protocol.he reads and writes it).
HE_TENSOR = "ckks"

_PREAMBLE = struct.Struct(">3sBI")
_HEADER = TypeAdapter(Header)


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts. Sizes in bytes; ``max_elements`` is per tensor."""

    max_payload: int = 16 * 1024 * 1024
    max_header: int = 64 * 1024
    max_tensors: int = 1024  # top-k + int8 sends 3 tensors per weight
    max_elements: int = 16_000_000


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Decoded:
    """A decoded payload. ``tensors`` keep the header's order and are read-only views."""

    msg: Header
    tensors: dict[str, np.ndarray]


class RejectCounter(Counter):  # type: ignore[type-arg]
    """Counts rejected payloads by ``DecodeError.reason``, for metrics."""

    def count(self, reason: str | DecodeError) -> int:
        key = reason.reason if isinstance(reason, DecodeError) else reason
        self[key] += 1
        return self[key]


def encode(msg: BaseModel, tensors: Mapping[str, np.ndarray] | None = None) -> bytes:
    """Encode a message and its tensors. Arrays keep their dtype, which must be in DTYPES."""
    if not isinstance(msg, MESSAGE_TYPES):
        raise EncodeError(f"not a wire message: {type(msg).__name__}")
    specs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in (tensors or {}).items():
        array = np.asarray(value)
        dtype = DTYPES.get(array.dtype.name)
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
            raise EncodeError(f"tensor name must be 1-{MAX_NAME} characters: {name!r}")
        if dtype is None:
            raise EncodeError(f"tensor {name!r}: dtype {array.dtype} not in {sorted(DTYPES)}")
        if array.ndim > MAX_NDIM:
            raise EncodeError(f"tensor {name!r}: {array.ndim} dimensions, max {MAX_NDIM}")
        specs.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape)})
        blobs.append(array.astype(dtype, copy=False).tobytes(order="C"))
    try:
        header = json.dumps(
            {"msg": msg.model_dump(mode="json"), "tensors": specs},
            separators=(",", ":"),
            allow_nan=False,
        ).encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise EncodeError(f"header is not encodable as JSON: {exc}") from exc
    if len(header) >= 2**32:
        raise EncodeError(f"header of {len(header)} bytes does not fit the length field")
    return b"".join([_PREAMBLE.pack(MAGIC, VERSION, len(header)), header, *blobs])


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Decoded:
    """Decode and validate a payload; raise DecodeError with a ``reason`` on anything else."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)  # views must not alias a buffer someone can still change
    size = len(data)
    if size > limits.max_payload:
        raise DecodeError("too_large", f"payload of {size} bytes, max {limits.max_payload}")
    if size < _PREAMBLE.size:
        raise DecodeError("too_short", f"payload of {size} bytes, need {_PREAMBLE.size}")
    magic, version, header_len = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError("bad_magic", f"starts with {magic!r}, want {MAGIC!r}")
    if version != VERSION:
        raise DecodeError("bad_version", f"envelope version {version}, want {VERSION}")
    if header_len > limits.max_header:
        raise DecodeError(
            "header_too_large", f"header of {header_len} bytes, max {limits.max_header}"
        )
    start = _PREAMBLE.size + header_len
    if start > size:
        raise DecodeError("truncated", f"header of {header_len} bytes, payload of {size}")
    msg_obj, spec_objs = _split_header(parse_json(data[_PREAMBLE.size : start]))
    specs = _check_specs(spec_objs, limits)
    msg = _validate_msg(msg_obj)
    needed = start + sum(count * dtype.itemsize for _, dtype, _, count in specs)
    if needed > size:
        raise DecodeError("truncated", f"tensors need {needed} bytes, payload has {size}")
    if needed < size:
        raise DecodeError("trailing_bytes", f"{size - needed} bytes after the last tensor")
    tensors: dict[str, np.ndarray] = {}
    offset = start
    for name, dtype, shape, count in specs:
        view = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        tensors[name] = view.reshape(shape)
        offset += count * dtype.itemsize
    return Decoded(msg=msg, tensors=tensors)


def is_encrypted(tensors: Mapping[str, np.ndarray]) -> bool:
    """Whether an envelope's tensors are an HE payload (a plain model has float tensors)."""
    return set(tensors) == {HE_TENSOR} and np.asarray(tensors[HE_TENSOR]).dtype == np.uint8


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return obj


def parse_json(raw: bytes, what: str = "header") -> Any:
    """Strict JSON: UTF-8, no NaN or Infinity, no key twice; else DecodeError."""
    try:
        return json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise DecodeError("bad_header_json", f"{what} is not JSON: {exc}") from exc


def _split_header(header: Any) -> tuple[Any, list[Any]]:
    if not isinstance(header, dict) or set(header) != {"msg", "tensors"}:
        raise DecodeError("schema", "header must be an object with keys 'msg' and 'tensors'")
    if not isinstance(header["tensors"], list):
        raise DecodeError("schema", "'tensors' must be a list")
    return header["msg"], header["tensors"]


def _check_specs(
    spec_objs: list[Any], limits: Limits
) -> list[tuple[str, np.dtype[Any], tuple[int, ...], int]]:
    if len(spec_objs) > limits.max_tensors:
        raise DecodeError("too_many_tensors", f"{len(spec_objs)} tensors, max {limits.max_tensors}")
    specs = []
    seen: set[str] = set()
    for spec in spec_objs:
        if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
            raise DecodeError("schema", "a tensor must be an object with name, dtype, shape")
        name, dtype_name, shape = spec["name"], spec["dtype"], spec["shape"]
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
            raise DecodeError("schema", f"tensor name must be 1-{MAX_NAME} characters")
        if name in seen:
            raise DecodeError("duplicate_tensor", f"tensor {name!r} appears twice")
        seen.add(name)
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise DecodeError("bad_dtype", f"tensor {name!r}: dtype not in {sorted(DTYPES)}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(type(d) is int and 0 <= d <= limits.max_elements for d in shape)
        ):
            raise DecodeError(
                "bad_shape",
                f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} ints"
                f" in [0, {limits.max_elements}]",
            )
        count = math.prod(shape)
        if count > limits.max_elements:
            raise DecodeError(
                "too_large", f"tensor {name!r}: {count} elements, max {limits.max_elements}"
            )
        specs.append((name, dtype, tuple(shape), count))
    return specs


def _validate_msg(msg_obj: Any) -> Header:
    try:
        return _HEADER.validate_json(json.dumps(msg_obj), strict=True)
    except (ValidationError, RecursionError) as exc:
        raise DecodeError("schema", f"message fails validation: {exc}") from exc
