"""LiteRT and the numpy reference agree; weights round-trip; delegates fall back cleanly."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import numpy as np
import pytest
from fedge.models.runtime import (
    InterpreterRuntime,
    ModelLoadError,
    NumpyRuntime,
    available_backends,
    load_runtime,
)

pytestmark = pytest.mark.unit


def batches(n: int, seed: int = 0, size: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.random((size, 64), dtype=np.float32), rng.integers(0, 10, size).astype(np.int32))
        for _ in range(n)
    ]


def test_litert_and_numpy_train_steps_agree(digits_model: Path) -> None:
    lite = load_runtime(digits_model, prefer=("litert",))
    ref = load_runtime(digits_model, prefer=("numpy",))
    assert isinstance(lite, InterpreterRuntime) and isinstance(ref, NumpyRuntime)
    for name, w in lite.get_weights().items():  # same starting point
        np.testing.assert_array_equal(w, ref.get_weights()[name])
    for x, y in batches(20):
        assert lite.train_step(x, y, 0.1) == pytest.approx(ref.train_step(x, y, 0.1), abs=1e-5)
    worst = max(
        float(np.abs(lite.get_weights()[k] - v).max()) for k, v in ref.get_weights().items()
    )
    assert worst < 1e-5
    moved = float(
        np.abs(
            ref.get_weights()["dense0_kernel"] - ref.spec.initial_weights()["dense0_kernel"]
        ).max()
    )
    assert moved > 1e-3  # the steps really trained
    x, y = batches(1, seed=9, size=50)[0]
    loss_l, acc_l = lite.evaluate(x, y)
    loss_r, acc_r = ref.evaluate(x, y)
    assert loss_l == pytest.approx(loss_r, abs=1e-5)
    assert acc_l == pytest.approx(acc_r, abs=1e-6)
    np.testing.assert_allclose(lite.infer(x), ref.infer(x), atol=1e-5)


def test_same_batch_and_weights_give_same_step_from_any_start(digits_model: Path) -> None:
    lite = load_runtime(digits_model, prefer=("litert",))
    ref = load_runtime(digits_model, prefer=("numpy",))
    rng = np.random.default_rng(4)
    start = {
        k: rng.normal(scale=0.3, size=v.shape).astype(np.float32)
        for k, v in ref.get_weights().items()
    }
    lite.set_weights(start)
    ref.set_weights(start)
    x, y = batches(1, seed=5, size=7)[0]  # an odd batch size: shapes are dynamic
    assert lite.train_step(x, y, 0.05) == pytest.approx(ref.train_step(x, y, 0.05), abs=1e-5)
    for k, v in ref.get_weights().items():
        np.testing.assert_allclose(lite.get_weights()[k], v, atol=1e-5)


@pytest.mark.parametrize("backend", ["litert", "numpy"])
def test_get_set_weights_round_trip_exactly(digits_model: Path, backend: str) -> None:
    rt = load_runtime(digits_model, prefer=(backend,))
    rng = np.random.default_rng(1)
    target = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in rt.get_weights().items()}
    target["dense0_bias"][0] = np.float32(1e-38)  # subnormal-adjacent values survive too
    rt.set_weights(target)
    got = rt.get_weights()
    for k, v in target.items():
        assert got[k].tobytes() == v.tobytes(), k


def test_set_weights_rejects_wrong_shapes(digits_model: Path) -> None:
    rt = load_runtime(digits_model, prefer=("litert",))
    weights = rt.get_weights()
    weights["dense0_kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="dense0_kernel"):
        rt.set_weights(weights)
    del weights["dense0_kernel"]
    with pytest.raises(ValueError, match="missing"):
        rt.set_weights(weights)


def test_missing_delegate_falls_back_to_cpu_with_one_line(
    digits_model: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    bogus = tmp_path / "libnot_a_delegate.so"
    bogus.write_bytes(b"not an ELF file")
    with caplog.at_level(logging.WARNING, logger="fedge.models"):
        rt = load_runtime(
            digits_model, prefer=("litert",), delegates=[str(tmp_path / "missing.so"), str(bogus)]
        )
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2  # one clear line per delegate that failed
    assert all("inference runs on the CPU" in r.getMessage() for r in warnings)
    assert rt.delegate == "cpu"
    assert "inference on cpu" in rt.describe()
    x, _ = batches(1)[0]
    assert rt.infer(x).shape == (32, 10)
    gc.collect()  # a half-built LiteRT Delegate would raise in __del__ here (warnings are errors)


def test_no_delegate_reports_cpu(digits_model: Path) -> None:
    assert load_runtime(digits_model, prefer=("litert",)).delegate == "cpu"


def test_missing_or_bad_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model file"):
        load_runtime(tmp_path / "nope.tflite")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"hello world, not a model")
    with pytest.raises(ModelLoadError, match="not a TFLite model"):
        load_runtime(junk)


def test_litert_is_first_choice() -> None:
    assert available_backends()[0] == "litert"
    assert available_backends()[-1] == "numpy"


def test_falls_back_to_tflite_runtime_then_numpy(
    digits_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without LiteRT the next backend loads; a backend that imports but cannot run is skipped."""
    from types import SimpleNamespace

    from fedge.models import runtime as rtmod

    real = rtmod._import_backend

    class BrokenInterpreter:
        def __init__(self, **_: object) -> None:
            raise SystemError("numpy.core.multiarray failed to import")

    def fake(backend: str):  # type: ignore[no-untyped-def]
        if backend == "litert":
            raise ImportError("No module named 'ai_edge_litert'")
        if backend == "tflite_runtime":
            return SimpleNamespace(Interpreter=BrokenInterpreter)
        return real(backend)

    monkeypatch.setattr(rtmod, "_import_backend", fake)
    with caplog.at_level(logging.WARNING, logger="fedge.models"):
        rt = load_runtime(digits_model)
    assert rt.backend == "numpy"
    assert "tflite_runtime is installed but unusable" in caplog.text

    # tflite-runtime's module has the same interface as LiteRT's: stand LiteRT in for it.
    monkeypatch.setattr(
        rtmod, "_import_backend", lambda b: real("litert") if b == "tflite_runtime" else fake(b)
    )
    rt = load_runtime(digits_model)
    assert rt.backend == "tflite_runtime"
    assert rt.train_step(*batches(1)[0], 0.1) > 0


