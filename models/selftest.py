"""Prove a runtime backend in a child process before the agent trusts it.

A backend that segfaults or hangs in ``train`` (LiteRT 2.3.0 on emulated arm64 did) cannot
be caught in the process that runs it: a signal is not an exception, and the agent would die
on every restart. So before the agent loads an interpreter backend it runs this module in a
child (``python -m fedge.models.selftest WORKDIR``), which loads the model, sets known
weights, trains a few steps on a fixed synthetic batch shaped from the model, evaluates,
infers and writes what came out. The parent compares that with the numpy reference runtime
on the same weights and batches (within :data:`RTOL` and :data:`ATOL`)::

    rt = load_proven_runtime("digits_mlp.tflite", cache_dir=Path("/var/lib/fedge"))

A backend that crashes, hangs (``timeout``) or disagrees is skipped with one WARNING line
saying why, and the next one in ``prefer`` is tried. The numpy reference is the oracle and
is trusted without a test; for a model without an embedded spec there is no reference, and
its backends are only held to surviving with finite numbers. Verdicts are remembered in
``cache_dir/runtime-selftest.json`` (replaced atomically) until the model file, the
backend's version, the runtime settings, fedge, Python, numpy or the machine change.

Errors: :class:`~fedge.models.runtime.BackendUnavailable` when no backend in ``prefer``
passed, :class:`~fedge.models.runtime.ModelLoadError` when the model itself cannot be loaded.
"""

from __future__ import annotations

import faulthandler
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from .runtime import (
    BACKENDS,
    BackendUnavailable,
    InterpreterRuntime,
    ModelLoadError,
    NumpyRuntime,
    Runtime,
    RuntimeError_,
    backend_version,
    check_backends,
    embedded_spec,
    load_runtime,
    model_bytes,
)
from .spec import ModelSpec

log = logging.getLogger("fedge.models")

CACHE_FILE = "runtime-selftest.json"
MAX_VERDICTS = 16  # several models or settings may share a state_dir; older verdicts go
DEFAULT_TIMEOUT = 60.0  # seconds per backend; a healthy test takes 0.25 s on an x86_64 PC
# Agreement with the numpy reference: |got - ref| <= ATOL + RTOL * |ref|, elementwise. LiteRT
# on x86_64 is within 3e-7 of it on the committed models.
RTOL = 1e-5
ATOL = 1e-5
STEPS = 3  # training steps; the last one with FedProx's mu when the model takes it
BATCH = 16
LR = 0.05
MU = 0.5
SEED = 20240

_EXIT_FAILED = 2  # the backend failed with an exception; the reason is on stderr
_EXIT_MODEL = 3  # the model cannot be loaded: a problem of the model, not of the backend
_REASON = "selftest: "  # marks the child's one-line reason on stderr


class SelfTestKey(BaseModel):
    """Everything a verdict depends on; a change in any field means testing again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_sha256: str
    backend: str
    backend_version: str
    num_threads: int
    delegates: tuple[str, ...]
    fedge: str
    python: str
    numpy: str
    machine: str


class Verdict(BaseModel):
    """What one self-test found, as remembered in the cache file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: SelfTestKey
    ok: bool
    reason: str  # why the backend was refused; empty when ok
    seconds: float
    tested_at: str  # ISO 8601, UTC


class _CacheFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    verdicts: list[Verdict] = []


# --- the test itself: the same steps in the child and for the reference ---------------------


def synthetic_batches(
    x_shape: tuple[int, ...],
    y_shape: tuple[int, ...],
    labels: int | None,
    start: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Fixed training and evaluation batches for one example shape, and the start weights.

    ``labels``: class count for integer labels (0 when unknown: all labels 0), None for
    float targets.
    """
    rng = np.random.default_rng(SEED)

    def xs(*lead: int) -> np.ndarray:
        return rng.random((*lead, *x_shape), dtype=np.float32)

    def ys(*lead: int) -> np.ndarray:
        if labels is None:
            return rng.normal(size=(*lead, *y_shape)).astype(np.float32)
        return rng.integers(0, max(labels, 1), (*lead, *y_shape)).astype(np.int32)

    batches = {"x": xs(STEPS, BATCH), "y": ys(STEPS, BATCH), "eval_x": xs(BATCH)}
    batches["eval_y"] = ys(BATCH)
    batches["mu"] = np.array([0.0] * (STEPS - 1) + [MU], np.float32)
    batches.update({f"start_{name}": np.asarray(w, np.float32) for name, w in start.items()})
    return batches


def exercise(rt: Runtime, batches: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Set the start weights, train, evaluate and infer; every number that came out."""
    rt.set_weights(
        {k.removeprefix("start_"): v for k, v in batches.items() if k.startswith("start_")}
    )
    mu = batches["mu"] if rt.supports_prox else np.zeros_like(batches["mu"])
    losses = [
        rt.train_step(batches["x"][i], batches["y"][i], LR, float(mu[i])) for i in range(len(mu))
    ]
    loss, metric = rt.evaluate(batches["eval_x"], batches["eval_y"])
    out = {
        "mu": mu,
        "train_loss": np.array(losses, np.float32),
        "eval_loss": np.float32(loss),
        "eval_metric": np.float32(metric),
        "logits": rt.infer(batches["eval_x"]),
    }
    out.update({f"w_{name}": w for name, w in rt.get_weights().items()})
    return out


def _disagreement(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray] | None) -> str:
    """Why the child's numbers are not to be trusted; empty if they are."""
    for name, value in got.items():
        if not np.all(np.isfinite(value)):
            return f"self-test gave non-finite {name}"
    if ref is None:
        return ""
    if sorted(got) != sorted(ref):
        return f"self-test gave {sorted(got)}, the numpy reference {sorted(ref)}"
    for name in ("train_loss", "eval_loss", "logits", *sorted(k for k in ref if k[:2] == "w_")):
        a, b = np.asarray(got[name]), np.asarray(ref[name])
        if a.shape != b.shape:
            return f"self-test gave {name} of shape {a.shape}, the numpy reference {b.shape}"
        if not np.allclose(a, b, rtol=RTOL, atol=ATOL):
            off = float(np.max(np.abs(a.astype(np.float64) - b)))
            return (
                f"disagrees with the numpy reference: {name} off by {off:.3g}"
                f" (tolerance {ATOL:g} + {RTOL:g} x |reference|)"
            )
    return ""


