"""Delta codecs: how a weight delta (``{name: float32 array}``) becomes envelope tensors.

A codec is named by a spec string (``parse_codec``); ``str(spec)`` is its canonical text::

    float32                  identity; the tensors go out unchanged under their own names
    float16                  half precision; relative error <= 2^-11 in the normal range
    int8                     per-tensor symmetric scale s = max|x| / 127, round to nearest;
                             |error| <= s / 2
    int8:stochastic          same scale, stochastic rounding: unbiased (E[decoded] = x),
                             |error| < s
    topk:F                   keep the ceil(F * N) entries of largest magnitude (at least one)
                             among all N entries of the whole delta (chosen globally, across
                             tensors, not per tensor), exact; exact zeros are never sent, so
                             an all-zero delta sends no entries
    topk:F+float16           top-k first, then quantise the kept values (per tensor);
    topk:F+int8              with int8 the scale is max|kept| / 127 of that tensor's
    topk:F+int8:stochastic   kept values

Wire layout, for each tensor NAME of the delta (derived names add "/" and one letter, so
they never collide and NAME may itself contain "/")::

    codec          tensors                       dtype / shape
    float32        NAME                          float32, the tensor's shape (today's wire)
    float16        NAME/v                        float16, the tensor's shape
    int8*          NAME/v, NAME/s                int8, the tensor's shape; float32 scalar
    topk:F         NAME/i, NAME/v                uint8 varint gaps; float32 (count,)
    topk:F+float16 NAME/i, NAME/v                uint8; float16 (count,)
    topk:F+int8*   NAME/i, NAME/v, NAME/s        uint8; int8 (count,); float32 scalar

``NAME/i`` holds the kept entries' indices into the flattened (C order) tensor, sorted, as
gaps (the first index, then the differences, each >= 1) in unsigned LEB128 varints: about
one byte per index at 2% density. The small JSON-able ``meta`` that travels in the message
header is ``{"codec": str(spec), "shapes": {NAME: [dims]}}``; the receiver learns the
shapes of top-k tensors only from it.

``decode_delta`` trusts nothing: it checks meta, names, dtypes, shapes, varints, index
ranges, counts and scales against the bounds below and raises nothing but ``CodecError``.
Errors (they extend the tree in ``errors.py``)::

    ProtocolError
    ├── EncodeError (ValueError)   encode_delta: not a float delta, a bad name, a value
    │                              that is not finite or that the codec cannot represent
    └── CodecError                 decode_delta: tensors/meta that cannot be trusted;
                                   ``reason`` is a short code from ``CODEC_REASONS``
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Literal, cast, get_args

import numpy as np

from .errors import EncodeError, ProtocolError

Quantizer = Literal["float32", "float16", "int8", "int8:stochastic"]
QUANTIZERS: tuple[Quantizer, ...] = get_args(Quantizer)
KNOWN_FORMS = (
    "float32, float16, int8, int8:stochastic, topk:F, topk:F+float16, topk:F+int8,"
    " topk:F+int8:stochastic (F a decimal in (0, 1])"
)
MAX_CODEC_TEXT = 64  # characters in a spec string
MAX_NAME = 254  # characters in a delta tensor name, so that NAME + "/x" fits the envelope's 256
MAX_NDIM = 32
MAX_TENSORS = 1024  # tensors in one delta
MAX_ELEMENTS = 16_000_000  # per tensor, as the envelope's Limits.max_elements
MAX_TOTAL_ELEMENTS = 64_000_000  # over the whole delta (256 MB of float32 decoded)
MAX_VARINT_BYTES = 9  # 63 bits: a gap always fits a uint64
INT8_MAX = 127
# A tensor whose max|x| / 127 is below float32's smallest normal number encodes as zeros (a
# subnormal scale would lose the error bound); that is |x| < ~1.5e-36, far below any delta.
INT8_FLUSH = INT8_MAX * float(np.finfo(np.float32).tiny)

CODEC_REASONS = frozenset(
    {
        "bad_meta",  # meta is not {"codec", "shapes"} with shapes {name: [dims]}
        "bad_codec",  # the codec string is not a known form
        "too_large",  # a tensor or the whole delta over the element bounds
        "missing_tensor",  # a tensor the codec and shapes call for is absent
        "unexpected_tensor",  # a tensor the codec and shapes do not call for
        "bad_dtype",  # not an ndarray, or the wrong dtype for its role
        "bad_shape",  # the wrong shape for its role
        "bad_scale",  # an int8 scale that is not finite and >= 0
        "bad_value",  # an int8 value of -128 (the symmetric range is [-127, 127])
        "bad_varint",  # index bytes end mid-varint, or a varint over 9 bytes
        "bad_index",  # an index out of range, or not strictly increasing
        "count_mismatch",  # number of indices differs from number of values
        "too_many_entries",  # more top-k entries than ceil(F * N)
        "not_finite",  # a decoded value is NaN or infinite
    }
)

_FRACTION = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SPEC = re.compile(
    rf"(?P<dense>float32|float16|int8|int8:stochastic)"
    rf"|topk:(?P<fraction>{_FRACTION})(?:\+(?P<quantizer>float16|int8|int8:stochastic))?"
)
_INT8 = np.dtype(np.int8)


class CodecError(ProtocolError):
    """Encoded tensors or meta that cannot be trusted. ``reason`` is one of ``CODEC_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in CODEC_REASONS:
            raise ValueError(f"unknown codec reason {reason!r}")
        self.reason = reason
        super().__init__(f"{reason}: {message}")


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec: an optional top-k ``fraction`` in (0, 1], then a ``quantizer``."""

    quantizer: Quantizer = "float32"
    fraction: float | None = None

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {self.quantizer!r}; known: {KNOWN_FORMS}")
        f = self.fraction
        if f is not None and (
            not isinstance(f, float) or not math.isfinite(f) or not 0.0 < f <= 1.0
        ):
            raise ValueError(f"top-k fraction must be a float in (0, 1], got {f!r}")

    def __str__(self) -> str:
        if self.fraction is None:
            return self.quantizer
        tail = "" if self.quantizer == "float32" else f"+{self.quantizer}"
        return f"topk:{self.fraction!r}{tail}"

    def with_min_entries(self, size: int, minimum: int) -> CodecSpec:
        """This codec with its top-k fraction raised so that at least ``minimum`` of ``size``
        entries are kept (rounded up at four decimals): what a device uses, and what the
        aggregator expects, for a round that announces this codec and minimum."""
        if self.fraction is None or not minimum or not size or self.topk_count(size) >= minimum:
            return self
        return replace(self, fraction=min(1.0, math.ceil(minimum / size * 10_000) / 10_000))

    def topk_count(self, size: int) -> int:
        """Entries top-k keeps out of ``size``: max(1, ceil(F * size)), capped at ``size``.

        F is taken as the decimal it prints as, so topk:0.02 of 50,000 is exactly 1,000.
        """
        if self.fraction is None:
            return size
        return min(size, max(1, math.ceil(Fraction(repr(self.fraction)) * size)))


def parse_codec(text: str) -> CodecSpec:
    """Parse a codec spec string; raise a one-line ValueError listing the known forms."""
    match = _SPEC.fullmatch(text) if isinstance(text, str) and len(text) <= MAX_CODEC_TEXT else None
    if match is None:
        raise ValueError(f"unknown codec {text!r}; known forms: {KNOWN_FORMS}")
    if match["dense"] is not None:
        return CodecSpec(quantizer=cast(Quantizer, match["dense"]))
    fraction = float(match["fraction"])
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top-k fraction {match['fraction']} is not in (0, 1]: {KNOWN_FORMS}")
    return CodecSpec(quantizer=cast(Quantizer, match["quantizer"] or "float32"), fraction=fraction)


@dataclass(frozen=True)
class Encoded:
    """An encoded delta.

    ``tensors`` go into the envelope; ``meta`` ({"codec", "shapes"}) into the message header;
    ``decoded`` is exactly what ``decode_delta(tensors, meta)`` returns on the receiver (float32,
    bit for bit), so the sender's error-feedback residual is ``delta - decoded``. With the
    float32 codec, ``tensors`` and ``decoded`` may share memory with the input delta.
    """

    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]
    decoded: dict[str, np.ndarray]


def encoded_nbytes(encoded: Encoded) -> int:
    """Bytes of tensor data on the wire (the envelope adds its header on top)."""
    return sum(int(t.nbytes) for t in encoded.tensors.values())


# -- encode ---------------------------------------------------------------------------------


def encode_delta(
    delta: Mapping[str, np.ndarray], spec: CodecSpec, rng: np.random.Generator | None = None
) -> Encoded:
    """Encode a delta of float tensors (cast to float32) with ``spec``.

    ``rng`` drives stochastic rounding; without one a fresh OS-seeded generator is used.
    Raises EncodeError for bad names, non-float or non-finite values, and values the codec
    cannot represent (float16 beyond +-65504).
    """
    arrays = _check_delta(delta)
    if spec.quantizer == "int8:stochastic" and rng is None:
        rng = np.random.default_rng()
    tensors: dict[str, np.ndarray] = {}
    decoded: dict[str, np.ndarray] = {}
    if spec.fraction is None:
        for name, x in arrays.items():
            if spec.quantizer == "float32":
                tensors[name] = decoded[name] = x
                continue
            parts, decoded[name] = _quantize(x, spec.quantizer, rng)
            tensors.update({f"{name}/{suffix}": part for suffix, part in parts.items()})
    else:
        for name, (idx, parts, values) in _topk(arrays, spec, rng).items():
            tensors[f"{name}/i"] = varint_encode(np.diff(idx, prepend=0))
            tensors.update({f"{name}/{suffix}": part for suffix, part in parts.items()})
            dense = np.zeros(arrays[name].size, np.float32)
            dense[idx] = values
            decoded[name] = dense.reshape(arrays[name].shape)
    for name, value in decoded.items():
        if not np.isfinite(value).all():
            raise EncodeError(f"tensor {name!r}: values out of range for codec {spec}")
    meta = {"codec": str(spec), "shapes": {name: list(x.shape) for name, x in arrays.items()}}
    return Encoded(tensors=tensors, meta=meta, decoded=decoded)


def _check_delta(delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(delta, Mapping):
        raise EncodeError(f"a delta is a mapping of name to array, not {type(delta).__name__}")
    if len(delta) > MAX_TENSORS:
        raise EncodeError(f"{len(delta)} tensors, max {MAX_TENSORS}")
    arrays: dict[str, np.ndarray] = {}
    total = 0
    for name, value in delta.items():
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
            raise EncodeError(f"tensor name must be 1-{MAX_NAME} characters: {name!r}")
        array = np.asarray(value)
        if array.dtype.kind != "f":
            raise EncodeError(f"tensor {name!r}: dtype {array.dtype} is not a float type")
        if array.ndim > MAX_NDIM or array.size > MAX_ELEMENTS:
            raise EncodeError(f"tensor {name!r}: shape {array.shape} over the codec's bounds")
        with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf: refused below
            x = np.asarray(array, dtype=np.float32, order="C")  # keeps 0-d (ascontiguousarray not)
        if not np.isfinite(x).all():
            raise EncodeError(f"tensor {name!r}: values are not all finite (as float32)")
        total += x.size
        arrays[name] = x
    if total > MAX_TOTAL_ELEMENTS:
        raise EncodeError(f"delta of {total} elements, max {MAX_TOTAL_ELEMENTS}")
    return arrays


def _topk(
    arrays: dict[str, np.ndarray], spec: CodecSpec, rng: np.random.Generator | None
) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]]:
    """Per tensor: kept flat indices (sorted), quantised parts, and their decoded values."""
    flats = [x.ravel() for x in arrays.values()]
    offsets = np.cumsum([0] + [f.size for f in flats])
    size = int(offsets[-1])
    k = spec.topk_count(size)
    selected = np.empty(0, np.int64)
    if size:
        magnitude = np.abs(np.concatenate(flats))
        keep = magnitude > 0
        if k < size:  # the k largest, ties broken arbitrarily; a mask sorts them in O(N)
            top = np.zeros(size, bool)
            top[np.argpartition(magnitude, size - k)[size - k :]] = True
            keep &= top
        selected = np.flatnonzero(keep)
    cuts = np.searchsorted(selected, offsets)
    out = {}
    for j, (name, flat) in enumerate(zip(arrays, flats, strict=True)):
        idx = selected[cuts[j] : cuts[j + 1]] - offsets[j]
        parts, values = _quantize(flat[idx], spec.quantizer, rng)
        out[name] = (idx, parts, values)
    return out


def _quantize(
    x: np.ndarray, quantizer: Quantizer, rng: np.random.Generator | None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Quantise float32 values; return the parts by suffix ("v", "s") and the decoded values."""
    if quantizer == "float32":
        return {"v": x}, x
    if quantizer == "float16":
        with np.errstate(over="ignore"):  # beyond +-65504 becomes inf: encode_delta refuses it
            v = x.astype(np.float16)
        return {"v": v}, v.astype(np.float32)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    scale = np.float32(peak / INT8_MAX) if peak >= INT8_FLUSH else np.float32(0.0)
    if scale == 0:
        q = np.zeros(x.shape, np.int8)
    else:
        y = np.clip(x.astype(np.float64).reshape(-1) / float(scale), -INT8_MAX, INT8_MAX)
        if quantizer == "int8:stochastic":
            assert rng is not None
            y = np.floor(y + rng.random(y.shape))  # y + u < 128 since u < 1: stays in range
        else:
            y = np.rint(y)
        q = y.astype(np.int8).reshape(x.shape)  # via 1-D: ufuncs turn 0-d arrays into scalars
    s = np.array(scale, dtype=np.float32)
    return {"v": q, "s": s}, _dequantize(q, s)


