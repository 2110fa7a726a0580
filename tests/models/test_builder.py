"""The builder (needs TensorFlow) reproduces the committed artifact from its spec and seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.build, pytest.mark.slow]


REPO = Path(__file__).resolve().parents[2]
PAIRS = [
    (spec, REPO / "models" / "artifacts" / f"{spec.stem}.tflite")
    for spec in sorted((REPO / "models" / "specs").glob("*.json"))
]


def test_every_spec_has_its_committed_artifact() -> None:
    missing = [str(a.name) for _, a in PAIRS if not a.exists()]
    assert PAIRS and not missing, f"run `make artifacts`: missing {missing}"


@pytest.fixture(scope="module")
def rebuilt(digits_spec_path: Path) -> bytes:
    from fedge.models.builder import build_tflite
    from fedge.models.spec import load_spec

    return build_tflite(load_spec(digits_spec_path))


@pytest.mark.parametrize(("spec_path", "artifact"), PAIRS, ids=[s.stem for s, _ in PAIRS])
def test_rebuild_matches_committed_artifact(spec_path: Path, artifact: Path) -> None:
    from fedge.models.builder import build_tflite
    from fedge.models.runtime import load_runtime
    from fedge.models.spec import load_spec

    fresh = load_runtime(build_tflite(load_spec(spec_path)), prefer=("litert",))
    committed = load_runtime(artifact, prefer=("litert",))
    assert fresh._interp.get_signature_list() == committed._interp.get_signature_list()  # type: ignore[attr-defined]
    a, b = fresh.get_weights(), committed.get_weights()
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_initial_weights_come_from_the_spec_seed(rebuilt: bytes, digits_spec_path: Path) -> None:
    from fedge.models.runtime import load_runtime
    from fedge.models.spec import load_spec

    spec = load_spec(digits_spec_path)
    weights = load_runtime(rebuilt, prefer=("litert",)).get_weights()
    for name, value in spec.initial_weights().items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    other = spec.model_copy(update={"seed": spec.seed + 1}).initial_weights()
    assert not np.array_equal(other["dense0_kernel"], weights["dense0_kernel"])


def test_other_activations_build_and_agree_with_numpy() -> None:
    from fedge.models.builder import build_tflite
    from fedge.models.runtime import NumpyRuntime, load_runtime
    from fedge.models.spec import DenseLayer, ModelSpec

    spec = ModelSpec(
        name="mixed",
        input_size=5,
        layers=(DenseLayer(units=7, activation="tanh"), DenseLayer(units=6, activation="sigmoid")),
        outputs=3,
        seed=3,
    )
    lite = load_runtime(build_tflite(spec), prefer=("litert",))
    ref = NumpyRuntime(spec)
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.normal(size=(9, 5)).astype(np.float32)
        y = rng.integers(0, 3, 9).astype(np.int32)
        assert lite.train_step(x, y, 0.2) == pytest.approx(ref.train_step(x, y, 0.2), abs=1e-5)
    for name, w in ref.get_weights().items():
        np.testing.assert_allclose(lite.get_weights()[name], w, atol=1e-5)


def test_mse_model_for_forecasting_agrees_with_numpy() -> None:
    """Regression heads (forecast, autoencode): float targets, MSE loss, MAE metric."""
    from fedge.models.builder import build_tflite
    from fedge.models.metadata import op_codes
    from fedge.models.runtime import NumpyRuntime, load_runtime
    from fedge.models.spec import DenseLayer, ModelSpec

    spec = ModelSpec(
        name="forecast",
        input_size=8,
        layers=(DenseLayer(units=16, activation="tanh"),),
        outputs=2,
        loss="mse",
        seed=2,
    )
    data = build_tflite(spec)
    assert not [op for op in op_codes(data) if op.is_custom]
    lite, ref = load_runtime(data, prefer=("litert",)), NumpyRuntime(spec)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 8)).astype(np.float32)
    y = (x[:, :2] * 0.5).astype(np.float32)  # learnable
    first = ref.evaluate(x, y)[0]
    for _ in range(30):
        assert lite.train_step(x, y, 0.05, mu=0.1) == pytest.approx(
            ref.train_step(x, y, 0.05, mu=0.1), abs=1e-5
        )
    for name, w in ref.get_weights().items():
        np.testing.assert_allclose(lite.get_weights()[name], w, atol=1e-5)
    loss, mae = lite.evaluate(x, y)
    assert (loss, mae) == pytest.approx(ref.evaluate(x, y), abs=1e-5)
    assert loss < first / 2
    assert lite.infer(x).shape == (12, 2)
