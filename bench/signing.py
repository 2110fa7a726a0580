"""What signing costs: Ed25519 over each round announcement and global model.

The aggregator signs once per round; every agent verifies the announcement and the global
model it receives. Prints the median time (and min-max) of signing and verifying the bundled
models' global payloads and a round announcement, and the bytes a signature adds.

    .venv/bin/python bench/signing.py [--repeats 201]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedge.models.runtime import load_runtime
from fedge.protocol import (
    GlobalModelHeader,
    RoundAnnouncement,
    TrainingConfig,
    encode,
    sign,
    verify,
)
from fedge.protocol.signing import OVERHEAD, verify_key

ARTIFACTS = Path(__file__).resolve().parent.parent / "models" / "artifacts"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, repeats: int) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples), min(samples), max(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=201)
    args = parser.parse_args()
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"
    )
    key = Ed25519PrivateKey.generate()
    keys = [verify_key(key)]
    payloads = {}
    for name in ("digits_mlp", "digits_mlp_50k"):
        weights = load_runtime(ARTIFACTS / f"{name}.tflite", prefer=("numpy",)).get_weights()
        header = GlobalModelHeader(fleet="bench", model_version=1, round_id=1)
        payloads[f"global {name}"] = ("global", encode(header, weights))
    ann = RoundAnnouncement(
        fleet="bench",
        round_id=1,
        model_version=0,
        deadline=0.0,
        selected=tuple(f"dev{i:03d}" for i in range(100)),
        config=TrainingConfig(),
    )
    payloads["round, 100 devices"] = ("round", encode(ann))
    print(f"{'payload':28s} {'bytes':>9s} {'+sig':>5s} {'sign us':>22s} {'verify us':>22s}")
    for label, (kind, envelope) in payloads.items():
        signed = sign(envelope, key, fleet="bench", kind=kind)
        s = timed(lambda e=envelope, k=kind: sign(e, key, fleet="bench", kind=k), args.repeats)
        v = timed(lambda d=signed, k=kind: verify(d, keys, fleet="bench", kind=k), args.repeats)
        print(
            f"{label:28s} {len(envelope):9d} {OVERHEAD:5d} "
            f"{s[0]:9.1f} [{s[1]:.1f}-{s[2]:.1f}] {v[0]:9.1f} [{v[1]:.1f}-{v[2]:.1f}]"
        )


if __name__ == "__main__":
    main()
