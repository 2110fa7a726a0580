"""How `fedge sim` scales in devices: connect time, round time, memory, for both client paths.

Runs ``fedge sim --devices N --broker mosquitto --devices-per-round K`` for each N and
``--clients`` path, one process each, and prints per run: seconds until every device was
connected and subscribed (``connect_s`` in summary.json), the median round duration
(rounds.jsonl), the sim process's peak RSS (wait4) and the Mosquitto's peak RSS (VmHWM,
read while it runs). Usage::

    .venv/bin/python bench/scale.py --devices 10,100,300,1000 --clients hub,threads \\
        --threads-max 300 --rounds 5 --per-round 50 --out runs/scale
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _mosquitto_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == "mosquitto":
                return int(child)
        except OSError:
            continue
    return None


def run(
    n: int,
    clients: str,
    rounds: int,
    per_round: int,
    out: Path,
    timeout: float,
    runtime: str = "litert",
) -> dict:
    folder = out / f"{clients}-{n}"
    cmd = [
        sys.executable,
        "-m",
        "fedge.cli",
        "sim",
        "--devices",
        str(n),
        "--devices-per-round",
        str(min(per_round, n)),
        "--clients",
        clients,
        "--broker",
        "mosquitto",
        "--rounds",
        str(rounds),
        "--no-baselines",
        "--round-timeout",
        "60",
        "--out",
        str(folder),
        "--runtime",
        runtime,
    ]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / f"{clients}-{n}.log"
    started = time.perf_counter()
    with log_file.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    broker_kb = 0
    deadline = time.monotonic() + timeout
    while True:
        pid = _mosquitto_of(proc.pid)
        if pid is not None:
            broker_kb = max(broker_kb, _hwm_kb(pid) or 0)
        waited, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if waited:
            break
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.5)
    wall = time.perf_counter() - started
    row: dict = {
        "devices": n,
        "clients": clients,
        "exit": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 1),
        "sim_peak_rss_mb": round(usage.ru_maxrss / 1024),
        "mosquitto_peak_rss_mb": round(broker_kb / 1024, 1),
    }
    summary_path = folder / "summary.json"
    log_path = folder / "rounds.jsonl"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        row["connect_s"] = summary.get("connect_s")
        row["rounds_completed"] = summary["rounds_completed"]
    if log_path.exists():
        durations = [
            json.loads(line)["duration_s"]
            for line in log_path.read_text().splitlines()
            if json.loads(line)["status"] == "done"
        ]
        row["median_round_s"] = round(statistics.median(durations), 2) if durations else None
    if row["exit"] != 0:
        row["error"] = log_file.read_text(errors="replace").strip().splitlines()[-1:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="10,100,300,1000")
    parser.add_argument("--clients", default="hub,threads")
    parser.add_argument("--threads-max", type=int, default=300, help="largest N for threads")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=50, help="--devices-per-round (0: all)")
    parser.add_argument("--runtime", default="litert", help="fedge sim --runtime")
    parser.add_argument("--out", default="runs/scale")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    args = parser.parse_args()
    out = Path(args.out)
    for n in (int(x) for x in args.devices.split(",")):
        for clients in args.clients.split(","):
            if clients == "threads" and n > args.threads_max:
                continue
            row = run(n, clients, args.rounds, args.per_round, out, args.timeout, args.runtime)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