def test_no_backend_at_all_is_a_clear_error(
    digits_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedge.models import runtime as rtmod

    def missing(backend: str):  # type: ignore[no-untyped-def]
        raise ImportError(f"no {backend}")

    monkeypatch.setattr(rtmod, "_import_backend", missing)
    with pytest.raises(rtmod.BackendUnavailable, match="no litert"):
        load_runtime(digits_model, prefer=("litert", "tflite_runtime"))


def test_fedprox_step_matches_numpy_reference(digits_model: Path) -> None:
    """mu > 0 adds mu * (w - anchor) to every gradient; the anchor is what set_weights set."""
    lite = load_runtime(digits_model, prefer=("litert",))
    ref = load_runtime(digits_model, prefer=("numpy",))
    assert lite.supports_prox
    rng = np.random.default_rng(7)
    anchor = {
        k: rng.normal(scale=0.2, size=v.shape).astype(np.float32)
        for k, v in ref.get_weights().items()
    }
    lite.set_weights(anchor)
    ref.set_weights(anchor)
    for x, y in batches(15, seed=3):
        assert lite.train_step(x, y, 0.1, mu=0.5) == pytest.approx(
            ref.train_step(x, y, 0.1, mu=0.5), abs=1e-5
        )
    for k, v in ref.get_weights().items():
        np.testing.assert_allclose(lite.get_weights()[k], v, atol=1e-5)


def test_fedprox_pulls_towards_the_anchor(digits_model: Path) -> None:
    plain = load_runtime(digits_model, prefer=("litert",))
    prox = load_runtime(digits_model, prefer=("litert",))
    start = plain.get_weights()

    def distance(rt) -> float:  # type: ignore[no-untyped-def]
        w = rt.get_weights()
        return float(sum(np.sum((w[k] - start[k]) ** 2) for k in start))

    for x, y in batches(30, seed=4):
        plain.train_step(x, y, 0.2, mu=0.0)
        prox.train_step(x, y, 0.2, mu=2.0)
    assert distance(prox) < 0.7 * distance(plain)


def test_fedprox_reference_gradient_by_finite_differences() -> None:
    """The numpy oracle's proximal gradient is the derivative of loss + mu/2 ||w - a||^2."""
    from fedge.models import maths
    from fedge.models.spec import DenseLayer, ModelSpec

    spec = ModelSpec(name="tiny", input_size=3, layers=(DenseLayer(units=4),), outputs=2, seed=1)
    rng = np.random.default_rng(0)
    w = {k: v.astype(np.float64) for k, v in spec.initial_weights().items()}
    anchor = {k: v + rng.normal(scale=0.1, size=v.shape) for k, v in w.items()}
    x = rng.normal(size=(5, 3))
    y = rng.integers(0, 2, 5)
    mu, lr = 0.7, 1e-3

    def objective(weights: dict) -> float:  # type: ignore[type-arg]
        data, _ = maths.loss_and_grads(spec, weights, x, y)
        return data + mu / 2 * sum(np.sum((weights[k] - anchor[k]) ** 2) for k in weights)

    stepped = {k: v.copy() for k, v in w.items()}
    maths.sgd_step(spec, stepped, x, y, lr, mu, anchor)
    name, idx, eps = "dense0_kernel", (1, 2), 1e-6
    plus = {k: v.copy() for k, v in w.items()}
    minus = {k: v.copy() for k, v in w.items()}
    plus[name][idx] += eps
    minus[name][idx] -= eps
    numeric = (objective(plus) - objective(minus)) / (2 * eps)
    analytic = (w[name][idx] - stepped[name][idx]) / lr
    assert analytic == pytest.approx(numeric, rel=1e-3)