def _dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    # Each product is exact in float64, so float32 arithmetic (one correctly rounded multiply)
    # gives the same bits on both ends.
    out = q.astype(np.float32)
    with np.errstate(over="ignore"):  # a hostile scale overflows to inf: rejected as not_finite
        out *= np.float32(scale)  # in place: keeps a 0-d array an array
    return out


# -- varints --------------------------------------------------------------------------------


def varint_encode(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 of non-negative integers (< 2^63), vectorised: one pass per byte."""
    v = np.asarray(values)
    if v.size and (v.dtype.kind not in "iu" or v.min() < 0):
        raise EncodeError("varints encode non-negative integers only")
    v = v.astype(np.uint64).ravel()
    if not v.size:
        return np.empty(0, np.uint8)
    if v.max() < 0x80:  # one byte each (most top-k gaps): the value is the byte
        return v.astype(np.uint8)
    nbytes = np.ones(v.size, np.int64)
    for j in range(1, MAX_VARINT_BYTES + 1):
        longer = v >= np.uint64(1 << (7 * j))
        if not longer.any():
            break
        nbytes += longer
    if nbytes.max() > MAX_VARINT_BYTES:
        raise EncodeError(f"a varint over {MAX_VARINT_BYTES} bytes")
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.empty(int(ends[-1]), np.uint8)
    for j in range(int(nbytes.max())):
        at = np.flatnonzero(nbytes > j) if j else np.arange(v.size)
        low = ((v[at] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        out[starts[at] + j] = low | np.where(nbytes[at] > j + 1, np.uint8(0x80), np.uint8(0))
    return out


def varint_decode(data: np.ndarray) -> np.ndarray:
    """Decode unsigned LEB128 bytes (uint8, 1-D) into uint64; CodecError("bad_varint")."""
    b = np.asarray(data, dtype=np.uint8).ravel()
    if not b.size:
        return np.empty(0, np.uint64)
    last = (b & 0x80) == 0
    if not last[-1]:
        raise CodecError("bad_varint", "index bytes end in the middle of a varint")
    if last.all():  # one byte each: the byte is the value
        return b.astype(np.uint64)
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > MAX_VARINT_BYTES:
        raise CodecError("bad_varint", f"a varint over {MAX_VARINT_BYTES} bytes")
    values = (b[starts] & 0x7F).astype(np.uint64)
    for j in range(1, int(lengths.max())):
        at = np.flatnonzero(lengths > j)
        values[at] |= (b[starts[at] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return values


# -- decode ---------------------------------------------------------------------------------


def decode_delta(
    tensors: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    *,
    max_elements: int = MAX_ELEMENTS,
    max_total: int = MAX_TOTAL_ELEMENTS,
) -> dict[str, np.ndarray]:
    """Reconstruct the dense float32 delta (in meta's order); raise only CodecError.

    ``max_elements`` bounds each tensor and ``max_total`` the whole delta: the shapes of
    top-k tensors come from meta alone, so these bounds are what keeps a hostile meta from
    allocating without limit.
    """
    spec, shapes = _check_meta(meta, max_elements, max_total)
    if not isinstance(tensors, Mapping):
        raise CodecError("bad_meta", f"tensors must be a mapping, not {type(tensors).__name__}")
    expected = {
        (name if suffix == "" else f"{name}/{suffix}")
        for name in shapes
        for suffix in _suffixes(spec)
    }
    present = set(tensors)
    if expected - present:
        raise CodecError("missing_tensor", f"missing {sorted(expected - present)[:5]}")
    if present - expected:
        extra = sorted(map(repr, present - expected))[:5]
        raise CodecError("unexpected_tensor", f"not called for by {spec}: {', '.join(extra)}")
    out: dict[str, np.ndarray] = {}
    entries = 0
    for name, shape in shapes.items():
        if spec.fraction is None:
            out[name] = _decode_dense(tensors, name, shape, spec.quantizer)
        else:
            out[name], count = _decode_topk(tensors, name, shape, spec.quantizer)
            entries += count
    if spec.fraction is not None:
        allowed = spec.topk_count(sum(math.prod(s) for s in shapes.values()))
        if entries > allowed:
            raise CodecError("too_many_entries", f"{entries} entries, {spec} allows {allowed}")
    for name, value in out.items():
        if not np.isfinite(value).all():
            raise CodecError("not_finite", f"tensor {name!r} decodes to NaN or infinity")
    return out


def _suffixes(spec: CodecSpec) -> tuple[str, ...]:
    quantized = ("v", "s") if spec.quantizer.startswith("int8") else ("v",)
    if spec.fraction is not None:
        return ("i", *quantized)
    return ("",) if spec.quantizer == "float32" else quantized


def _check_meta(
    meta: Mapping[str, Any], max_elements: int, max_total: int
) -> tuple[CodecSpec, dict[str, tuple[int, ...]]]:
    if not isinstance(meta, Mapping) or set(meta) != {"codec", "shapes"}:
        raise CodecError("bad_meta", "meta must be a mapping with keys 'codec' and 'shapes'")
    try:
        spec = parse_codec(meta["codec"])
    except ValueError as exc:
        raise CodecError("bad_codec", str(exc)) from exc
    raw = meta["shapes"]
    if not isinstance(raw, Mapping) or len(raw) > MAX_TENSORS:
        raise CodecError("bad_meta", f"shapes must be a mapping of at most {MAX_TENSORS} tensors")
    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for name, dims in raw.items():
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
            raise CodecError("bad_meta", f"tensor name must be 1-{MAX_NAME} characters")
        if (
            not isinstance(dims, (list, tuple))
            or len(dims) > MAX_NDIM
            or not all(_is_count(d) and 0 <= d <= max_elements for d in dims)
        ):
            raise CodecError(
                "bad_meta",
                f"shape of {name!r} must be at most {MAX_NDIM} ints in [0, {max_elements}]",
            )
        shape = tuple(int(d) for d in dims)
        size = math.prod(shape)
        if size > max_elements:
            raise CodecError("too_large", f"tensor {name!r}: {size} elements, max {max_elements}")
        total += size
        shapes[name] = shape
    if total > max_total:
        raise CodecError("too_large", f"delta of {total} elements, max {max_total}")
    return spec, shapes


def _is_count(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _array(
    tensors: Mapping[str, np.ndarray],
    key: str,
    kind: str,
    itemsize: int,
    shape: tuple[int, ...] | None,
) -> np.ndarray:
    """The tensor ``key``, checked for dtype (kind and size, either byte order) and shape
    (``None``: any 1-D shape)."""
    value = tensors[key]
    if not isinstance(value, np.ndarray):
        raise CodecError("bad_dtype", f"{key!r} is a {type(value).__name__}, not an array")
    if value.dtype.kind != kind or value.dtype.itemsize != itemsize:
        raise CodecError("bad_dtype", f"{key!r} has dtype {value.dtype}, want {kind}{itemsize}")
    if (value.ndim != 1) if shape is None else (value.shape != shape):
        raise CodecError("bad_shape", f"{key!r} has shape {value.shape}, want {shape}")
    return value


def _values(
    tensors: Mapping[str, np.ndarray], name: str, quantizer: Quantizer, shape: tuple[int, ...]
) -> np.ndarray:
    """Dequantised float32 values of ``name/v`` (and ``name/s``) with the given shape."""
    key = f"{name}/v"
    if quantizer == "float32":
        return _array(tensors, key, "f", 4, shape).astype(np.float32)
    if quantizer == "float16":
        return _array(tensors, key, "f", 2, shape).astype(np.float32)
    q = _array(tensors, key, "i", 1, shape).astype(np.int8)
    scale = _array(tensors, f"{name}/s", "f", 4, ()).astype(np.float32)
    if not np.isfinite(scale) or scale < 0:
        raise CodecError("bad_scale", f"{name}/s is {float(scale)!r}, want finite and >= 0")
    if q.size and q.min() < -INT8_MAX:
        raise CodecError("bad_value", f"{key!r} holds -128, outside the symmetric int8 range")
    return _dequantize(q, scale)


def _decode_dense(
    tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], quantizer: Quantizer
) -> np.ndarray:
    if quantizer == "float32":
        return _array(tensors, name, "f", 4, shape).astype(np.float32)  # a copy, native order
    return _values(tensors, name, quantizer, shape)


def _decode_topk(
    tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], quantizer: Quantizer
) -> tuple[np.ndarray, int]:
    gaps = varint_decode(_array(tensors, f"{name}/i", "u", 1, None))
    count = gaps.size
    values_raw = tensors[f"{name}/v"]
    if isinstance(values_raw, np.ndarray) and values_raw.shape != (count,):
        raise CodecError(
            "count_mismatch", f"{name}: {count} indices, values of shape {values_raw.shape}"
        )
    values = _values(tensors, name, quantizer, (count,))
    size = math.prod(shape)
    dense = np.zeros(size, np.float32)
    if count:
        if gaps.max() >= size:
            raise CodecError("bad_index", f"{name}: an index beyond {size} elements")
        if count > 1 and not gaps[1:].all():
            raise CodecError("bad_index", f"{name}: indices repeat (a gap of 0)")
        idx = np.cumsum(gaps)  # each gap < size <= max_elements and count <= bytes: no overflow
        if idx[-1] >= size:
            raise CodecError("bad_index", f"{name}: index {int(idx[-1])} beyond {size} elements")
        dense[idx.astype(np.int64)] = values
    return dense.reshape(shape), count
