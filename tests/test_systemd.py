"""sd_notify without systemd: READY and a watchdog that long training keeps alive."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.dataset import Dataset
from fedge.agent.trainer import train_local
from fedge.models.runtime import load_runtime
from helpers import DIGITS_MODEL

from fedge.systemd import notify, watchdog_petter

pytestmark = pytest.mark.unit


def test_notify_and_watchdog_petter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # 20 ms: pet every 10 ms
    assert notify("READY=1") and sock.recv(64) == b"READY=1"
    pet = watchdog_petter()
    assert pet is not None
    rng = np.random.default_rng(0)
    data = Dataset(rng.random((64, 64), dtype=np.float32), rng.integers(0, 10, 64).astype(np.int32))
    calls = []

    def slow_pet() -> None:  # each batch takes a while, as on a Pi
        time.sleep(0.005)
        calls.append(1)
        pet()

    train_local(
        load_runtime(DIGITS_MODEL), data, epochs=2, batch_size=8, lr=0.1, rng=rng, on_step=slow_pet
    )
    assert len(calls) == 16  # once per batch
    pets = []
    sock.settimeout(0.2)
    try:
        while True:
            pets.append(sock.recv(64))
    except TimeoutError:
        pass
    sock.close()
    assert pets and set(pets) == {b"WATCHDOG=1"} and len(pets) < 16  # rate-limited


def test_no_watchdog_no_petter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_petter() is None
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_notify_never_waits_for_a_listener_that_stopped_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))  # bound, never read: its queue fills up
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    started = time.monotonic()
    sent = [notify(f"STATUS=round {i}") for i in range(2000)]
    assert time.monotonic() - started < 10
    assert sent[0] and not sent[-1]  # the first ones queued, then dropped
    sock.close()


# A service loop whose step waits on a link for a minute at a time, as an idle agent does.
SERVE = """
import sys, time
from fedge.protocol.memory_link import MemoryBroker, MemoryLink
from fedge.systemd import serve_until_stopped
link = MemoryLink(MemoryBroker(), "d")
link.connect()
waits = []
def step(wait):
    waits.append(wait)
    print("waiting", flush=True)
    link.get(wait)
    link.get(wait)  # a step may wait twice (the agent's status grace)
serve_until_stopped(step, poll=60.0, wake=link.wake if sys.argv[1] == "wake" else None)
print("stopped", max(waits), flush=True)
"""


@pytest.mark.parametrize("watchdog", [None, "2000000"])
def test_sigterm_ends_a_long_wait_at_once_and_the_watchdog_bounds_it(
    watchdog: str | None,
) -> None:
    import os
    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    if watchdog:
        env["WATCHDOG_USEC"] = watchdog  # pet every second: no wait may be longer
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, "wake"], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline() == "waiting\n"
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert time.monotonic() - sent < 3.0  # not the minute of the wait
    assert out.splitlines()[-1] == f"stopped {1.0 if watchdog else 60.0}"
