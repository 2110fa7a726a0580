"""Delta codecs: each codec within its error bound, and nothing but CodecError on any input."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from fedge.protocol import UpdateHeader, decode, encode
from fedge.protocol.codecs import (
    CODEC_REASONS,
    INT8_FLUSH,
    KNOWN_FORMS,
    CodecError,
    CodecSpec,
    Encoded,
    decode_delta,
    encode_delta,
    encoded_nbytes,
    parse_codec,
    varint_decode,
    varint_encode,
)
from fedge.protocol.errors import EncodeError, ProtocolError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

pytestmark = pytest.mark.unit

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODECS = [
    "float32",
    "float16",
    "int8",
    "int8:stochastic",
    "topk:0.3",
    "topk:0.3+float16",
    "topk:0.3+int8",
    "topk:0.3+int8:stochastic",
]
FLOAT16_TINY = 2.0**-14  # smallest normal float16
FLOAT16_MAX = 65504.0
F32_EPS = 2.0**-23

# -- strategies -----------------------------------------------------------------------------

names = st.text(st.characters(codec="ascii", exclude_characters="\x00"), min_size=1, max_size=12)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7)


def deltas(max_abs: float | None = 1e6) -> st.SearchStrategy[dict[str, np.ndarray]]:
    """Deltas of 0-4 float32 tensors of 0-3 dimensions; ``None``: any float32, NaN included."""
    low = None if max_abs is None else -max_abs
    elements = st.floats(low, max_abs, width=32)
    tensor = shapes.flatmap(lambda s: hnp.arrays(np.float32, s, elements=elements))
    return st.dictionaries(names, tensor, max_size=4)


codec_specs = st.sampled_from(CODECS).map(parse_codec) | st.builds(
    CodecSpec,
    quantizer=st.sampled_from(["float32", "float16", "int8", "int8:stochastic"]),
    fraction=st.floats(0, 1, exclude_min=True),
)


def int8_scales(enc: Encoded) -> dict[str, float]:
    return {k[:-2]: float(v) for k, v in enc.tensors.items() if k.endswith("/s")}


def kept(enc: Encoded, name: str) -> np.ndarray:
    """The flat indices top-k sent for ``name``."""
    return np.cumsum(varint_decode(enc.tensors[f"{name}/i"])).astype(np.int64)


def rejects(tensors: Any, meta: Any, **kwargs: Any) -> CodecError:
    with pytest.raises(CodecError) as caught:
        decode_delta(tensors, meta, **kwargs)
    assert caught.value.reason in CODEC_REASONS
    return caught.value


# -- spec strings ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", [*CODECS, "topk:1.0", "topk:0.02", "topk:1e-05+int8"])
def test_canonical_text_round_trips(text: str) -> None:
    spec = parse_codec(text)
    assert str(spec) == text
    assert parse_codec(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("topk:0.020+int8", CodecSpec("int8", 0.02)),
        ("topk:1", CodecSpec("float32", 1.0)),
        ("topk:.5+float16", CodecSpec("float16", 0.5)),
        ("topk:2E-2+int8:stochastic", CodecSpec("int8:stochastic", 0.02)),
    ],
)
def test_other_spellings_parse_to_one_spec(text: str, spec: CodecSpec) -> None:
    assert parse_codec(text) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "int4",
        "INT8",
        " int8",
        "int8:nearest",
        "topk",
        "topk:",
        "topk:0",
        "topk:1.5",
        "topk:-0.1",
        "topk:nan",
        "topk:inf",
        "topk:1e-400",
        "topk:0.1+float32",
        "topk:0.1+topk:0.2",
        "float16+topk:0.1",
        "topk:0." + "1" * 80,
        None,
        3,
    ],
)
def test_bad_spec_is_one_line_listing_the_forms(text: Any) -> None:
    with pytest.raises(ValueError) as caught:
        parse_codec(text)
    message = str(caught.value)
    assert "\n" not in message
    assert KNOWN_FORMS in message


def test_spec_validates_its_fields() -> None:
    with pytest.raises(ValueError):
        CodecSpec("int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CodecSpec("int8", 0.0)
    with pytest.raises(ValueError):
        CodecSpec("int8", 2.0)


def test_topk_count_is_the_decimal_fraction_and_at_least_one() -> None:
    assert parse_codec("topk:0.02").topk_count(50_000) == 1000  # not 1001 from float error
    assert parse_codec("topk:0.1").topk_count(3) == 1
    assert parse_codec("topk:1e-9").topk_count(10) == 1
    assert parse_codec("topk:0.5").topk_count(0) == 0
    assert parse_codec("topk:1.0").topk_count(7) == 7


# -- laws over every codec ------------------------------------------------------------------


@FAST
@given(delta=deltas(max_abs=FLOAT16_MAX), spec=codec_specs, seed=st.integers(0, 2**32))
def test_decode_gives_exactly_what_the_sender_computed(
    delta: dict[str, np.ndarray], spec: CodecSpec, seed: int
) -> None:
    enc = encode_delta(delta, spec, np.random.default_rng(seed))
    out = decode_delta(enc.tensors, enc.meta)
    assert list(out) == list(delta)
    for name, x in delta.items():
        assert out[name].dtype == np.float32 and out[name].shape == x.shape
        assert np.array_equal(out[name], enc.decoded[name])
    assert enc.meta["codec"] == str(spec)
    assert encoded_nbytes(enc) == sum(t.nbytes for t in enc.tensors.values())


@pytest.mark.parametrize("codec", CODECS)
def test_survives_the_envelope(codec: str) -> None:
    rng = np.random.default_rng(1)
    delta = {"dense0_kernel": rng.normal(size=(8, 5)).astype(np.float32), "b": np.zeros(5, "f4")}
    enc = encode_delta(delta, parse_codec(codec), rng)
    header = UpdateHeader(device_id="d", round_id=1, update_id="u", base_version=0, num_samples=1)
    received = decode(encode(header, enc.tensors)).tensors  # read-only views
    out = decode_delta(received, enc.meta)
    assert all(np.array_equal(out[k], enc.decoded[k]) for k in delta)


@FAST
@given(delta=deltas(max_abs=None))
def test_float32_round_trip_is_exact(delta: dict[str, np.ndarray]) -> None:
    finite = {k: v for k, v in delta.items() if np.isfinite(v).all()}
    enc = encode_delta(finite, parse_codec("float32"))
    assert set(enc.tensors) == set(finite)  # today's wire: the tensors under their own names
    out = decode_delta(enc.tensors, enc.meta)
    assert all(np.array_equal(out[k], v) for k, v in finite.items())


@FAST
@given(delta=deltas(max_abs=FLOAT16_MAX))
def test_float16_relative_error(delta: dict[str, np.ndarray]) -> None:
    enc = encode_delta(delta, parse_codec("float16"))
    for name, x in delta.items():
        x64, err = x.astype(np.float64), np.abs(x.astype(np.float64) - enc.decoded[name])
        normal = np.abs(x64) >= FLOAT16_TINY
        assert np.all(err[normal] <= 2.0**-11 * np.abs(x64[normal]))
        assert np.all(err[~normal] <= 2.0**-25)  # half the smallest float16 subnormal


@FAST
@given(delta=deltas(), stochastic=st.booleans(), seed=st.integers(0, 2**32))
def test_int8_error_within_scale(delta: dict[str, np.ndarray], stochastic: bool, seed: int) -> None:
    spec = parse_codec("int8:stochastic" if stochastic else "int8")
    enc = encode_delta(delta, spec, np.random.default_rng(seed))
    scales = int8_scales(enc)
    for name, x in delta.items():
        x64 = x.astype(np.float64)
        peak = float(np.abs(x64).max()) if x.size else 0.0
        s = scales[name]
        assert s == pytest.approx(peak / 127, rel=2**-23) if peak >= INT8_FLUSH else s == 0
        bound = (s if stochastic else s / 2) + F32_EPS * (np.abs(x64) + s)  # + float32 rounding
        assert np.all(np.abs(x64 - enc.decoded[name]) <= (bound if s else INT8_FLUSH))
        assert enc.tensors[f"{name}/v"].min(initial=0) >= -127


def test_int8_stochastic_is_unbiased() -> None:
    # 4000 identical rows share one scale s (max|x| is the same), so each row is an
    # independent draw. Per entry the rounding error has variance <= s^2/4, so the mean of
    # n draws has standard deviation <= s / (2 sqrt n); 5 of those bounds every one of the
    # 64 entries (a false alarm has probability < 64 * 6e-7 even before fixing the seed).
    n, rng = 4000, np.random.default_rng(7)
    x = rng.normal(size=64).astype(np.float32)
    x[0] = 3.0  # the peak, so s = 3/127 and entry 0 is exact
    enc = encode_delta({"w": np.tile(x, (n, 1))}, parse_codec("int8:stochastic"), rng)
    s = float(enc.tensors["w/s"])
    mean = enc.decoded["w"].astype(np.float64).mean(axis=0)
    assert np.all(np.abs(mean - x) <= 5 * s / (2 * math.sqrt(n)))
    nearest = encode_delta({"w": np.tile(x, (n, 1))}, parse_codec("int8")).decoded["w"][0]
    assert np.abs(mean - x).mean() < 0.2 * np.abs(nearest - x).mean()  # nearest is biased


def test_int8_stochastic_uses_the_rng_given() -> None:
    delta = {"w": np.linspace(-1, 1, 101, dtype=np.float32)}
    spec = parse_codec("int8:stochastic")
    a = encode_delta(delta, spec, np.random.default_rng(3)).tensors["w/v"]
    b = encode_delta(delta, spec, np.random.default_rng(3)).tensors["w/v"]
    c = encode_delta(delta, spec, np.random.default_rng(4)).tensors["w/v"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# -- top-k ----------------------------------------------------------------------------------


@FAST
@given(delta=deltas(), fraction=st.floats(0, 1, exclude_min=True))
def test_topk_keeps_the_largest_exactly(delta: dict[str, np.ndarray], fraction: float) -> None:
    spec = CodecSpec("float32", fraction)
    enc = encode_delta(delta, spec)
    flat = {k: v.ravel().astype(np.float64) for k, v in delta.items()}
    kept_mask = {k: np.zeros(v.size, bool) for k, v in flat.items()}
    for name in delta:
        idx = kept(enc, name)
        kept_mask[name][idx] = True
        assert np.array_equal(enc.tensors[f"{name}/v"], delta[name].ravel()[idx])  # exact
    keep = np.concatenate([np.abs(flat[k][kept_mask[k]]) for k in delta] + [np.empty(0)])
    drop = np.concatenate([flat[k][~kept_mask[k]] for k in delta] + [np.empty(0)])
    nonzero = sum(int(np.count_nonzero(v)) for v in flat.values())
    assert keep.size == min(spec.topk_count(sum(v.size for v in flat.values())), nonzero)
    assert np.all(keep > 0)  # zeros are never sent
    if keep.size and drop.size:
        assert np.abs(drop).max() <= keep.min()  # across tensors: the choice is global
    error = [float(d) ** 2 for k in delta for d in (flat[k] - enc.decoded[k].ravel())]
    assert math.fsum(error) == math.fsum(float(d) ** 2 for d in drop)


@FAST
@given(
    delta=deltas(max_abs=FLOAT16_MAX),
    fraction=st.floats(0, 1, exclude_min=True),
    quantizer=st.sampled_from(["float16", "int8", "int8:stochastic"]),
)
def test_topk_then_quantise_keeps_the_same_entries(
    delta: dict[str, np.ndarray], fraction: float, quantizer: Any
) -> None:
    plain = encode_delta(delta, CodecSpec("float32", fraction))
    enc = encode_delta(delta, CodecSpec(quantizer, fraction), np.random.default_rng(0))
    scales = int8_scales(enc)
    for name, x in delta.items():
        idx = kept(enc, name)
        assert np.array_equal(idx, kept(plain, name))
        values = x.ravel()[idx].astype(np.float64)
        err = np.abs(values - enc.decoded[name].ravel()[idx])
        if quantizer == "float16":
            assert np.all(err <= np.maximum(2.0**-11 * np.abs(values), 2.0**-25))
        else:
            s = scales[name]
            bound = (s if quantizer.endswith("stochastic") else s / 2) + F32_EPS * (
                np.abs(values) + s
            )
            assert np.all(err <= (bound if s else INT8_FLUSH))
        dropped = np.ones(x.size, bool)
        dropped[idx] = False
        assert not enc.decoded[name].ravel()[dropped].any()


def test_topk_is_global_across_tensors() -> None:
    big = np.full(100, 5.0, np.float32)
    small = np.full(100, 0.1, np.float32)
    enc = encode_delta({"big": big, "small": small}, parse_codec("topk:0.25"))
    assert kept(enc, "big").size == 50 and kept(enc, "small").size == 0
    assert enc.tensors["small/v"].shape == (0,)


def test_topk_index_bytes_are_about_one_per_index_at_two_percent() -> None:
    delta = {"w": np.random.default_rng(0).normal(size=1_000_000).astype(np.float32)}
    enc = encode_delta(delta, parse_codec("topk:0.02+int8"))
    assert enc.tensors["w/v"].size == 20_000
    assert enc.tensors["w/i"].size < 1.1 * 20_000  # gaps average 50 < 128: one byte each


def test_zero_and_empty_tensors() -> None:
    delta = {
        "zeros": np.zeros((3, 4), np.float32),
        "empty": np.zeros((0, 5), np.float32),
        "scalar": np.float32(0.0) + np.zeros((), np.float32),
        "tiny": np.full(3, 1e-38, np.float32),  # max/127 is subnormal: flushed
    }
    for codec in CODECS:
        enc = encode_delta(delta, parse_codec(codec), np.random.default_rng(0))
        out = decode_delta(enc.tensors, enc.meta)
        for name, x in delta.items():
            assert out[name].shape == x.shape
            assert np.abs(out[name] - x).max(initial=0) <= INT8_FLUSH
        if codec.startswith("topk"):
            assert all(enc.tensors[f"{n}/v"].size == 0 for n in ("zeros", "empty", "scalar"))
        if "int8" in codec:
            assert float(enc.tensors["zeros/s"]) == 0.0
    assert decode_delta(*_pair(encode_delta({}, parse_codec("topk:0.1")))) == {}


def _pair(enc: Encoded) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return enc.tensors, enc.meta


# -- what encode refuses --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "codec"),
    [
        ({"w": np.array([1.0, np.nan], np.float32)}, "int8"),
        ({"w": np.array([np.inf], np.float32)}, "float32"),
        ({"w": np.array([1e39])}, "float32"),  # float64 that overflows float32
        ({"w": np.array([70000.0], np.float32)}, "float16"),  # beyond float16's range
        ({"w": np.array([70000.0], np.float32)}, "topk:1.0+float16"),
        ({"w": np.arange(3)}, "float32"),  # not a float type
        ({"": np.zeros(1, np.float32)}, "float32"),
        ({"x" * 255: np.zeros(1, np.float32)}, "float32"),
        ({3: np.zeros(1, np.float32)}, "float32"),
    ],
)
def test_encode_refuses(delta: Any, codec: str) -> None:
    with pytest.raises(EncodeError):
        encode_delta(delta, parse_codec(codec))


def test_float64_input_is_cast_to_float32() -> None:
    enc = encode_delta({"w": np.array([0.1, -2.5])}, parse_codec("float32"))
    assert enc.tensors["w"].dtype == np.float32 and enc.decoded["w"][0] == np.float32(0.1)


# -- varints --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, [0]), (1, [1]), (127, [127]), (128, [0x80, 1]), (300, [0xAC, 2]), (2**14, [128, 128, 1])],
)
def test_varint_known_vectors(value: int, encoded: list[int]) -> None:
    assert varint_encode(np.array([value])).tolist() == encoded
    assert varint_decode(np.array(encoded, np.uint8)).tolist() == [value]


@FAST
@given(st.lists(st.integers(0, 2**63 - 1), max_size=50))
def test_varint_round_trip(values: list[int]) -> None:
    data = varint_encode(np.array(values, np.uint64))
    assert data.dtype == np.uint8
    assert varint_decode(data).tolist() == values


@FAST
@given(st.lists(st.integers(0, 300), max_size=50))
def test_varint_round_trip_of_small_values(values: list[int]) -> None:
    """Top-k's gaps: mostly one byte each (the byte is the value), sometimes two."""
    data = varint_encode(np.array(values, np.int64))
    if all(v < 128 for v in values):
        assert data.tolist() == values
    else:
        assert len(data) == len(values) + sum(v >= 128 for v in values)
    assert varint_decode(data).tolist() == values
    assert varint_decode(data).dtype == np.uint64


