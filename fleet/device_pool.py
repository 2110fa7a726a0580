"""Many simulated devices in one process: links on one PahoHub, loops on a few threads.

A real device runs one :class:`~fedge.agent.daemon.Agent` with one PahoLink and its network
thread. ``fedge sim --clients hub`` (the default) keeps every device's own agent, MQTT
connection, client id, Will and state, but shares the threads: all links are driven by one
:class:`~fedge.protocol.paho_hub.PahoHub`, and :class:`DevicePool` steps an agent on one of
a few worker threads only when its link says a message arrived. Devices connect through
:func:`start_devices`, a bounded number at a time (the hub's connectors back off with jitter
when the broker refuses), and :func:`raise_fd_limit` makes room for their sockets first.
"""

from __future__ import annotations

import logging
import queue
import resource
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from fedge.agent.daemon import Agent
from fedge.protocol.paho_link import PahoLink

log = logging.getLogger("fedge.fleet")

FDS_PER_DEVICE = {"hub": 1, "threads": 3}  # its socket; with loop_start also paho's socket pair
FDS_SPARE = 256  # the aggregator, data files, the log, Python's own


class FdLimitError(RuntimeError):
    """The hard limit on open files is too low for the fleet; ``str()`` says how to raise it."""


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit if it is below ``needed``
    (a broker the sim starts inherits it); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise FdLimitError(
            f"the fleet needs about {needed} open files and the hard limit is {hard}: raise it"
            f" (ulimit -Hn {needed}, or LimitNOFILE= in a systemd unit) or simulate fewer devices"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.info("raised the open-file limit from %d to %s for %d needed", soft, hard, needed)
    return hard


def start_devices(agents: Sequence[Agent], *, parallel: int = 32, timeout: float = 60.0) -> None:
    """Connect and subscribe every agent, ``parallel`` at a time; the first failure raises
    (a LinkError naming the device) once the others have been tried."""
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="start") as pool:
        for future in [pool.submit(agent.start, timeout) for agent in agents]:
            future.result()


class DevicePool:
    """Steps many agents on ``workers`` threads.

    An agent is queued when its link has received a message (``PahoLink.on_receive``) and is
    stepped by one worker at a time until its inbox is empty. ``on_crash(agent)`` is called
    when an agent raises; the pool then stops (as a dead device thread would stall rounds).
    """

    def __init__(
        self,
        stop: threading.Event,
        *,
        workers: int = 8,
        on_crash: Callable[[Agent], None] | None = None,
    ) -> None:
        self.stop = stop
        self.on_crash = on_crash
        self._ready: queue.Queue[Agent] = queue.Queue()
        self._lock = threading.Lock()
        self._queued: set[str] = set()
        self._busy: dict[str, threading.Lock] = {}
        self._threads = [
            threading.Thread(target=self._work, name=f"devices-{i}", daemon=True)
            for i in range(max(1, workers))
        ]

    def start(self, agents: Sequence[Agent]) -> None:
        """Step ``agents`` from now on (each already started: connected and subscribed)."""
        for agent in agents:
            link = agent.link
            if not isinstance(link, PahoLink):
                raise TypeError(f"{agent.device_id}: a pooled device needs a PahoLink")
            self._busy[agent.device_id] = threading.Lock()
            link.on_receive = lambda agent=agent: self._notify(agent)  # type: ignore[misc]
            self._notify(agent)  # what arrived before the hook was set
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float = 30.0) -> None:
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    def _notify(self, agent: Agent) -> None:
        with self._lock:
            if agent.device_id in self._queued:
                return
            self._queued.add(agent.device_id)
        self._ready.put(agent)

    def _work(self) -> None:
        while not self.stop.is_set():
            try:
                agent = self._ready.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._busy[agent.device_id]:
                with self._lock:  # from here a new message queues the agent again
                    self._queued.discard(agent.device_id)
                try:
                    while not self.stop.is_set() and agent.step(0):
                        pass
                except Exception:  # reported once and ends the run, as a device thread's would
                    log.exception("agent %s stopped", agent.device_id)
                    if self.on_crash is not None:
                        self.on_crash(agent)
                    self.stop.set()
