"""The envelope: exact round trips, and nothing but DecodeError on any bytes."""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
from fedge.protocol import (
    DecodeError,
    EncodeError,
    GlobalModelHeader,
    Limits,
    RejectCounter,
    RoundAnnouncement,
    SkipNotice,
    Status,
    TrainingConfig,
    UpdateHeader,
    decode,
    encode,
)
from fedge.protocol.errors import DECODE_REASONS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

pytestmark = pytest.mark.unit

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPE_NAMES = ["float32", "float16", "int8", "uint8", "int32"]

# -- strategies -----------------------------------------------------------------------------

ids = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=2**32 - 1)
configs = st.builds(
    TrainingConfig,
    epochs=st.integers(1, 1000),
    batch_size=st.integers(1, 65536),
    lr=st.floats(min_value=0, max_value=10, exclude_min=True),
)
messages = st.one_of(
    st.builds(
        RoundAnnouncement,
        fleet=ids,
        round_id=st.integers(1, 2**32 - 1),
        model_version=counts,
        deadline=finite,
        selected=st.lists(ids, max_size=5).map(tuple),
        config=configs,
    ),
    st.builds(GlobalModelHeader, fleet=ids, model_version=counts, round_id=counts),
    st.builds(
        UpdateHeader,
        device_id=ids,
        round_id=st.integers(1, 2**32 - 1),
        update_id=ids,
        base_version=counts,
        num_samples=st.integers(1, 2**32 - 1),
        train_loss=st.none() | finite,
    ),
    st.builds(
        SkipNotice,
        device_id=ids,
        round_id=st.integers(1, 2**32 - 1),
        update_id=ids,
        reason=st.text(max_size=64),
    ),
    st.builds(
        Status,
        device_id=ids,
        state=st.sampled_from(["online", "offline", "training", "idle"]),
        timestamp=finite,
    ),
)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Any bit pattern (NaN payloads, -0.0, subnormals) in any allowed dtype, either byte order."""
    dtype = np.dtype(draw(st.sampled_from(DTYPE_NAMES))).newbyteorder(draw(st.sampled_from("<>")))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    raw = draw(
        st.binary(
            min_size=math.prod(shape) * dtype.itemsize, max_size=math.prod(shape) * dtype.itemsize
        )
    )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if draw(st.booleans()) and array.ndim >= 2:
        array = array.T  # not C-contiguous
    return array


tensor_maps = st.dictionaries(st.text(min_size=1, max_size=12), arrays(), max_size=4)


def little_endian_bytes(array: np.ndarray) -> bytes:
    return array.astype(array.dtype.newbyteorder("<")).tobytes(order="C")


def raw_payload(
    header: Any,
    body: bytes = b"",
    *,
    version: int = 1,
    magic: bytes = b"FDG",
    header_len: int | None = None,
) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(text) if header_len is None else header_len
    return magic + bytes([version]) + struct.pack(">I", size) + text + body


STATUS = {"kind": "status", "device_id": "d", "state": "online", "timestamp": 1.0}
VALID = encode(
    Status(device_id="d", state="online", timestamp=1.0),
    {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int8)},
)


def rejects(data: bytes, limits: Limits | None = None) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decode(data) if limits is None else decode(data, limits)
    assert caught.value.reason in DECODE_REASONS
    return caught.value


# -- round trips ----------------------------------------------------------------------------


@FAST
@given(msg=messages, tensors=tensor_maps)
def test_round_trip_is_exact(msg: BaseModel, tensors: dict[str, np.ndarray]) -> None:
    data = encode(msg, tensors)
    decoded = decode(data)
    assert decoded.msg == msg and type(decoded.msg) is type(msg)
    assert list(decoded.tensors) == list(tensors)
    for name, array in tensors.items():
        got = decoded.tensors[name]
        assert got.dtype == array.dtype.newbyteorder("<") and got.shape == array.shape
        assert got.tobytes() == little_endian_bytes(array)  # bit-exact, NaN payloads included
        assert not got.flags.writeable
    assert encode(decoded.msg, decoded.tensors) == data


def test_layout_is_as_documented() -> None:
    msg = GlobalModelHeader(fleet="f", model_version=2, round_id=1)
    data = encode(msg, {"w": np.array([1.0, -2.0], dtype=">f4")})
    assert data[:4] == b"FDG\x01"
    (header_len,) = struct.unpack(">I", data[4:8])
    header = json.loads(data[8 : 8 + header_len])
    assert header == {
        "msg": msg.model_dump(mode="json"),
        "tensors": [{"name": "w", "dtype": "float32", "shape": [2]}],
    }
    assert data[8 + header_len :] == np.array([1.0, -2.0], dtype="<f4").tobytes()


def test_message_without_tensors() -> None:
    msg = SkipNotice(device_id="d", round_id=3, update_id="u", reason="no new data")
    assert decode(encode(msg)).tensors == {}
    assert len(encode(msg)) < 150  # a skip notice is a few dozen bytes of JSON


@pytest.mark.parametrize("dtype", ["float64", "bool", "int64", "complex64", "object"])
def test_encode_rejects_other_dtypes(dtype: str) -> None:
    with pytest.raises(EncodeError):
        encode(STATUS_MSG, {"x": np.zeros(2, dtype=dtype)})


STATUS_MSG = Status(device_id="d", state="online", timestamp=1.0)


def test_encode_rejects_bad_inputs() -> None:
    with pytest.raises(EncodeError):
        encode(TrainingConfig(epochs=1, batch_size=1, lr=1.0))  # not a wire message
    with pytest.raises(EncodeError):
        encode(STATUS_MSG, {"": np.zeros(1, np.float32)})
    with pytest.raises(EncodeError):
        encode(STATUS_MSG, {"x" * 257: np.zeros(1, np.float32)})
    with pytest.raises(EncodeError):
        encode(STATUS_MSG, {"x": np.zeros((1,) * 33, np.float32)})


# -- rejects, one per reason ----------------------------------------------------------------

SMALL = Limits(max_payload=4096, max_header=1024, max_tensors=2, max_elements=100)


def spec(name: Any = "w", dtype: Any = "float32", shape: Any = (2,)) -> dict[str, Any]:
    return {
        "name": name,
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
    }


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"FDG\x01\x00\x00", "too_short"),
        (b"", "too_short"),
        (b"XYZ" + VALID[3:], "bad_magic"),
        (b"FDG\x02" + VALID[4:], "bad_version"),
        (raw_payload(b"", header_len=2**32 - 1), "header_too_large"),
        (raw_payload(b"x" * 1025), "header_too_large"),
        (VALID[:20], "truncated"),
        (VALID[:-1], "truncated"),
        (VALID + b"\0", "trailing_bytes"),
        (raw_payload(b"\xff\xfe{}"), "bad_header_json"),
        (raw_payload(b"{"), "bad_header_json"),
        (raw_payload(b'{"msg": NaN, "tensors": []}'), "bad_header_json"),
        (raw_payload(b'{"msg": {}, "msg": {}, "tensors": []}'), "bad_header_json"),
        (raw_payload([]), "schema"),
        (raw_payload({"msg": STATUS}), "schema"),
        (raw_payload({"msg": STATUS, "tensors": {}}), "schema"),
        (raw_payload({"msg": STATUS, "tensors": [], "x": 1}), "schema"),
        (raw_payload({"msg": STATUS | {"timestamp": "1.0"}, "tensors": []}), "schema"),
        (raw_payload({"msg": STATUS | {"device_id": "a/b"}, "tensors": []}), "schema"),
        (raw_payload({"msg": STATUS | {"extra": 1}, "tensors": []}), "schema"),
        (
            raw_payload(
                {
                    "msg": {
                        "kind": "update",
                        "device_id": "d",
                        "round_id": 1.0,
                        "update_id": "u",
                        "base_version": 0,
                        "num_samples": 1,
                    },
                    "tensors": [],
                }
            ),
            "schema",
        ),  # strict: 1.0 is not an int
        (raw_payload({"msg": STATUS, "tensors": [{"name": "w"}]}), "schema"),
        (raw_payload({"msg": STATUS, "tensors": [spec(name="")]}), "schema"),
        (raw_payload({"msg": STATUS, "tensors": [spec(name=7)]}), "schema"),
        (
            raw_payload({"msg": STATUS, "tensors": [spec("a"), spec("b"), spec("c")]}),
            "too_many_tensors",
        ),
        (raw_payload({"msg": STATUS, "tensors": [spec(), spec()]}, bytes(16)), "duplicate_tensor"),
        (raw_payload({"msg": STATUS, "tensors": [spec(dtype="float64")]}), "bad_dtype"),
        (raw_payload({"msg": STATUS, "tensors": [spec(dtype=">f4")]}), "bad_dtype"),
        (raw_payload({"msg": STATUS, "tensors": [spec(dtype=["float32"])]}), "bad_dtype"),
        (raw_payload({"msg": STATUS, "tensors": [spec(shape=(-1,))]}), "bad_shape"),
        (raw_payload({"msg": STATUS, "tensors": [spec(shape=(2.0,))]}), "bad_shape"),
        (raw_payload({"msg": STATUS, "tensors": [spec(shape=(True,))]}), "bad_shape"),
        (raw_payload({"msg": STATUS, "tensors": [spec(shape="2")]}), "bad_shape"),
        (raw_payload({"msg": STATUS, "tensors": [spec(shape=(1,) * 33)]}), "bad_shape"),
        (raw_payload({"msg": STATUS, "tensors": [spec(shape=(0, 10**30))]}), "bad_shape"),
        (raw_payload({"msg": STATUS, "tensors": [spec(shape=(10, 11))]}), "too_large"),
        (b"FDG\x01" + bytes(5000), "too_large"),
    ],
)
def test_each_reason(data: bytes, reason: str) -> None:
    assert rejects(data, SMALL).reason == reason


@pytest.mark.parametrize("depth", [100, 900, 5000, 30000])
def test_deep_nesting_is_rejected(depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    assert rejects(raw_payload(nested)).reason in ("bad_header_json", "schema")
    header = b'{"msg": {"kind": "status", "device_id": ' + nested + b'}, "tensors": []}'
    assert rejects(raw_payload(header)).reason in ("bad_header_json", "schema")


def test_decode_error_carries_reason_and_message() -> None:
    error = rejects(b"nope-nope")
    assert error.reason == "bad_magic" and str(error).startswith("bad_magic: ")
    counter = RejectCounter()
    counter.count(error)
    counter.count("truncated")
    assert counter == {"bad_magic": 1, "truncated": 1}


def test_sizes_are_bounded_before_allocation() -> None:
    huge_header = raw_payload(b"{}", header_len=2**32 - 1)  # claims a 4 GiB header
    huge_tensor = raw_payload({"msg": STATUS, "tensors": [spec(shape=(2**31, 2**31))]})
    many_bytes = raw_payload({"msg": STATUS, "tensors": [spec(shape=(16_000_000,))]}, bytes(8))
    tracemalloc.start()
    try:
        assert rejects(huge_header).reason == "header_too_large"
        assert rejects(huge_tensor).reason in ("too_large", "bad_shape")
        assert rejects(many_bytes).reason == "truncated"  # 64 MB declared, 8 bytes present
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_empty_tensors_and_scalars() -> None:
    tensors = {"empty": np.zeros((0, 5), np.float32), "scalar": np.array(7, np.int32)}
    decoded = decode(encode(STATUS_MSG, tensors))
    assert decoded.tensors["empty"].shape == (0, 5)
    assert decoded.tensors["scalar"].shape == () and decoded.tensors["scalar"] == 7


def test_accepts_bytearray_without_aliasing_it() -> None:
    buffer = bytearray(VALID)
    decoded = decode(buffer)
    buffer[-1] ^= 0xFF
    assert decoded.tensors["b"].tolist() == [1, 1, 1]


# -- fuzzing: nothing but DecodeError -------------------------------------------------------


def decode_or_reject(data: bytes) -> None:
    try:
        decode(data)
    except DecodeError as exc:
        assert exc.reason in DECODE_REASONS


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    decode_or_reject(data)


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_a_valid_preamble(data: bytes) -> None:
    decode_or_reject(b"FDG\x01" + struct.pack(">I", len(data)) + data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
spec_like = st.fixed_dictionaries(
    {
        "name": json_values | st.text(min_size=1, max_size=4),
        "dtype": json_values | st.sampled_from(DTYPE_NAMES),
        "shape": json_values | st.lists(st.integers(-2, 5), max_size=3),
    }
)
msg_like = st.fixed_dictionaries(
    {"kind": st.sampled_from(["round", "global", "update", "skip", "status"])},
    optional={
        key: json_values
        for key in (
            "fleet",
            "device_id",
            "round_id",
            "update_id",
            "num_samples",
            "state",
            "timestamp",
            "config",
        )
    },
)


@FAST
@given(
    header=st.fixed_dictionaries(
        {"msg": msg_like | json_values, "tensors": st.lists(spec_like, max_size=3) | json_values}
    ),
    body=st.binary(max_size=64),
)
def test_arbitrary_headers(header: dict[str, Any], body: bytes) -> None:
    decode_or_reject(raw_payload(json.dumps(header).encode(), body))


@FAST
@given(msg=messages, tensors=tensor_maps, data=st.data())
def test_mutated_valid_payloads(
    msg: BaseModel, tensors: dict[str, np.ndarray], data: st.DataObject
) -> None:
    valid = encode(msg, tensors)
    cut = data.draw(st.integers(0, len(valid) - 1))
    decode_or_reject(valid[:cut])
    at = data.draw(st.integers(0, len(valid) - 1))
    flip = data.draw(st.integers(1, 255))
    decode_or_reject(valid[:at] + bytes([valid[at] ^ flip]) + valid[at + 1 :])
    decode_or_reject(valid + data.draw(st.binary(min_size=1, max_size=16)))
    decode_or_reject(valid[:at] + data.draw(st.binary(min_size=1, max_size=16)) + valid[at:])
