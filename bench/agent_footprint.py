"""What an agent costs its device between rounds: peak RSS, idle CPU and idle wake-ups.

Starts a Mosquitto of its own, a ``fedge aggregator`` and N ``fedge agent`` processes (the
configs ``fedge fleet launch`` writes: signed rounds, digits data), lets the aggregator run
its rounds, then leaves the agents connected and idle (the aggregator stops after its last
round; the agents wait for the next one, as between a fleet's rounds) and watches each agent
process for ``--idle`` seconds through /proc:

- peak RSS: ``VmHWM`` after the rounds (training included), and what the process holds at
  the end, split into anonymous memory (``RssAnon``: its own) and file-backed pages
  (``RssFile``: the shared libraries' code and data it touched, clean pages the kernel can
  drop and read again);
- peak PSS: the largest proportional set size sampled (``/proc/PID/smaps_rollup``, every
  0.2 s during the rounds, then at the start and the end of the idle window): each shared
  page counted as a share among the processes that map it, so N agents on one machine split
  their libraries' pages N ways. With one agent (a device) PSS is RSS; the kernel keeps no
  high-water mark of it, so it is sampled;
- idle CPU: user + system time over the idle window, as a share of one core;
- wake-ups per second: voluntary + involuntary context switches of all the process's threads
  over the window (each is a thread waking up or being preempted: the timers and poll loops
  that keep a device's CPU out of its deepest sleep).

It prints one row per agent and the medians; it never fails on a number.

    .venv/bin/python bench/agent_footprint.py                 # 3 agents, 3 rounds, 30 s idle
    .venv/bin/python bench/agent_footprint.py --model models/artifacts/digits_mlp_50k.tflite
    .venv/bin/python bench/agent_footprint.py --runtime numpy   # without LiteRT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from fedge.fleet.launch import (
    AGGREGATOR,
    LaunchOptions,
    RunFolder,
    agent_processes,
    fedge_command,
    spawn,
    stop_children,
    write_run,
)
from fedge.fleet.mosquitto import LocalMosquitto
from machine import machine_line  # bench/machine.py

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


def switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def memory_mib(pid: int, field: str) -> float:
    """A /proc/PID/status size (VmHWM, RssAnon, RssFile) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pss_mib(pid: int) -> float:
    """The process's proportional set size in MiB (nan once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle to watch")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument(
        "--runtime",
        choices=["litert", "tflite_runtime", "numpy"],
        default=None,
        help="the agents' runtime backend (default: the config's, LiteRT first)",
    )
    args = ap.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        run = RunFolder(Path(tmp) / "run").fresh()
        opts = LaunchOptions(
            devices=args.devices, rounds=args.rounds, out=run.out, model=args.model, epochs=1
        )
        with LocalMosquitto(run.out / "broker") as broker:
            devices = write_run(opts, run, broker.url, "footprint")
            if args.runtime is not None:  # a plain key, so first in the file (before any table)
                for name in devices:
                    path = run.config(name)
                    path.write_text(f'runtime = ["{args.runtime}"]\n' + path.read_text())
            children = [
                spawn(
                    AGGREGATOR,
                    fedge_command(AGGREGATOR, run.config(AGGREGATOR)),
                    run.log(AGGREGATOR),
                )
            ]
            agents = [
                spawn(name, fedge_command("agent", run.config(name)), run.log(name))
                for name, _ in agent_processes(devices, 1)
            ]
            children += agents
            try:
                deadline = time.monotonic() + 300
                pss = {a.name: 0.0 for a in agents}

                def sample() -> None:
                    for a in agents:
                        pss[a.name] = max(pss[a.name], pss_mib(a.proc.pid))

                while children[0].proc.poll() is None and time.monotonic() < deadline:
                    sample()
                    time.sleep(0.2)
                rounds = [json.loads(x) for x in run.rounds.read_text().splitlines()]
                done = sum(r["status"] == "done" for r in rounds)
                time.sleep(2)  # the last model reaches every agent
                before = {a.name: (cpu_seconds(a.proc.pid), switches(a.proc.pid)) for a in agents}
                sample()
                t0 = time.monotonic()
                time.sleep(args.idle)  # not sampled: reading /proc must not wake the agents
                span = time.monotonic() - t0
                sample()
                rows = []
                for a in agents:
                    cpu0, sw0 = before[a.name]
                    rows.append(
                        (
                            a.name,
                            memory_mib(a.proc.pid, "VmHWM"),
                            100 * (cpu_seconds(a.proc.pid) - cpu0) / span,
                            (switches(a.proc.pid) - sw0) / span,
                            memory_mib(a.proc.pid, "RssAnon"),
                            memory_mib(a.proc.pid, "RssFile"),
                            pss[a.name],
                        )
                    )
            finally:
                stop_children(children)
    print(f"{args.devices} agent processes, {done} of {args.rounds} rounds, then {span:.0f} s idle")
    print(f"{args.runtime or 'default'} runtime, model {args.model or 'digits_mlp (bundled)'}")
    head = f"{'agent':8s} {'peak RSS':>11s} {'idle CPU':>9s} {'wake-ups/s':>10s}"
    print(head + f" {'anon at end':>12s} {'file at end':>12s} {'peak PSS':>11s}")
    med = ("median", *(statistics.median(r[i] for r in rows) for i in range(1, 7)))
    for name, rss, cpu, wake, anon, file, top in [*rows, med]:
        print(
            f"{name:8s} {rss:7.1f} MiB {cpu:8.2f}% {wake:10.1f} {anon:8.1f} MiB {file:8.1f} MiB"
            f" {top:7.1f} MiB"
        )


if __name__ == "__main__":
    main()
