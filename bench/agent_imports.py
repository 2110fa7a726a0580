"""What each part of an agent costs in resident memory: ``VmRSS`` after each import, in one
process, in the order an agent loads them; then what the modules an agent loads only when
its config or a round asks for them would add.

Each step is measured in a fresh child process ``--repeats`` times and the medians are
printed (``VmRSS`` moves in whole pages and the interpreter's 1 MiB arenas, so a step
measured once can be off by an arena). The figures depend on the order: a library that a
later step also needs is counted where it is first loaded.

    .venv/bin/python bench/agent_imports.py
    .venv/bin/python bench/agent_imports.py --model models/artifacts/digits_mlp_50k.tflite
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from machine import machine_line  # bench/machine.py

MODEL = Path(__file__).resolve().parent.parent / "models" / "artifacts" / "digits_mlp.tflite"

# (what, modules to import); "model" loads and trains the model on LiteRT.
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("numpy", ("numpy",)),
    ("pydantic (and pydantic-core)", ("pydantic.main",)),
    ("hashlib (OpenSSL's libcrypto)", ("hashlib",)),
    ("PyNaCl (libsodium's Ed25519: signed models)", ("nacl.signing",)),
    ("ssl", ("ssl",)),
    ("paho-mqtt", ("paho.mqtt.client",)),
    ("fedge.protocol (the wire's models)", ("fedge.protocol",)),
    (
        "fedge agent modules (cli, service, daemon, link)",
        ("fedge.cli", "fedge.agent.service", "fedge.protocol.paho_link"),
    ),
    ("LiteRT interpreter (import)", ("ai_edge_litert.interpreter",)),
    ("LiteRT with the model loaded, 20 train steps", ("model",)),
]
# Loaded only when a round or the config asks for them (measured after the steps above).
LAZY: list[tuple[str, tuple[str, ...]]] = [
    (
        "secure aggregation (a secure round), cryptography",
        ("fedge.protocol.secagg", "fedge.agent.secure"),
    ),
    ("homomorphic encryption module (without TenSEAL)", ("fedge.protocol.he",)),
    ("Prometheus metrics (metrics_port)", ("fedge.metrics",)),
    ("serial path: pyserial, SQLite store ([serial])", ("fedge.agent.sensor_source",)),
]


# The child: nothing imported before the first reading but what the interpreter itself loads.
CHILD = """
import sys

def vm_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

rss = [vm_rss()]
import importlib, json
model, steps = sys.argv[1], json.loads(sys.argv[2])
for modules in steps:
    for name in modules:
        if name != "model":
            importlib.import_module(name)
            continue
        import numpy as np
        from fedge.models.runtime import load_runtime
        with open(model, "rb") as f:
            rt = load_runtime(f.read(), prefer=("litert",))
        x_shape, y_shape, y_dtype = rt.example_shapes()
        x, y = np.zeros((32, *x_shape), np.float32), np.zeros((32, *y_shape), y_dtype)
        for _ in range(20):
            rt.train_step(x, y, 0.01)
        rt.get_weights()
    rss.append(vm_rss())
print(json.dumps(rss))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(machine_line())
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # as systemd/fedge-agent.service
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(args.model),
                json.dumps([m for _, m in STEPS + LAZY]),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        runs.append(json.loads(out.splitlines()[-1]))
    med = [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))]
    print(f"VmRSS in MiB, median of {args.repeats} processes; model {args.model.name}")
    print(f"{'python itself':52s} {med[0]:6.1f}")
    for i, (what, _) in enumerate(STEPS, 1):
        print(f"{'+ ' + what:52s} {med[i]:6.1f}  (+{med[i] - med[i - 1]:.1f})")
    print("not loaded unless the config or a round needs it:")
    for i, (what, _) in enumerate(LAZY, len(STEPS) + 1):
        print(f"{'+ ' + what:52s} {med[i]:6.1f}  (+{med[i] - med[i - 1]:.1f})")


if __name__ == "__main__":
    main()