def test_varint_rejects_truncated_and_overlong() -> None:
    assert rejects_varint(np.array([0x80], np.uint8)) == "bad_varint"
    assert rejects_varint(np.array([0x80] * 9 + [1], np.uint8)) == "bad_varint"
    with pytest.raises(EncodeError):
        varint_encode(np.array([-1]))


def rejects_varint(data: np.ndarray) -> str:
    with pytest.raises(CodecError) as caught:
        varint_decode(data)
    return caught.value.reason


# -- what decode refuses --------------------------------------------------------------------

SAMPLE = {"k": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.ones(2, "f4")}


def sample(codec: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    enc = encode_delta(SAMPLE, parse_codec(codec), np.random.default_rng(0))
    return dict(enc.tensors), {"codec": enc.meta["codec"], "shapes": dict(enc.meta["shapes"])}


def with_(tensors: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(tensors)
    out.update({k.replace("__", "/"): v for k, v in changes.items()})
    return out


def test_decode_rejects_with_a_reason() -> None:
    t, m = sample("topk:0.5+int8")  # 7 entries of 14: k/i = [0, 1, 1, 8, 1], b/i = [0, 1]
    assert t["k/i"].tolist() == [0, 1, 1, 8, 1]
    cases: list[tuple[str, Any, Any]] = [
        ("bad_meta", t, None),
        ("bad_meta", t, {"codec": "int8"}),
        ("bad_meta", t, {**m, "extra": 1}),
        ("bad_meta", t, {**m, "shapes": [["k", [3, 4]]]}),
        ("bad_meta", t, {**m, "shapes": {"k": [3, -4], "b": [2]}}),
        ("bad_meta", t, {**m, "shapes": {"k": [3, True], "b": [2]}}),
        ("bad_meta", t, {**m, "shapes": {"k": "3x4", "b": [2]}}),
        ("bad_meta", t, {**m, "shapes": {"": [1]}}),
        ("bad_meta", [], m),
        ("bad_codec", t, {**m, "codec": "topk:0.5+int4"}),
        ("bad_codec", t, {**m, "codec": 5}),
        ("too_large", t, {**m, "shapes": {"k": [10**6, 10**6], "b": [2]}}),
        ("too_large", t, {**m, "shapes": {f"t{i}": [10**7] for i in range(7)}}),
        ("missing_tensor", {k: v for k, v in t.items() if k != "b/s"}, m),
        ("unexpected_tensor", with_(t, b__x=np.zeros(1, np.uint8)), m),
        ("unexpected_tensor", {**t, 7: np.zeros(1)}, m),
        ("bad_dtype", with_(t, k__v=t["k/v"].astype(np.int16)), m),
        ("bad_dtype", with_(t, k__i=t["k/i"].astype(np.int8)), m),
        ("bad_dtype", with_(t, k__s=[0.1]), m),
        ("bad_shape", with_(t, k__s=np.ones(1, np.float32)), m),
        ("bad_shape", with_(t, k__i=t["k/i"].reshape(1, -1)), m),
        ("bad_scale", with_(t, k__s=np.array(np.nan, np.float32)), m),
        ("bad_scale", with_(t, k__s=np.array(-1.0, np.float32)), m),
        ("bad_value", with_(t, k__v=np.full_like(t["k/v"], -128)), m),
        ("bad_varint", with_(t, k__i=np.array([0x80] * 6, np.uint8)), m),
        ("bad_index", with_(t, k__i=np.array([0, 1, 1, 12, 1], np.uint8)), m),  # a gap >= 12
        ("bad_index", with_(t, k__i=np.array([0, 1, 0, 1, 1], np.uint8)), m),  # a repeat
        ("bad_index", with_(t, k__i=np.array([8, 1, 1, 1, 1], np.uint8)), m),  # ends at 12
        ("count_mismatch", with_(t, k__i=t["k/i"][:-1]), m),
        ("too_many_entries", *_denser()),
        ("not_finite", with_(t, k__s=np.array(3e38, np.float32)), m),
    ]
    for reason, tensors, meta in cases:
        assert rejects(tensors, meta).reason == reason, (reason, meta)
    t16, m16 = sample("float16")
    assert rejects(with_(t16, b__v=np.array([np.inf, 0], np.float16)), m16).reason == "not_finite"
    assert rejects(with_(t16, b__v=np.ones(3, np.float16)), m16).reason == "bad_shape"
    t32, m32 = sample("float32")
    assert rejects(with_(t32, b=np.ones(2, np.float64)), m32).reason == "bad_dtype"
    with pytest.raises(ValueError):
        CodecError("no_such_reason", "")
    assert issubclass(CodecError, ProtocolError)


def _denser() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    t, m = sample("topk:1.0")  # every entry sent, declared as a sparser codec
    return t, {**m, "codec": "topk:0.5"}


def test_decode_accepts_either_byte_order_and_does_not_write_to_its_input() -> None:
    t, m = sample("topk:0.5+float16")
    swapped = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in t.items()}
    for v in swapped.values():
        v.flags.writeable = False
    expected = decode_delta(t, m)
    out = decode_delta(swapped, m)
    assert all(np.array_equal(out[k], expected[k]) for k in expected)


# -- decode never crashes -------------------------------------------------------------------

junk_arrays = st.one_of(
    hnp.arrays(
        st.sampled_from(["float32", "float16", "int8", "uint8", "int32", "float64", "<u2"]),
        hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=6),
    ),
    st.none(),
    st.integers(),
    st.lists(st.integers(), max_size=3),
)
junk_meta = st.one_of(
    st.none(),
    st.integers(),
    st.dictionaries(
        st.sampled_from(["codec", "shapes", "x"]),
        st.one_of(
            st.sampled_from(CODECS),
            st.text(max_size=20),
            st.dictionaries(
                names,
                st.lists(st.integers(-3, 2**40) | st.booleans() | st.floats(), max_size=4),
                max_size=3,
            ),
            st.integers(),
        ),
    ),
)


