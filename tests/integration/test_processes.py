"""`fedge aggregator` and `fedge agent` as real processes over Mosquitto, as systemd runs them.

Checks what a service manager sees: READY=1 on the notify socket, a clean exit on SIGTERM,
the aggregator exiting by itself after its rounds, and devices marked offline when they stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedge.protocol import Status, Topics, make_link
from fedge.protocol.status import decode_status
from helpers import DIGITS_MODEL, digits_partitions

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _no_orphans() -> Iterator[None]:
    """A test that fails half-way still leaves no service running."""
    yield
    for proc in SPAWNED:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    SPAWNED.clear()


SPAWNED: list[subprocess.Popen[bytes]] = []


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        SPAWNED.append(
            proc := subprocess.Popen(
                [sys.executable, "-m", "fedge.cli", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
        return proc


def test_services_run_rounds_and_stop_cleanly(tmp_path: Path, mosquitto, fleet_id: str) -> None:  # type: ignore[no-untyped-def]
    parts, test = digits_partitions(tmp_path, 2, seed=2)
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "OPENBLAS_NUM_THREADS": "1"}

    devices = [f"p{i}-{fleet_id[-8:]}" for i in range(2)]
    agents = []
    for device, part in zip(devices, parts, strict=True):
        cfg = tmp_path / f"{device}.toml"
        cfg.write_text(
            f'device_id = "{device}"\nfleet = "{fleet_id}"\nbroker = "{mosquitto.url}"\n'
            f'model = "{DIGITS_MODEL}"\ndata = "{part}"\nstate_dir = "{tmp_path / device}"\n'
        )
        agents.append(spawn(["agent", "--config", str(cfg)], env, tmp_path / f"{device}.log"))
    agg_cfg = tmp_path / "aggregator.toml"
    agg_cfg.write_text(
        f'fleet = "{fleet_id}"\nbroker = "{mosquitto.url}"\nclient_id = "a-{fleet_id[-8:]}"\n'
        f'model = "{DIGITS_MODEL}"\nstate_dir = "{tmp_path / "agg"}"\nrounds = 2\nmin_devices = 2\n'
        f'round_timeout = 60\neval_data = "{test}"\n'
        "[training]\nepochs = 1\nbatch_size = 32\nlr = 0.1\n"
    )
    agg = spawn(["aggregator", "--config", str(agg_cfg)], env, tmp_path / "agg.log")

    said: list[bytes] = []

    def listen() -> None:  # as systemd does, all the time
        with contextlib.suppress(OSError):
            while True:
                said.append(notify.recv(256))

    threading.Thread(target=listen, daemon=True).start()
    assert agg.wait(120) == 0, (tmp_path / "agg.log").read_text()[-3000:]
    time.sleep(0.5)
    assert said.count(b"READY=1") == 3
    # What `systemctl status` shows: each agent's last round, the aggregator's round line.
    shown = [s.decode() for s in said if s.startswith(b"STATUS=")]
    assert any(s.startswith("STATUS=idle; round 2: sent ") for s in shown), shown
    assert any(s.startswith("STATUS=round 2 done: 2 of 2 trained") for s in shown), shown
    rounds = [json.loads(x) for x in (tmp_path / "agg" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(r["participants"]) == devices for r in rounds)

    watcher = make_link(mosquitto.url, f"w-{fleet_id[-8:]}")
    watcher.connect()
    for proc in agents:
        proc.send_signal(signal.SIGTERM)
    for proc in agents:
        assert proc.wait(30) == 0
    watcher.subscribe(Topics(fleet_id).statuses)
    states: dict[str, str] = {}
    deadline = time.monotonic() + 10
    while len(states) < 2 and time.monotonic() < deadline:
        msg = watcher.get(1.0)
        if msg is not None and msg.payload:
            status, _ = decode_status(msg.payload)
            assert isinstance(status, Status)
            states[status.device_id] = status.state
    watcher.close()
    notify.close()
    assert states == {d: "offline" for d in devices}  # retained: the last word of each device