# --- the child ------------------------------------------------------------------------------


def _child(workdir: Path) -> int:
    """Run the self-test described in ``workdir/job.json``; write ``workdir/result.npz``."""
    faulthandler.enable()  # a crash leaves a Python traceback on stderr for the parent's log
    job = json.loads((workdir / "job.json").read_text())
    try:
        rt = load_runtime(
            workdir / "model.tflite",
            prefer=(job["backend"],),
            delegates=job["delegates"],
            num_threads=job["num_threads"],
        )
    except ModelLoadError as exc:
        print(f"{_REASON}{exc}", file=sys.stderr)
        return _EXIT_MODEL
    except RuntimeError_ as exc:
        print(f"{_REASON}{exc}", file=sys.stderr)
        return _EXIT_FAILED
    try:
        if (workdir / "batches.npz").exists():
            with np.load(workdir / "batches.npz") as saved:
                batches = dict(saved)
        else:  # no embedded spec: shapes from the train signature, labels all 0
            assert isinstance(rt, InterpreterRuntime)
            x_shape, y_shape, y_dtype = rt.example_shapes()
            labels = 0 if np.issubdtype(y_dtype, np.integer) else None
            batches = synthetic_batches(x_shape, y_shape, labels, rt.get_weights())
        out = exercise(rt, batches)
    except Exception as exc:  # whatever the backend raised is the verdict, sent to the parent
        print(f"{_REASON}{type(exc).__name__}: {exc}", file=sys.stderr)
        return _EXIT_FAILED
    np.savez(workdir / "result.npz", **out)  # type: ignore[arg-type]  # numpy stubs mistype **kwds
    return 0


# --- the parent -----------------------------------------------------------------------------


