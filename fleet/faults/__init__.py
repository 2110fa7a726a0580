"""Fault injection for ``fedge sim``: dropouts, stragglers, link flaps, broker restarts,
poisoned updates and hung devices, seeded and counted.

- ``settings``: the options, parsed (``FaultSettings``; errors are ``FaultSpecError``).
- ``plan``: seeded draws, one generator per concern, keyed by device and round.
- ``link``: ``FaultyLink``, a device's link that drops, delays or poisons its answers.
- ``proxy``: ``LinkProxy``, a TCP relay that cuts a device's connection (a link flap).
- ``injector``: ``FaultInjector``, which wires these into a run and schedules flaps and
  broker restarts; ``ledger``: ``Ledger``, what happened, for ``summary.json``.

Production code knows nothing of this: the agents and the aggregator run unchanged, and
only their links and the broker misbehave.
"""

from .injector import FaultInjector
from .ledger import Ledger
from .settings import FaultSettings, FaultSpecError, Latency, Poison, fault_settings

__all__ = [
    "FaultInjector",
    "FaultSettings",
    "FaultSpecError",
    "Latency",
    "Ledger",
    "Poison",
    "fault_settings",
]
