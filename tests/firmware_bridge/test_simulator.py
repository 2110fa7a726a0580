"""The simulated machine over a pseudo-terminal, read back by the real serial reader."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fedge.firmware_bridge.binary_frames import BinaryDecoder, encode_frame
from fedge.firmware_bridge.reader import SerialReader
from fedge.firmware_bridge.simulator import CHANNELS, Machine, open_pty, replay_csv, serve_pty

pytestmark = pytest.mark.link


def test_machine_wears_out() -> None:
    m = Machine(seed=1, rate_hz=50, wear_per_hour=3600.0, fault_rate=0.0)  # an hour per second
    got = [s for s, _ in zip(m.samples(), range(500), strict=False)]
    assert all(s is not None and len(s.values) == len(CHANNELS) for s in got)
    vib = np.array([s.values[:3] for s in got])  # type: ignore[union-attr]
    assert np.sqrt(np.mean(vib[-50:] ** 2)) > 3 * np.sqrt(np.mean(vib[:50] ** 2))
    temp = np.array([s.values[3] for s in got])  # type: ignore[union-attr]
    assert temp[-50:].mean() > temp[:50].mean() + 20  # and runs hotter


def test_faults_happen() -> None:
    m = Machine(seed=3, fault_rate=0.05)
    got = [s for s, _ in zip(m.samples(), range(2000), strict=False)]
    dropped = sum(s is None for s in got)
    assert 10 < dropped < 100  # about a third of the 5% are lost frames


def test_stream_over_a_pty_reaches_the_reader(tmp_path: Path) -> None:
    master, path = open_pty(tmp_path / "ttySIM")
    stop = threading.Event()
    got: list = []
    decoder = BinaryDecoder()
    reader = SerialReader(path, 115200, decoder, on_samples=got.extend, backoff=(0.05, 0.2))
    t_read = threading.Thread(target=reader.run, args=(stop,), daemon=True)
    t_read.start()
    assert reader.connected.wait(5)
    sent = serve_pty(
        master,
        Machine(seed=2, fault_rate=0.0).samples(),
        encode_frame,
        rate_hz=2000,
        stop=stop,
        limit=400,
    )
    end = time.monotonic() + 5
    while len(got) < sent and time.monotonic() < end:
        time.sleep(0.02)
    stop.set()
    t_read.join(5)
    os.close(master)
    assert sent == 400 and len(got) == 400
    assert [s.seq for s in got] == list(range(400))
    assert sum(decoder.faults.values()) == 0


def test_replay_csv(tmp_path: Path) -> None:
    f = tmp_path / "rec.csv"
    f.write_text("a,b\n1,2\n3,4.5\n")
    assert [s.values for s in replay_csv(f)] == [(1.0, 2.0), (3.0, 4.5)]


def test_cli_serves_on_a_pty_and_cleans_up(tmp_path: Path) -> None:
    import subprocess
    import sys

    link = tmp_path / "ttyCLI"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge.cli",
            "bridge",
            "simulate",
            "--pty",
            "--link",
            str(link),
            "--seconds",
            "0.5",
            "--rate",
            "400",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"simulated sensor on {link}" in proc.stdout and "sent 200 samples" in proc.stdout
    assert not link.exists()  # nobody listened: frames were dropped, nothing hung
