"""sd_notify without a dependency: READY, WATCHDOG and STATUS for ``Type=notify`` units.

Does nothing when not started by systemd (no ``NOTIFY_SOCKET``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger("fedge")


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; returns whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            # Never wait: a listener that stopped reading must not stall the service loop.
            sock.send(state.encode(), socket.MSG_DONTWAIT)
    except BlockingIOError:
        log.debug("sd_notify(%s) dropped: the notify socket is full", state)
        return False
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog period systemd asked for, in seconds, or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return None
    return int(usec) / 2e6


def watchdog_petter() -> Callable[[], None] | None:
    """A callable that sends WATCHDOG=1 at most every half period, or None without a watchdog.

    For long work inside one loop step (local training), so systemd does not restart a
    service that is busy rather than hung.
    """
    pet = watchdog_interval()
    if pet is None:
        return None
    last = [time.monotonic()]

    def maybe_pet() -> None:
        if time.monotonic() - last[0] >= pet:
            notify("WATCHDOG=1")
            last[0] = time.monotonic()

    return maybe_pet


def serve_until_stopped(
    step: Callable[[float], object],
    *,
    poll: float,
    done: Callable[[], bool] = lambda: False,
    wake: Callable[[], None] | None = None,
) -> None:
    """Call ``step(poll)`` until SIGTERM/SIGINT or ``done()``, as a ``Type=notify`` service.

    Sends READY=1 before the first step, WATCHDOG=1 at half the watchdog period between
    steps (a step waits no longer than that), and STOPPING=1 on the way out (also when a step
    raises). ``wake`` ends a step's wait early: called on SIGTERM/SIGINT, so that a long
    ``poll`` does not delay the stop.
    """
    stop, out = threading.Event(), threading.Event()

    def waker(wake: Callable[[], None]) -> None:
        # A thread of its own, not the signal handler: the code the signal interrupts may
        # hold the lock that wake takes. It waits without a timeout: no wake-ups of its own.
        stop.wait()
        while not out.is_set():  # until the loop is out: a step may wait more than once
            wake()
            out.wait(0.5)

    if wake is not None:
        threading.Thread(target=waker, args=(wake,), name="wake", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    notify("READY=1")
    pet = watchdog_interval()
    wait = poll if pet is None else min(poll, pet)
    last_pet = time.monotonic()
    try:
        while not stop.is_set() and not done():
            step(wait)
            if pet is not None and time.monotonic() - last_pet >= pet:
                notify("WATCHDOG=1")
                last_pet = time.monotonic()
    finally:
        out.set()
        stop.set()  # the waker's thread ends too
        notify("STOPPING=1")
