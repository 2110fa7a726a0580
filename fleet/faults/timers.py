"""Callbacks due at given times, run one after another on a thread of their own."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fedge.fleet")


class Timers:
    """``call_later(delay, fn, *args)``; ``stop()`` drops what has not run yet.

    A callback that raises is logged, and the error kept in ``errors``: the run goes on.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.errors: list[BaseException] = []
        self._queue: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> Timers:
        self._thread = threading.Thread(target=self._run, name="fault-timers", daemon=True)
        self._thread.start()
        return self

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        with self._cond:
            heapq.heappush(self._queue, (self.clock() + delay, next(self._order), fn, args))
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or self._queue[0][0] > self.clock()):
                    wait = self._queue[0][0] - self.clock() if self._queue else None
                    self._cond.wait(wait)
                if self._stopping:
                    return
                _, _, fn, args = heapq.heappop(self._queue)
            try:
                fn(*args)
            except Exception as exc:  # kept for the run's end; one fault must not stop the rest
                log.error("fault %s%s failed: %s", getattr(fn, "__name__", fn), args, exc)
                self.errors.append(exc)
