"""The faults of one simulated run: device links, the relay that flaps them, broker restarts.

``FaultInjector`` is made before the devices: it wraps each device's link
(:class:`FaultyLink`), puts a :class:`LinkProxy` between the devices and the broker when
links are to flap, and is told by the sim's loop which round is open and how many answers
it has (``watch``). Flaps and broker restarts happen at drawn moments counted in answers
(after the j-th answer of the round; 0: right after the announcement), so they fall inside
the round whether it takes 0.1 s (ten devices, no stragglers) or a minute; a moment the
round never reaches (its devices dropped out) comes when the next round opens. Restarts
run on a timer thread, so the aggregator's loop goes on meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from fedge.protocol import Link

from . import plan
from .ledger import Ledger
from .link import FaultyLink
from .proxy import LinkProxy
from .settings import FaultSettings
from .timers import Timers

log = logging.getLogger("fedge.fleet")


class Restartable(Protocol):
    def restart(self) -> None: ...


class FaultInjector:
    def __init__(
        self,
        settings: FaultSettings,
        devices: Sequence[str],
        *,
        fleet: str,
        rounds: int,
        round_timeout: float,
        stop: threading.Event,
        broker: Restartable | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if settings.broker_restarts and broker is None:
            raise ValueError("broker restarts need a broker the sim can restart")
        self.settings = settings
        self.devices = list(devices)
        self.fleet = fleet
        self.round_timeout = round_timeout
        self.stop_event = stop
        self.broker = broker
        self.clock = clock
        self.poisoned = plan.poisoned_devices(settings, self.devices)
        self.hung = plan.hung_devices(settings, self.devices)
        self.ledger = Ledger(settings, self.poisoned, self.hung)
        self.timers = Timers()
        self.proxy: LinkProxy | None = None
        self._restarts = plan.restart_plan(settings, rounds, len(self.devices))
        self._round = 0
        self._pending: list[tuple[int, Callable[..., None], tuple[object, ...]]] = []

    def start(self, broker_url: str) -> FaultInjector:
        """Start the relay (if links flap) in front of ``broker_url``, and the timers."""
        if self.settings.link_flaps:
            parts = urlsplit(broker_url)
            assert parts.hostname is not None and parts.port is not None
            self.proxy = LinkProxy(parts.hostname, parts.port, self.devices).start()
        self.timers.start()
        return self

    def device_url(self, device: str, url: str) -> str:
        """The URL ``device`` connects to: through its relay port when links flap."""
        if self.proxy is None:
            return url
        parts = urlsplit(url)
        user = f"{parts.username}@" if parts.username else ""
        netloc = f"{user}{self.proxy.host}:{self.proxy.port_of(device)}"
        return urlunsplit(parts._replace(netloc=netloc))

    def wrap(self, inner: Link, device: str) -> FaultyLink:
        return FaultyLink(
            inner,
            device_id=device,
            index=self.devices.index(device),
            fleet=self.fleet,
            settings=self.settings,
            ledger=self.ledger,
            round_timeout=self.round_timeout,
            stop=self.stop_event,
            poisoned=device in self.poisoned,
            hung=device in self.hung,
            clock=self.clock,
        )

    def watch(self, round_id: int | None, answers: int = 0, selected: int = 0) -> None:
        """Called by the sim's loop: the open round (None between rounds), how many answers
        it has and how many devices it selected."""
        if round_id is None:
            return
        if round_id > self._round:
            self._fire(lambda after: True)  # moments the last round never reached
            self._round = round_id
            for index, device in enumerate(self.devices):
                after = plan.flap_after(self.settings, index, round_id, selected)
                if after is not None:
                    self._pending.append((after, self._flap, (round_id, device)))
            for after in self._restarts.get(round_id, []):
                self._pending.append((after, self._restart, (round_id,)))
        self._fire(lambda after: after <= answers)

    def _fire(self, due: Callable[[int], bool]) -> None:
        keep = []
        for after, fn, args in self._pending:
            if due(after):
                self.timers.call_later(0.0, fn, *args)
            else:
                keep.append((after, fn, args))
        self._pending = keep

    def _flap(self, round_id: int, device: str) -> None:
        assert self.proxy is not None
        cut = self.proxy.cut(device)
        self.ledger.flapped(round_id, device, cut=cut)
        log.info("round %d: link of %s %s", round_id, device, "cut" if cut else "already down")

    def _restart(self, round_id: int) -> None:
        assert self.broker is not None
        log.info("round %d: restarting the broker", round_id)
        self.broker.restart()
        self.ledger.restarted(round_id)

    def stop_timers(self) -> None:
        """No more flaps or restarts (before the devices say goodbye)."""
        self.timers.stop()

    def close(self) -> None:
        self.timers.stop()
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None

    @property
    def errors(self) -> list[BaseException]:
        return self.timers.errors
