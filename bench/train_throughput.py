"""Training throughput and peak memory of each runtime backend on the digits MLP.

Prints figures and never fails on a time; the figures worth keeping go to
``bench/README.md`` with the command that produced them.

Throughput: every backend that loads (litert, tflite_runtime, numpy) trains the
same model through the agent's path, ``fedge.agent.trainer.train_local``, on
the same batches (scikit-learn's digits, one seeded generator per run), after a
warm-up. The backends take turns within each repetition, in a rotating order,
so that a noisy neighbour on a shared machine hurts them alike; the table gives
the median and the min-max over the repetitions.

Memory: each backend also runs ``train_local`` over the digits partition (an
``.npz``, loaded as the agent loads it) in a fresh child process, which reports
its own peak RSS (VmHWM, see :func:`peak_rss_kib`); a second child only imports
numpy, ``fedge.models.runtime`` and the backend's interpreter module, so the
cost of training shows as the difference. A backend whose child fails or
crashes is reported in one line and left out of the timing.

    python bench/train_throughput.py [--epochs 30] [--batch-size 32] [--repeats 21]
"""

# ruff: noqa: E402 - the thread variables below must be set before numpy loads
from __future__ import annotations

import os

# One BLAS thread everywhere, set before numpy loads; the children inherit it.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from machine import machine_line  # bench/machine.py

MODEL = Path(__file__).resolve().parent.parent / "models" / "artifacts" / "digits_mlp.tflite"
BACKENDS = ("litert", "tflite_runtime", "numpy")
INTERPRETER_MODULE = {
    "litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
}
NUM_THREADS = 1


# --- child: one fresh process, reports its own peak RSS ---------------------------------


