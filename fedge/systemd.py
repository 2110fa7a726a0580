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
) -> None:
    """Call ``step(poll)`` until SIGTERM/SIGINT or ``done()``, as a ``Type=notify`` service.

    Sends READY=1 before the first step, WATCHDOG=1 at half the watchdog period between
    steps, and STOPPING=1 on the way out (also when a step raises).
    """
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    notify("READY=1")
    pet = watchdog_interval()
    last_pet = time.monotonic()
    try:
        while not stop.is_set() and not done():
            step(poll)
            if pet is not None and time.monotonic() - last_pet >= pet:
                notify("WATCHDOG=1")
                last_pet = time.monotonic()
    finally:
        notify("STOPPING=1")
