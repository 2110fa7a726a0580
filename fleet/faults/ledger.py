"""What was injected during a run, recorded as it happens, summarised for ``summary.json``."""

from __future__ import annotations

import statistics
import threading
from collections.abc import Sequence
from typing import Any

from .settings import FaultSettings


def _by_round(events: dict[int, set[str]]) -> dict[str, list[str]]:
    return {str(r): sorted(devices) for r, devices in sorted(events.items()) if devices}


class Ledger:
    """Thread-safe: device threads, the timer thread and the sim's loop all write here."""

    def __init__(
        self,
        settings: FaultSettings,
        poisoned_devices: Sequence[str] = (),
        hung_devices: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.poisoned_devices = sorted(poisoned_devices)
        self.hung_devices = sorted(hung_devices)
        self._hung: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self._dropped: dict[int, set[str]] = {}
        self._late: dict[int, set[str]] = {}
        self._delays: list[float] = []
        self._flaps: dict[int, set[str]] = {}
        self._flaps_missed = 0
        self._restarts: list[int] = []
        self._poisoned: dict[int, set[str]] = {}

    def dropped(self, round_id: int, device: str) -> None:
        with self._lock:
            self._dropped.setdefault(round_id, set()).add(device)

    def hung(self, round_id: int, device: str) -> None:
        with self._lock:
            self._hung.setdefault(round_id, set()).add(device)

    def delayed(self, round_id: int, device: str, seconds: float, *, late: bool) -> None:
        with self._lock:
            self._delays.append(seconds)
            if late:
                self._late.setdefault(round_id, set()).add(device)

    def flapped(self, round_id: int, device: str, *, cut: bool) -> None:
        with self._lock:
            if cut:
                self._flaps.setdefault(round_id, set()).add(device)
            else:
                self._flaps_missed += 1

    def restarted(self, round_id: int) -> None:
        with self._lock:
            self._restarts.append(round_id)

    def poisoned(self, round_id: int, device: str) -> None:
        with self._lock:
            self._poisoned.setdefault(round_id, set()).add(device)

    def summary(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        """Counts, and per round which devices, next to the aggregator's ``rounds``."""
        with self._lock:
            done = {r["round"]: set(r["participants"]) for r in rounds if r["status"] == "done"}
            accepted = sum(
                len(devices & done.get(r, set())) for r, devices in self._poisoned.items()
            )
            delays = sorted(self._delays)
            return {
                "settings": self.settings.describe(),
                "dropped": sum(len(d) for d in self._dropped.values()),
                "dropped_by_round": _by_round(self._dropped),
                "stragglers_late": sum(len(d) for d in self._late.values()),
                "late_by_round": _by_round(self._late),
                "training_delay_s": (
                    {
                        "median": round(statistics.median(delays), 3),
                        "p90": round(delays[int(0.9 * (len(delays) - 1))], 3),
                        "max": round(delays[-1], 3),
                    }
                    if delays
                    else None
                ),
                "link_flaps": sum(len(d) for d in self._flaps.values()),
                "link_flaps_by_round": _by_round(self._flaps),
                "link_flaps_missed": self._flaps_missed,  # planned while already disconnected
                "broker_restarts": len(self._restarts),
                "broker_restart_rounds": list(self._restarts),
                "poisoned_devices": self.poisoned_devices,
                "poisoned_sent": sum(len(d) for d in self._poisoned.values()),
                "poisoned_accepted": accepted,
                "poisoned_by_round": _by_round(self._poisoned),
                "hung_devices": self.hung_devices,
                "hung_unanswered": sum(len(d) for d in self._hung.values()),
            }