def _run_child(workdir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge.models.selftest", str(workdir)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _child_reason(stderr: str) -> str | None:
    """The one-line reason the child gave, if it gave one."""
    ours = [line for line in stderr.splitlines() if line.startswith(_REASON)]
    return ours[-1].removeprefix(_REASON) if ours else None


def _why_child_failed(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = "unknown signal"
        return f"self-test died of signal {-proc.returncode} ({name})"
    reason = _child_reason(proc.stderr)
    if reason is not None:
        return f"self-test failed: {reason}"
    lines = proc.stderr.strip().splitlines()
    last = lines[-1] if lines else "no output"
    return f"self-test exited with status {proc.returncode}: {last}"


def _test_backend(
    data: bytes,
    backend: str,
    spec: ModelSpec | None,
    *,
    delegates: Sequence[str],
    num_threads: int,
    timeout: float,
) -> str:
    """Run one backend's self-test in a child; why it failed, or "" if it passed."""
    with tempfile.TemporaryDirectory(prefix="fedge-selftest-") as tmp:
        workdir = Path(tmp)
        (workdir / "model.tflite").write_bytes(data)
        job = {"backend": backend, "delegates": list(delegates), "num_threads": num_threads}
        (workdir / "job.json").write_text(json.dumps(job))
        batches = None
        if spec is not None:
            labels = None if spec.loss == "mse" else spec.outputs
            y_shape = (spec.outputs,) if spec.loss == "mse" else ()
            batches = synthetic_batches((spec.input_size,), y_shape, labels, spec.initial_weights())
            np.savez(workdir / "batches.npz", **batches)  # type: ignore[arg-type]  # numpy stubs mistype **kwds
        try:
            proc = _run_child(workdir, timeout)
        except subprocess.TimeoutExpired:
            return f"self-test did not finish within {timeout:g} s"
        except OSError as exc:
            return f"self-test could not start a child process ({exc})"
        if proc.stderr:
            log.debug("runtime %s self-test said: %s", backend, proc.stderr.strip())
        if proc.returncode == _EXIT_MODEL:
            raise ModelLoadError(_child_reason(proc.stderr) or _why_child_failed(proc))
        if proc.returncode != 0:
            return _why_child_failed(proc)
        try:
            with np.load(workdir / "result.npz") as saved:
                got = dict(saved)
        except (OSError, ValueError) as exc:
            return f"self-test left no readable result ({exc})"
    ref = None
    if batches is not None and spec is not None:
        ref = exercise(NumpyRuntime(spec), {**batches, "mu": got.get("mu", batches["mu"])})
    return _disagreement(got, ref)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Cache:
    """The verdicts file: read leniently, written atomically (write, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = self._read()

    def _read(self) -> _CacheFile:
        try:
            return _CacheFile.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return _CacheFile()
        except (OSError, ValidationError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not a self-test cache"
            log.warning(
                "runtime self-test cache %s unreadable (%s); testing again and rewriting it",
                self.path,
                why,
            )
            return _CacheFile()

    def get(self, key: SelfTestKey) -> Verdict | None:
        return next((v for v in self._file.verdicts if v.key == key), None)

    def put(self, verdict: Verdict) -> None:
        """Remember ``verdict`` in place of its backend's older one; keep the newest few."""
        older = verdict.key.model_dump(exclude={"backend_version"})
        kept = [
            v for v in self._file.verdicts if v.key.model_dump(exclude={"backend_version"}) != older
        ]
        self._file.verdicts = [*kept, verdict][-MAX_VERDICTS:]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as fh:
                fh.write(self._file.model_dump_json(indent=1))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning(
                "runtime self-test result not saved to %s (%s); it runs again at the next start",
                self.path,
                exc.strerror or exc,
            )
            tmp.unlink(missing_ok=True)


def load_proven_runtime(
    model: str | Path | bytes,
    *,
    prefer: Sequence[str] = BACKENDS,
    delegates: Sequence[str] = (),
    num_threads: int = 1,
    cache_dir: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Runtime:
    """Load ``model`` on the first backend of ``prefer`` that passes its self-test.

    Arguments as for :func:`~fedge.models.runtime.load_runtime`; ``cache_dir`` holds the
    verdicts (None: test every time), ``timeout`` bounds each child in seconds.
    """
    data = model_bytes(model)
    check_backends(prefer)
    try:
        spec = embedded_spec(data)
    except ModelLoadError as exc:
        log.debug("no numpy reference for the self-test: %s", exc)
        spec = None
    cache = None if cache_dir is None else _Cache(cache_dir / CACHE_FILE)
    here = {
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "num_threads": num_threads,
        "delegates": tuple(delegates),
        "fedge": _version("fedge"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
    }
    tried = []
    for backend in prefer:
        if backend == "numpy":  # the reference: pure numpy, trusted
            return load_runtime(data, prefer=("numpy",))
        version = backend_version(backend)
        if version is None:
            tried.append(f"{backend} (not installed)")
            log.debug("runtime backend %s not installed", backend)
            continue
        key = SelfTestKey(backend=backend, backend_version=version, **here)
        verdict = None if cache is None else cache.get(key)
        if verdict is not None and _worth_retrying(verdict):
            verdict = None  # a hang or a failed fork may have been the moment, not the backend
        remembered = verdict is not None
        if verdict is None:
            started = time.monotonic()
            reason = _test_backend(
                data, backend, spec, delegates=delegates, num_threads=num_threads, timeout=timeout
            )
            verdict = Verdict(
                key=key,
                ok=not reason,
                reason=reason,
                seconds=round(time.monotonic() - started, 3),
                tested_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            log.debug("runtime %s %s self-test in %.2f s", backend, version, verdict.seconds)
            if cache is not None:
                cache.put(verdict)
        if not verdict.ok:
            since = f" (remembered from {verdict.tested_at})" if remembered else ""
            log.warning("runtime %s skipped: %s%s", backend, verdict.reason, since)
            tried.append(f"{backend} ({verdict.reason})")
            continue
        try:
            return load_runtime(
                data, prefer=(backend,), delegates=delegates, num_threads=num_threads
            )
        except BackendUnavailable as exc:
            tried.append(str(exc))
    raise BackendUnavailable("no runtime backend passed its self-test: " + "; ".join(tried))


if __name__ == "__main__":
    sys.exit(_child(Path(sys.argv[1])))


RETRY_TRANSIENT_AFTER_S = 24 * 3600  # a timeout or a failed fork is tested again after this
_TRANSIENT = ("self-test did not finish", "self-test could not start")


def _worth_retrying(verdict: Verdict) -> bool:
    if verdict.ok or not verdict.reason.startswith(_TRANSIENT):
        return False
    try:
        tested = datetime.fromisoformat(verdict.tested_at)
    except ValueError:
        return True
    return (datetime.now(timezone.utc) - tested).total_seconds() > RETRY_TRANSIENT_AFTER_S
