"""A killed agent loses at most the batch its serial reader held, never a committed one."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedge.agent.store import SampleStore
from fedge.firmware_bridge.binary_frames import encode_frame
from fedge.firmware_bridge.sample import Sample
from fedge.firmware_bridge.simulator import open_pty

pytestmark = [pytest.mark.link, pytest.mark.slow]

WRITER = Path(__file__).with_name("serial_store_writer.py")
FLUSH = 300  # samples the child's reader holds before it stores them
READ = 4096  # bytes per read in the child: at most READ // 45 frames come in one read
PTY_HOLDS = 17_408  # bytes a Linux pty buffers (measured); the bound below allows twice that


def frames(first: int, n: int) -> bytes:
    return b"".join(
        encode_frame(Sample(1, i, i, tuple(float(i + c) for c in range(8))))
        for i in range(first, first + n)
    )


def last_number(out: Path) -> int:
    complete = out.read_text().split("\n")[:-1]  # after the last newline: maybe a cut print
    return int(complete[-1])


def test_sigkill_loses_only_the_held_batch(tmp_path: Path) -> None:
    rng = random.Random(20261202)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    for run in range(3):
        master, port = open_pty(tmp_path / f"tty{run}")
        os.set_blocking(master, True)  # so that "written" is what entered the port
        path, out = tmp_path / f"crash{run}.db", tmp_path / f"child{run}.out"
        try:
            with open(out, "w") as fh:
                proc = subprocess.Popen(
                    [sys.executable, str(WRITER), port, str(path), str(FLUSH)], stdout=fh, env=env
                )
                deadline = time.monotonic() + 20
                while out.stat().st_size == 0:  # the port is open
                    assert proc.poll() is None, f"child exited with {proc.returncode}"
                    assert time.monotonic() < deadline, "child did not start"
                    time.sleep(0.01)
                written = 0
                stop_at = time.monotonic() + rng.uniform(0.3, 1.0)
                while time.monotonic() < stop_at:  # about 10,000 frames/s
                    os.write(master, frames(written, 50))
                    written += 50
                    time.sleep(0.005)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        finally:
            os.close(master)
        assert proc.returncode == -signal.SIGKILL
        reported = last_number(out)
        with SampleStore(path) as store:
            assert store.integrity_ok()
            count = store.count()
        db = sqlite3.connect(path)
        seqs = [r[0] for r in db.execute("SELECT seq FROM samples ORDER BY id")]
        db.close()
        # Committed batches are all there, in order, with nothing missing between them...
        assert seqs == list(range(count)), f"run {run}: not a prefix of what was sent"
        # ...one more than reported if the kill came between a commit and its print...
        assert 0 <= count - reported <= FLUSH + READ // 45, f"run {run}"
        # ...and what is lost is what the reader held plus what was still in the port.
        assert written - count <= FLUSH + READ // 45 + 2 * PTY_HOLDS // 45, f"run {run}"
        assert count >= FLUSH, f"run {run}: the child stored nothing; the test proved nothing"
