"""The device's side of homomorphic encryption: the encrypt step, the encrypted global model,
the announcement's ``he`` flag, and the ``[he]`` config (secret key file only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedge.agent import he_model
from fedge.agent import update as steps
from fedge.agent.config import AgentConfig
from fedge.protocol import PrivacySettings, RoundAnnouncement, TrainingConfig, decode, encode, he
from fedge.protocol.envelope import HE_TENSOR
from helpers import DIGITS_MODEL

from fedge.configfile import ConfigError, load_config
from fedge.heconfig import load_he_keys

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


def update() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in SHAPES.items()}


def test_encrypt_sends_the_whole_update_weighted_by_its_samples(secret: he.HeKeys) -> None:
    tensors = steps.encrypt(update(), secret, 37, TrainingConfig(he=True))
    assert set(tensors) == {HE_TENSOR} and tensors[HE_TENSOR].dtype == np.uint8
    payload = he.from_tensors(tensors)
    got = he.decrypt(secret, payload, SHAPES, kind=he.KIND_UPDATE)
    for name, value in update().items():  # no codec: every entry, none left for a residual
        np.testing.assert_allclose(got[name], 37 * value, atol=1e-5)
    assert he.read_payload(payload, secret, kind=he.KIND_UPDATE, values=123).weight == 37


def test_under_dp_the_encrypted_weight_is_one_as_the_aggregator_weighs(secret: he.HeKeys) -> None:
    cfg = TrainingConfig(he=True, privacy=PrivacySettings(clip=1.0, noise_multiplier=1.0))
    payload = he.from_tensors(steps.encrypt(update(), secret, 37, cfg))
    assert he.read_payload(payload, secret, kind=he.KIND_UPDATE, values=123).weight == 1


def test_an_encrypted_global_model_opens_only_with_the_key(secret: he.HeKeys) -> None:
    weights = update()
    model = he.encrypt_model(secret, weights)
    got = he_model.open_global(secret, he.as_tensors(model), weights)
    assert all(np.abs(got[k] - weights[k]).max() < 1e-5 for k in weights)
    with pytest.raises(he.HeError) as info:
        he_model.open_global(None, he.as_tensors(model), weights)
    assert info.value.reason == "no_secret_key"
    with pytest.raises(he.HeError) as info:  # a model of other shapes is refused, not guessed
        he_model.open_global(secret, he.as_tensors(model), {"w": np.zeros((42, 3))})
    assert info.value.reason == "wrong_size"
    assert he_model.estimate(weights) >= len(he.encrypt_update(secret, weights, 1))


def test_the_he_flag_stays_off_the_wire_until_set() -> None:
    ann = RoundAnnouncement(
        fleet="f",
        round_id=1,
        model_version=0,
        deadline=1.0,
        selected=("a",),
        config=TrainingConfig(),
    )
    assert b'"he"' not in encode(ann)  # a device of the version before still takes it
    on = ann.model_copy(update={"config": TrainingConfig(he=True)})
    assert decode(encode(on)).msg.config.he is True  # type: ignore[union-attr]


def write_config(tmp: Path, key: Path) -> Path:
    data = tmp / "d.npz"
    np.savez(data, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int32))
    cfg = tmp / "agent.toml"
    cfg.write_text(
        f'device_id = "d1"\nmodel = "{DIGITS_MODEL}"\ndata = "{data}"\nstate_dir = "{tmp}"\n'
        f'[he]\nkey_file = "{key}"\n'
    )
    return cfg


def test_a_device_takes_the_secret_key_file_only(tmp_path: Path, files: tuple[Path, Path]) -> None:
    cfg = load_config(write_config(tmp_path, files[0]), AgentConfig)
    assert cfg.he is not None and cfg.he.key_file == files[0]
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, files[1]), AgentConfig)
    assert len(info.value.problems) == 1 and "needs he.secret" in info.value.problems[0]
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="not a fedge CKKS key file"):
        load_config(write_config(tmp_path, junk), AgentConfig)


def test_without_tenseal_a_configured_key_is_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, files: tuple[Path, Path]
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tenseal", None)  # what a failed import looks like
    with pytest.raises(ConfigError) as info:
        load_he_keys(files[0], secret=True)
    (line,) = info.value.problems
    assert "pip install 'fedge[he]'" in line and str(files[0]) in line
