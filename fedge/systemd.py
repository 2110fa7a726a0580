"""sd_notify without a dependency: READY, WATCHDOG and STATUS for ``Type=notify`` units.

Does nothing when not started by systemd (no ``NOTIFY_SOCKET``).
"""

from __future__ import annotations

import logging
import os
import socket

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
            sock.sendall(state.encode())
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
