"""The aggregator's side of homomorphic encryption, step by step: the intake refuses what it
cannot use with a reason and leaves the sum as it was, the close moves the encrypted model as
FedAvg moves a plain one, and the config refuses what HE cannot do, in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedge.aggregator import he_round
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.store import Store
from fedge.protocol import SkipNotice, TrainingConfig, UpdateHeader, he
from fedge.protocol.envelope import HE_TENSOR
from helpers import DIGITS_MODEL
from pydantic import ValidationError

pytestmark = pytest.mark.unit

SHAPES = {"w": (40, 3), "b": (3,)}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("tenseal", reason=he.INSTALL_HINT)
    keys = he.generate_keys()
    folder = tmp_path_factory.mktemp("he")
    (folder / "he.secret").write_bytes(keys.secret)
    (folder / "he.public").write_bytes(keys.public)
    return folder / "he.secret", folder / "he.public"


@pytest.fixture(scope="module")
def secret(files: tuple[Path, Path]) -> he.HeKeys:
    return he.load_keys(files[0], secret=True)


@pytest.fixture(scope="module")
def public(files: tuple[Path, Path]) -> he.HeKeys:
    return he.load_keys(files[1], secret=False)


def tensors(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, np.float32) for k, s in SHAPES.items()}


def header(device: str, n: int) -> UpdateHeader:
    return UpdateHeader(
        device_id=device,
        round_id=1,
        update_id=f"{device}-1",
        base_version=0,
        num_samples=n,
        codec="ckks",
    )


def model(tmp_path: Path, public: he.HeKeys, lr: float | None = None) -> he_round.HeModel:
    store = Store(tmp_path / "agg.sqlite")
    try:
        found = he_round.start(public, store, 0, tensors(1.0), lr)
    finally:
        store.close()
    assert found is not None
    return found


def test_the_close_moves_the_encrypted_model_as_fedavg_moves_a_plain_one(
    tmp_path: Path, secret: he.HeKeys, public: he.HeKeys
) -> None:
    m = model(tmp_path, public, lr=0.5)
    acc = m.accumulator()
    for device, value, n in (("a", 0.1, 10), ("b", -0.3, 30)):
        up = he.as_tensors(he.encrypt_update(secret, tensors(value), n))
        kept, reason = m.take(acc, header(device, n), up, n, None)
        assert reason is None and set(kept) == {HE_TENSOR}
        acc.add(device, kept, n)
    acc.hold("c", 60)  # trained, held back: its weight, a zero delta
    step = m.advance(acc)  # the plain step is nothing: the model moved inside E
    assert all(not np.any(v) for v in step.values())
    got = he.decrypt_model(secret, m.payload, SHAPES)
    want = 1.0 + 0.5 * (10 * 0.1 + 30 * -0.3) / 100  # w + lr * sum n_i d_i / sum n_i
    assert np.abs(got["w"] - want).max() < 1e-5 and np.abs(got["b"] - want).max() < 1e-5


def test_the_intake_refuses_with_a_reason_and_leaves_the_sum_alone(
    tmp_path: Path, secret: he.HeKeys, public: he.HeKeys
) -> None:
    m = model(tmp_path, public)
    acc = m.accumulator()
    good = he.as_tensors(he.encrypt_update(secret, tensors(0.2), 10))
    other = he.keys_from_bytes(he.generate_keys().secret, secret=True)
    cases = [
        (header("a", 10), tensors(0.2), 10, None, "he_wrong_kind"),  # plain tensors
        (header("a", 11), good, 11, None, "he_bad_weight"),  # count differs from the payload
        (
            header("a", 10),
            he.as_tensors(he.encrypt_update(other, tensors(0.2), 10)),
            10,
            None,
            "he_wrong_key",
        ),
        (header("a", 10), good, 10, 9, "samples_over_cap"),  # cannot be re-weighted: refused
    ]
    for head, up, weight, cap, want in cases:
        kept, reason = m.take(acc, head, up, weight, cap)
        assert (kept, reason) == ({}, want)
    skip = SkipNotice(
        device_id="b",
        round_id=1,
        update_id="b-1",
        reason="small_update",
        trained=True,
        num_samples=50,
    )
    assert m.take(acc, skip, {}, 50, 40) == ({}, "samples_over_cap")
    assert m.take(acc, skip, {}, 50, None) == ({}, None)
    assert acc.sum.count == 0 and acc.sum.weight == 0  # nothing refused reached the sum
    kept, reason = m.take(acc, header("a", 10), good, 10, 10)
    acc.add("a", kept, 10)
    assert reason is None and acc.sum.count == 1 and acc.uploaded == {"a"}


def test_a_state_made_without_he_is_encrypted_at_its_version(
    tmp_path: Path, secret: he.HeKeys, public: he.HeKeys
) -> None:
    store = Store(tmp_path / "agg.sqlite")
    try:
        assert he_round.start(None, store, 4, tensors(2.0), None) is None
        m = he_round.start(public, store, 4, tensors(2.0), None)
        assert m is not None
        assert np.abs(he.decrypt_model(secret, m.payload, SHAPES)["w"] - 2.0).max() < 1e-5
        with pytest.raises(Exception, match="cannot decrypt it"):
            he_round.start(None, store, 4, tensors(2.0), None)  # HE turned off again
    finally:
        store.close()


def config(tmp: Path, key: Path, **extra: object) -> AggregatorConfig:
    return AggregatorConfig.model_validate(
        {"model": DIGITS_MODEL, "state_dir": tmp, "he": {"key_file": key}}
        | {"strategy": {"name": "fedavg"}}
        | extra
    )


def test_the_config_refuses_what_he_cannot_do_in_one_line(
    tmp_path: Path, files: tuple[Path, Path]
) -> None:
    cfg = config(tmp_path, files[1])
    assert cfg.training.he is True  # every round announces it
    refused = {
        "supports FedAvg only": {"strategy": {"name": "fedadam"}},
        "median": {"strategy": {"name": "fedavg", "robust": "median"}},
        "norm_bound": {"strategy": {"name": "fedavg", "norm_bound": 1.0}},
        "cannot clip an update it cannot read": {
            "privacy": {"mode": "central", "clip": 1.0, "noise_multiplier": 1.0}
        },
        "cannot be combined with [shards]": {"shards": {"workers": ["w1"]}},
    }
    for text, extra in refused.items():
        with pytest.raises(ValidationError) as info:
            config(tmp_path, files[1], **extra)
        assert info.value.error_count() == 1 and text in str(info.value)
    with pytest.raises(ValidationError, match="holds the fleet's SECRET key"):
        config(tmp_path, files[0])
    with pytest.raises(ValidationError, match="set from \\[he\\]"):
        AggregatorConfig(model=DIGITS_MODEL, state_dir=tmp_path, training=TrainingConfig(he=True))
    local = config(
        tmp_path, files[1], privacy={"mode": "local", "clip": 1.0, "noise_multiplier": 1.0}
    )
    assert local.privacy is not None


def test_fedge_aggregator_with_the_secret_key_is_one_line_and_exit_78(
    tmp_path: Path, files: tuple[Path, Path]
) -> None:
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text(
        f'model = "{DIGITS_MODEL}"\nstate_dir = "{tmp_path}"\n[strategy]\nname = "fedavg"\n'
        f'[he]\nkey_file = "{files[0]}"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "aggregator", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("INFO: ")]
    assert len(ours) == 1 and ours[0].startswith("fedge: error: "), proc.stderr
    assert "SECRET key" in ours[0] and proc.returncode == 78