@FAST
@given(tensors=st.dictionaries(names, junk_arrays, max_size=5), meta=junk_meta)
def test_decode_of_junk_raises_only_codec_error(tensors: dict[str, Any], meta: Any) -> None:
    try:
        decode_delta(tensors, meta)
    except CodecError as exc:
        assert exc.reason in CODEC_REASONS


@FAST
@given(
    delta=deltas(max_abs=100.0),
    codec=st.sampled_from(CODECS),
    data=st.data(),
)
def test_decode_of_damaged_encodings_raises_only_codec_error(
    delta: dict[str, np.ndarray], codec: str, data: st.DataObject
) -> None:
    enc = encode_delta(delta, parse_codec(codec), np.random.default_rng(0))
    tensors, meta = dict(enc.tensors), {"codec": enc.meta["codec"], "shapes": enc.meta["shapes"]}
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["bytes", "replace", "drop", "add", "shape", "codec"]))
        keys = sorted(tensors)
        if action == "codec":
            meta["codec"] = data.draw(st.sampled_from(CODECS))
        elif action == "shape" and meta["shapes"]:
            name = data.draw(st.sampled_from(sorted(meta["shapes"])))
            meta["shapes"] = {
                **meta["shapes"],
                name: data.draw(st.lists(st.integers(0, 9), max_size=3)),
            }
        elif action == "add" or not keys:
            tensors[data.draw(names)] = data.draw(junk_arrays)
        elif action == "drop":
            del tensors[data.draw(st.sampled_from(keys))]
        else:
            key = data.draw(st.sampled_from(keys))
            if action == "replace":
                tensors[key] = data.draw(junk_arrays)
            elif isinstance(tensors[key], np.ndarray) and tensors[key].nbytes:
                raw = bytearray(tensors[key].tobytes())
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
                value = tensors[key]
                tensors[key] = np.frombuffer(bytes(raw), value.dtype).reshape(value.shape)
    try:
        decode_delta(tensors, meta)
    except CodecError as exc:
        assert exc.reason in CODEC_REASONS


# -- sizes ----------------------------------------------------------------------------------


def test_bytes_for_a_50k_delta() -> None:
    rng = np.random.default_rng(0)
    delta = {
        "dense0_kernel": rng.normal(0, 0.01, (96, 500)).astype(np.float32),
        "dense0_bias": rng.normal(0, 0.01, 500).astype(np.float32),
        "dense1_kernel": rng.normal(0, 0.01, (500, 3)).astype(np.float32),
    }
    size = {c: encoded_nbytes(encode_delta(delta, parse_codec(c), rng)) for c in CODECS}
    assert size["float32"] == 200_000
    assert size["float16"] == 100_000
    assert size["int8"] == size["int8:stochastic"] == 50_000 + 3 * 4
    dense = {c: encoded_nbytes(encode_delta(delta, parse_codec(c))) for c in ["topk:0.02+int8"]}
    assert dense["topk:0.02+int8"] < 2_200  # 1,000 values, ~1,070 index bytes, 3 scales