def peak_rss_kib() -> int:
    """This process's peak RSS: VmHWM, which starts afresh at exec.

    Not ``ru_maxrss``: Linux carries the parent's peak over fork and exec into the
    child's, so every child would report at least the parent's size.
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # without /proc: an upper bound


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


def child(args: argparse.Namespace) -> int:
    out: dict[str, object] = {"backend": args.child}
    try:
        import fedge.models.runtime  # noqa: F401 - what the baseline pays for

        if args.child in INTERPRETER_MODULE:
            importlib.import_module(INTERPRETER_MODULE[args.child])
        if not args.import_only:
            from fedge.agent.dataset import load_npz
            from fedge.agent.trainer import train_local
            from fedge.models.runtime import load_runtime

            data = load_npz(args.data)
            rt = load_runtime(MODEL, prefer=(args.child,), num_threads=NUM_THREADS)
            res = train_local(
                rt,
                data,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                rng=np.random.default_rng(args.seed),
            )
            out.update(steps=res.steps, loss=res.loss)
    except Exception as exc:  # reported to the parent in one line, exit status 1
        out["error"] = _root_cause(exc)
        print(json.dumps(out))
        return 1
    out["peak_kib"] = peak_rss_kib()
    print(json.dumps(out))
    return 0


def run_child(backend: str, data: Path, args: argparse.Namespace, *, import_only: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        backend,
        "--data",
        str(data),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
    ]
    if import_only:
        cmd.append("--import-only")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"error": "child still running after 300 s, stopped"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        result = json.loads(lines[-1])
        if proc.returncode == 0 or "error" in result:
            return result
    if proc.returncode < 0:
        return {"error": f"child crashed (signal {-proc.returncode})"}
    tail = proc.stderr.strip().splitlines()
    return {"error": f"child exited {proc.returncode}: {tail[-1] if tail else 'no output'}"}


# --- parent ----------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Hide the C++ runtimes' INFO lines (fd 2) while interpreters are created."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def digits():  # type: ignore[no-untyped-def]
    from fedge.agent.dataset import Dataset
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return Dataset((x / 16.0).astype(np.float32), y.astype(np.int32))


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def parent(args: argparse.Namespace) -> int:
    from fedge.agent.trainer import train_local
    from fedge.models.runtime import load_runtime

    data = digits()
    n = len(data)
    steps_per_epoch = -(-n // args.batch_size)
    samples = n * args.epochs
    print("fedge training throughput: digits_mlp.tflite (64-64-10 MLP, softmax cross-entropy)")
    print(f"machine: {machine_line()}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"ai-edge-litert {version('ai-edge-litert')}, tflite-runtime {version('tflite-runtime')}"
    )
    print(
        f"data: sklearn digits, {n} samples; "
        f"batch {args.batch_size} ({steps_per_epoch} steps/epoch), "
        f"{args.epochs} epochs = {samples} samples per run, lr {args.lr}, seed {args.seed}; "
        f"{args.repeats} interleaved repetitions after 1 warm-up run; "
        f"num_threads={NUM_THREADS}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}"
    )

    # Memory first, in fresh processes; a backend whose child fails is reported and skipped.
    rss: dict[str, tuple[dict, dict]] = {}
    problems: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "digits.npz"
        np.savez(npz, x=data.x, y=data.y)
        for backend in BACKENDS:
            module = INTERPRETER_MODULE.get(backend)
            if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
                problems[backend] = "not installed"
                continue
            imported = run_child(backend, npz, args, import_only=True)
            trained = run_child(backend, npz, args, import_only=False)
            error = imported.get("error") or trained.get("error")
            if error:
                problems[backend] = f"unusable here ({error})"
                continue
            rss[backend] = (imported, trained)
    usable = [b for b in BACKENDS if b in rss]

    runtimes = {}
    for backend in usable:
        with quiet_stderr():
            runtimes[backend] = load_runtime(MODEL, prefer=(backend,), num_threads=NUM_THREADS)
    initial = {b: rt.get_weights() for b, rt in runtimes.items()}

    def one_run(backend: str, epochs: int) -> tuple[float, float]:
        rt = runtimes[backend]
        rt.set_weights(initial[backend])
        rng = np.random.default_rng(args.seed)  # the same batches for every backend and run
        gc.collect()
        start = time.perf_counter()
        res = train_local(rt, data, epochs=epochs, batch_size=args.batch_size, lr=args.lr, rng=rng)
        return n * epochs / (time.perf_counter() - start), res.loss

    for backend in usable:
        one_run(backend, args.epochs)  # warm-up: allocations, caches, both batch shapes
    rates: dict[str, list[float]] = {b: [] for b in usable}
    losses: dict[str, float] = {}
    for rep in range(args.repeats):
        k = rep % max(len(usable), 1)
        for backend in usable[k:] + usable[:k]:
            rate, losses[backend] = one_run(backend, args.epochs)
            rates[backend].append(rate)

    print()
    head = (
        f"{'backend':<15} {'samples/s median [min-max]':>34} {'final loss':>10}  "
        f"{'RSS import':>10} {'RSS train':>10} {'train-import':>12}"
    )
    print(head)
    print("-" * len(head))
    for backend in BACKENDS:
        if backend in problems:
            print(f"{backend:<15} {problems[backend]}")
            continue
        r = rates[backend]
        spread = f"{statistics.median(r):>10,.0f} [{min(r):,.0f}-{max(r):,.0f}]"
        imp, tr = (x["peak_kib"] for x in rss[backend])
        print(
            f"{backend:<15} {spread:>34} {losses[backend]:>10.4f}  {mib(imp):>10} {mib(tr):>10} "
            f"{'+' + mib(tr - imp):>12}"
        )
    if "numpy" in rss:
        print(
            f"baseline: a child that imports only numpy and fedge.models.runtime peaks at "
            f"{mib(rss['numpy'][0]['peak_kib'])} (the numpy row's 'RSS import')"
        )
    print(
        "RSS = peak RSS (VmHWM) of a fresh child; 'import': the baseline plus the backend's "
        f"interpreter module; 'train': train_local for {args.epochs} epochs over the digits .npz"
    )
    if "numpy" in losses:
        diffs = [abs(losses[b] - losses["numpy"]) for b in usable]
        worst = max(diffs)
        print(f"same batches, same maths: final losses differ from numpy's by at most {worst:.2g}")

    print()
    for backend in ("litert", "tflite_runtime"):
        if backend not in rates or "numpy" not in rates:
            if backend == "litert":
                print("ratio litert vs numpy: n/a (no figures for one of them)")
            continue
        paired = [a / b for a, b in zip(rates[backend], rates["numpy"], strict=True)]
        ratio = statistics.median(rates[backend]) / statistics.median(rates["numpy"])
        print(
            f"ratio {backend} vs numpy: {ratio:.2f}x samples/s (ratio of medians; "
            f"per-repetition ratios {min(paired):.2f}-{max(paired):.2f})"
        )
    return 0


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=positive, default=30, help="epochs per run (30)")
    p.add_argument("--batch-size", type=positive, default=32, help="mini-batch size (32)")
    p.add_argument("--repeats", type=positive, default=21, help="timed runs per backend (21)")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate (0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order (0)")
    p.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--import-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
