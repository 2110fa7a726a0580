"""The serial reader over real pyserial: a pseudo-terminal pair that is unplugged and replugged."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from fedge.firmware_bridge.reader import SerialReader

pytestmark = pytest.mark.link


class Lines:
    """A stand-in decoder: one sample per newline-terminated line."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> Sequence[bytes]:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return lines


class Device:
    """A pseudo-terminal whose slave end is reached through a stable symlink, like udev's."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master = -1
        self.plug()

    def plug(self) -> None:
        master, slave = os.openpty()
        path = os.ttyname(slave)
        os.close(slave)
        tmp = self.link.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path)
        os.replace(tmp, self.link)
        self.master = master

    def unplug(self) -> None:
        self.link.unlink()
        os.close(self.master)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)


def wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_resumes_after_unplug_and_replug(tmp_path: Path) -> None:
    dev = Device(tmp_path / "ttyFEDGE0")
    got: list[bytes] = []
    reader = SerialReader(
        str(dev.link), 115200, Lines(), on_samples=got.extend, backoff=(0.05, 0.2)
    )
    stop = threading.Event()
    thread = threading.Thread(target=reader.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert reader.connected.wait(5)
        dev.write(b"a 1\na 2\n")
        assert wait_for(lambda: got == [b"a 1", b"a 2"])
        dev.unplug()  # the port disappears mid-stream
        assert wait_for(lambda: reader.counters["disconnects"] == 1)
        assert wait_for(lambda: reader.counters["open_failures"] >= 1)  # and stays away a while
        dev.plug()  # ...and comes back
        assert wait_for(lambda: reader.counters["opens"] == 2)
        dev.write(b"b 3\n")
        assert wait_for(lambda: got[-1:] == [b"b 3"])
    finally:
        stop.set()
        thread.join(5)
        os.close(dev.master)
    assert not thread.is_alive()
    assert reader.counters["samples"] == 3


def test_loop_url_is_real_pyserial() -> None:
    import serial

    port = serial.serial_for_url("loop://", timeout=0.1)
    opened = []

    def open_port(url: str, **kw: object):  # type: ignore[no-untyped-def]
        opened.append(url)
        return port

    got: list[bytes] = []
    reader = SerialReader("loop://", 9600, Lines(), on_samples=got.extend, open_port=open_port)
    stop = threading.Event()
    thread = threading.Thread(target=reader.run, args=(stop,), daemon=True)
    thread.start()
    port.write(b"x=1\n")
    assert wait_for(lambda: got == [b"x=1"])
    stop.set()
    thread.join(5)
    assert opened == ["loop://"]
