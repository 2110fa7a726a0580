"""Homomorphic encryption (CKKS): the decrypted sum is the plain weighted sum within the stated
bound, the aggregator's key cannot decrypt, and bad key files and payloads are refused with a
reason. Without TenSEAL (no wheel for the platform) only the tests of that refusal run; the
others report one skip."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedge.protocol import he
from fedge.protocol.errors import EncodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

# The digits MLP's layout (models/artifacts/digits_mlp.tflite): 4,810 values, two ciphertexts.
SHAPES = {"w1": (64, 64), "b1": (64,), "w2": (64, 10), "b2": (10,)}
VALUES = sum(math.prod(s) for s in SHAPES.values())
BOUND = 1e-5  # max abs error of a decrypted mean delta or model against float64 arithmetic


@pytest.fixture(scope="module")
def key_files() -> he.KeyFiles:
    pytest.importorskip("tenseal", reason=he.INSTALL_HINT)
    return he.generate_keys()


@pytest.fixture(scope="module")
def device(key_files: he.KeyFiles) -> he.HeKeys:
    return he.keys_from_bytes(key_files.secret, secret=True)


@pytest.fixture(scope="module")
def server(key_files: he.KeyFiles) -> he.HeKeys:
    return he.keys_from_bytes(key_files.public, secret=False)


@pytest.fixture(scope="module")
def update(device: he.HeKeys) -> bytes:
    return he.encrypt_update(device, tensors(np.random.default_rng(7), 0.02), 40)


def tensors(rng: np.random.Generator, sd: float) -> dict[str, np.ndarray]:
    return {k: rng.normal(0, sd, s).astype(np.float32) for k, s in SHAPES.items()}


def max_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(got[k].astype(np.float64) - want[k]).max()) for k in SHAPES)


# -- the maths ------------------------------------------------------------------------------


def test_decrypted_mean_is_the_plain_weighted_mean(device: he.HeKeys, server: he.HeKeys) -> None:
    rng = np.random.default_rng(0)
    deltas = [tensors(rng, 0.05) for _ in range(12)]
    weights = [int(n) for n in rng.integers(5, 500, 12)]
    total = he.HeSum(server, VALUES)
    for delta, n in zip(deltas, weights, strict=True):
        assert total.add(he.encrypt_update(device, delta, n), weight=n) == n
    total.add_zero(100)  # a device that trained but skipped: a zero delta of weight 100
    assert (total.count, total.weight) == (12, sum(weights) + 100)
    mean = he.decrypt_mean(device, total.to_bytes(), SHAPES)
    exact = {
        k: np.sum([n * d[k].astype(np.float64) for d, n in zip(deltas, weights, strict=True)], 0)
        / (sum(weights) + 100)
        for k in SHAPES
    }
    assert {k: v.shape for k, v in mean.items()} == SHAPES
    assert max_error(mean, exact) < BOUND


def test_shard_sums_merge_into_the_round_sum(device: he.HeKeys, server: he.HeKeys) -> None:
    rng = np.random.default_rng(5)
    deltas, weights = [tensors(rng, 0.05) for _ in range(4)], [3, 5, 7, 11]
    shards = [he.HeSum(server, VALUES), he.HeSum(server, VALUES)]
    for j, (delta, n) in enumerate(zip(deltas, weights, strict=True)):
        shards[j % 2].add(he.encrypt_update(device, delta, n))
    merged = he.HeSum(server, VALUES)
    for shard in shards:
        merged.add_sum(shard.to_bytes())
    assert (merged.count, merged.weight) == (4, 26)
    exact = {
        k: np.sum([n * d[k].astype(np.float64) for d, n in zip(deltas, weights, strict=True)], 0)
        / 26
        for k in SHAPES
    }
    assert max_error(he.decrypt_mean(device, merged.to_bytes(), SHAPES), exact) < BOUND
    with pytest.raises(he.HeError, match="wrong_kind"):
        merged.add_sum(he.encrypt_update(device, deltas[0], 1))


def test_the_encrypted_model_follows_fedavg_over_rounds(
    device: he.HeKeys, server: he.HeKeys
) -> None:
    rng = np.random.default_rng(1)
    w0 = tensors(rng, 0.3)
    model = he.encrypt_model(server, w0)  # the aggregator holds only the public key
    exact = {k: v.astype(np.float64) for k, v in w0.items()}
    for _ in range(5):
        total = he.HeSum(server, VALUES)
        deltas, weights = [tensors(rng, 0.05) for _ in range(3)], [10, 30, 60]
        for delta, n in zip(deltas, weights, strict=True):
            total.add(he.encrypt_update(device, delta, n))
        model = he.apply_sum(server, model, total.to_bytes(), VALUES, server_lr=0.5)
        for k in SHAPES:
            exact[k] += 0.5 * sum(n * d[k] for d, n in zip(deltas, weights, strict=True)) / 100
    assert max_error(he.decrypt_model(device, model, SHAPES), exact) < BOUND


def test_the_aggregator_cannot_decrypt(
    key_files: he.KeyFiles, server: he.HeKeys, update: bytes
) -> None:
    assert not server.context.has_secret_key()
    with pytest.raises(he.HeError, match="no_secret_key"):
        he.decrypt(server, update, SHAPES, kind=he.KIND_UPDATE)
    raw = he.read_payload(update, server, kind=he.KIND_UPDATE, values=VALUES).ciphertexts[0]
    vector = he.tenseal().ckks_vector_from(server.context, raw)
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()
    # nor does the aggregator's file carry the secret key under another name
    assert len(key_files.public) < len(key_files.secret)


def test_encrypt_refuses_what_ckks_would_wrap_or_lose(device: he.HeKeys) -> None:
    good = tensors(np.random.default_rng(2), 0.01)
    with pytest.raises(EncodeError, match="finite"):
        he.encrypt_update(device, {**good, "b2": np.full(10, np.nan, np.float32)}, 1)
    with pytest.raises(EncodeError, match="CKKS bound"):
        big = np.full(10, device.params.value_bound / 10 + 1, np.float32)
        he.encrypt_update(device, {**good, "b2": big}, 10)  # weight * delta over the bound
    for weight in (0, -1.0, math.inf):
        with pytest.raises(EncodeError, match="weight"):
            he.encrypt_update(device, good, weight)


# -- key files ------------------------------------------------------------------------------


def test_key_files_load_for_their_holder_only(key_files: he.KeyFiles, tmp_path: Path) -> None:
    (tmp_path / "he.secret").write_bytes(key_files.secret)
    (tmp_path / "he.public").write_bytes(key_files.public)
    assert he.load_keys(tmp_path / "he.secret", secret=True).has_secret
    assert not he.load_keys(tmp_path / "he.public", secret=False).has_secret
    cases = {
        ("he.secret", False): "SECRET key; the aggregator must get the public key file only",
        ("he.public", True): "public key file; a device needs the secret key file",
        ("missing", True): "cannot read",
    }
    for (name, secret), message in cases.items():
        with pytest.raises(he.HeError) as info:
            he.load_keys(tmp_path / name, secret=secret)
        assert info.value.reason == "bad_key_file"
        assert str(tmp_path / name) in str(info.value) and message in str(info.value)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:10],  # truncated header
        lambda b: b"not a key file at all",
        lambda b: b[:200],  # parameters and a little of the context
        lambda b: b[: len(b) // 2],  # half the TenSEAL bytes
        lambda b: b[:40] + bytes(len(b) - 40),  # zeros after the header
        lambda b: b[:4] + b"\x09" + b[5:],  # another key file version
    ],
)
def test_damaged_key_files_are_one_line(key_files: he.KeyFiles, damage, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "he.secret"
    path.write_bytes(damage(key_files.secret))
    with pytest.raises(he.HeError) as info:
        he.load_keys(path, secret=True)
    assert info.value.reason == "bad_key_file" and "\n" not in str(info.value)
    assert str(info.value).startswith(f"bad_key_file: {path}: ")


def test_insecure_or_unusable_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="below 128-bit security"):
        he.HeParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 40, 60))
    with pytest.raises(ValueError, match="3 primes"):
        he.HeParams(coeff_mod_bit_sizes=(60, 60))
    assert he.HeParams().slots == 4096 and sum(he.HeParams().coeff_mod_bit_sizes) <= 218


# -- payloads from the network --------------------------------------------------------------


def repack(payload: bytes, **fields: object) -> bytes:
    """``payload`` with some header fields replaced."""
    names = ("magic", "version", "kind", "key_id", "weight", "count", "values", "parts")
    head = dict(zip(names, he._HEAD.unpack_from(payload), strict=True))
    head.update(fields)
    return he._HEAD.pack(*head.values()) + payload[he._HEAD.size :]


def test_bad_payloads_are_refused_with_a_reason_and_leave_the_sum_alone(
    device: he.HeKeys, server: he.HeKeys, update: bytes
) -> None:
    other = he.keys_from_bytes(he.generate_keys().secret, secret=True)
    small = he.encrypt_update(device, {"w": np.ones(10, np.float32)}, 1)
    model = he.encrypt_model(device, tensors(np.random.default_rng(3), 0.1))
    first = he._HEAD.size + 4
    (length,) = struct.unpack_from(">I", update, he._HEAD.size)
    bad = {
        "too_short": update[:20],
        "bad_magic": b"FDG" + update[3:],
        "bad_version": repack(update, version=2),
        "wrong_kind": model,
        "wrong_key": he.encrypt_update(other, tensors(np.random.default_rng(4), 0.01), 5),
        "bad_weight": repack(update, weight=math.nan),
        "bad_count": repack(update, count=2),
        "wrong_size": small,
        "bad_ciphertexts": repack(update, parts=3),
        "truncated": update[:-1],
        "trailing_bytes": update + b"\0",
        "too_large": update[: he._HEAD.size] + struct.pack(">I", 10**8) + update[first:],
        # a model-level ciphertext in an update's clothes: CKKS would add it and return garbage
        "bad_ciphertext": repack(model, kind=he.KIND_UPDATE, weight=1.0, count=1),
    }
    garbage = update[:first] + b"\x5a" * length + update[first + length :]
    total = he.HeSum(server, VALUES)
    total.add(update)
    before = total.to_bytes()
    for reason, payload in bad.items():
        with pytest.raises(he.HeError) as info:
            total.add(payload)
        assert info.value.reason == reason, reason
    with pytest.raises(he.HeError, match="bad_ciphertext: ciphertext 0: "):
        total.add(garbage)
    with pytest.raises(he.HeError, match=r"bad_weight: payload weight 40\.0, header says 41"):
        total.add(update, weight=41)
    assert total.to_bytes() == before and total.count == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupt_payloads_raise_nothing_but_he_error(
    server: he.HeKeys, update: bytes, data: st.DataObject
) -> None:
    payload = bytearray(update)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at : at + 8] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        he.HeSum(server, VALUES).add(bytes(payload))
    except he.HeError as exc:
        assert exc.reason in he.HE_REASONS
    # accepted is possible: flipped coefficients are still a ciphertext (CKKS has no MAC)


# -- without TenSEAL, and FedAvg only ---------------------------------------------------------


def test_without_tenseal_every_entry_point_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    header_only = he._key_file(he.KEY_SECRET, bytes(16), he.HeParams(), b"")
    monkeypatch.setitem(sys.modules, "tenseal", None)  # what a failed import looks like
    assert not he.available()
    for call in (he.generate_keys, lambda: he.keys_from_bytes(header_only, secret=True)):
        with pytest.raises(he.HeUnavailable) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "pip install 'fedge[he]'" in message


def test_nothing_imports_tenseal_unless_he_is_used() -> None:
    code = (
        "import sys, fedge.cli, fedge.protocol, fedge.protocol.he, fedge.agent.service,"
        " fedge.aggregator.service; print('tenseal' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_tenseal_after_tensorflow_is_one_line_not_a_crash() -> None:
    code = (
        "import sys, types; sys.modules['tensorflow'] = types.ModuleType('tensorflow');"
        "from fedge.protocol import he\n"
        "try: he.generate_keys()\n"
        "except he.HeError as exc: print(exc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("TenSEAL must be loaded before TensorFlow")
    assert proc.stdout.count("\n") == 1


def test_robust_strategies_refuse_he() -> None:
    he.refuse_strategy("fedavg")
    refused: list[dict[str, object]] = [
        {"strategy": "fedadam"},
        {"strategy": "fedavgm"},
        {"strategy": "fedavg", "robust": "median"},
        {"strategy": "fedavg", "norm_bound": 2.0},
    ]
    for settings_ in refused:
        with pytest.raises(ValueError, match="supports FedAvg only") as info:
            he.refuse_strategy(**settings_)  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
