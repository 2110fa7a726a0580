"""A backend is proven in a child process before it is trusted, and the verdict remembered.

Broken backends are simulated in the child only: a ``sitecustomize.py`` on PYTHONPATH
replaces ``InterpreterRuntime.train_step`` there with one that segfaults, hangs or returns
wrong numbers. The parent (this process) keeps the real LiteRT.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fedge.models import selftest
from fedge.models.metadata import add_metadata
from fedge.models.runtime import BackendUnavailable, ModelLoadError
from fedge.models.selftest import CACHE_FILE, load_proven_runtime
from helpers import REPO

pytestmark = pytest.mark.unit

FORECASTER = REPO / "models" / "artifacts" / "machine_forecaster.tflite"

BROKEN = {
    "segfault": "os.kill(os.getpid(), signal.SIGSEGV)",
    "hang": "time.sleep(60)",
    "wrong": "return _real(self, x, y, lr, mu) + 1e-3",
}
SITECUSTOMIZE = """\
import os, signal, time
from fedge.models import runtime as _runtime

_real = _runtime.InterpreterRuntime.train_step


def train_step(self, x, y, lr, mu=0.0):
    {body}


_runtime.InterpreterRuntime.train_step = train_step
"""


def break_backend_in_children(monkeypatch: pytest.MonkeyPatch, folder: Path, how: str) -> None:
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(body=BROKEN[how]))
    path = [str(folder), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))


def count_children(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every child the self-test starts (and still start it)."""
    started: list[Path] = []
    real = selftest._run_child

    def counted(workdir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        started.append(workdir)
        return real(workdir, timeout)

    monkeypatch.setattr(selftest, "_run_child", counted)
    return started


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def trains(rt) -> bool:  # type: ignore[no-untyped-def]
    before = rt.get_weights()
    rng = np.random.default_rng(0)
    rt.train_step(rng.random((8, 64), dtype=np.float32), np.arange(8, dtype=np.int32), 0.1)
    return any(not np.array_equal(v, before[k]) for k, v in rt.get_weights().items())


@pytest.mark.parametrize(
    ("how", "timeout", "why"),
    [
        ("segfault", 60.0, "self-test died of signal 11 (SIGSEGV)"),
        ("hang", 1.5, "self-test did not finish within 1.5 s"),
        ("wrong", 60.0, "disagrees with the numpy reference: train_loss off by 0.001"),
    ],
)
def test_broken_backend_is_skipped_with_one_line_and_remembered(
    digits_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    how: str,
    timeout: float,
    why: str,
) -> None:
    break_backend_in_children(monkeypatch, tmp_path / "site", how)
    started = count_children(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fedge.models"):
        rt = load_proven_runtime(
            digits_model, prefer=("litert", "numpy"), cache_dir=tmp_path, timeout=timeout
        )
    assert rt.backend == "numpy" and trains(rt)
    [line] = warnings_of(caplog)
    assert line.startswith(f"runtime litert skipped: {why}"), line

    caplog.clear()  # the next start: no child, the same verdict, said to be remembered
    with caplog.at_level(logging.WARNING, logger="fedge.models"):
        again = load_proven_runtime(
            digits_model, prefer=("litert", "numpy"), cache_dir=tmp_path, timeout=timeout
        )
    assert again.backend == "numpy" and len(started) == 1
    [line] = warnings_of(caplog)
    assert line.startswith(f"runtime litert skipped: {why}") and "remembered from" in line


def test_without_a_fallback_the_reasons_are_the_error(
    digits_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    break_backend_in_children(monkeypatch, tmp_path / "site", "segfault")
    with pytest.raises(BackendUnavailable, match=r"litert \(self-test died of signal 11"):
        load_proven_runtime(digits_model, prefer=("litert",), cache_dir=tmp_path)


def test_litert_passes_and_the_verdict_is_kept_until_the_model_changes(
    digits_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model.tflite"
    model.write_bytes(digits_model.read_bytes())
    started = count_children(monkeypatch)
    rt = load_proven_runtime(model, cache_dir=tmp_path / "state")
    assert rt.backend == "litert" and trains(rt) and len(started) == 1
    saved = json.loads((tmp_path / "state" / CACHE_FILE).read_text())
    [verdict] = saved["verdicts"]
    assert verdict["ok"] and verdict["key"]["backend"] == "litert"

    assert load_proven_runtime(model, cache_dir=tmp_path / "state").backend == "litert"
    assert len(started) == 1  # remembered: no child

    model.write_bytes(FORECASTER.read_bytes())  # a new model: tested again
    assert load_proven_runtime(model, cache_dir=tmp_path / "state").backend == "litert"
    assert len(started) == 2
    assert load_proven_runtime(model, cache_dir=tmp_path / "state").backend == "litert"
    assert len(started) == 2


def test_corrupt_cache_is_survived_and_rewritten(
    digits_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = tmp_path / CACHE_FILE
    cache.write_bytes(b'{"format": 1, "verdicts": [{"key": \x00\xff')
    started = count_children(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fedge.models"):
        rt = load_proven_runtime(digits_model, cache_dir=tmp_path)
    assert rt.backend == "litert" and len(started) == 1
    [line] = warnings_of(caplog)
    assert f"runtime self-test cache {cache} unreadable" in line
    assert json.loads(cache.read_text())["verdicts"][0]["ok"]
    load_proven_runtime(digits_model, cache_dir=tmp_path)
    assert len(started) == 1


def test_model_without_a_spec_is_held_to_finite_numbers(
    digits_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No numpy reference to compare with: the child shapes its batch from the signature."""
    model = tmp_path / "custom.tflite"
    model.write_bytes(add_metadata(digits_model.read_bytes(), "fedge_spec", b"not a spec"))
    started = count_children(monkeypatch)
    assert load_proven_runtime(model, prefer=("litert",)).backend == "litert"
    assert len(started) == 1


def test_a_damaged_model_is_the_models_fault_not_the_backends(
    digits_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match="litert cannot load the model"):
        load_proven_runtime(digits_model.read_bytes()[:4000], cache_dir=tmp_path)
    assert not (tmp_path / CACHE_FILE).exists()  # no verdict on the backend to remember


def test_a_timeout_is_tested_again_a_day_later_a_crash_is_not() -> None:
    from datetime import datetime, timedelta, timezone

    from fedge.models.selftest import Verdict, _worth_retrying

    key = None  # not looked at

    def verdict(reason: str, hours: float) -> Verdict:
        when = datetime.now(timezone.utc) - timedelta(hours=hours)
        return Verdict.model_construct(
            key=key, ok=False, reason=reason, seconds=1.0, tested_at=when.isoformat()
        )

    hang = "self-test did not finish within 60 s"
    assert not _worth_retrying(verdict(hang, 1))
    assert _worth_retrying(verdict(hang, 25))
    assert not _worth_retrying(verdict("self-test died of signal 11 (SIGSEGV)", 25))
