"""What is injected where: seeded draws, one generator per concern (pure, no I/O).

Each draw comes from its own generator keyed by ``(seed, concern, device, round)``, not
from one stream consumed as events happen: the devices run in threads, and the order in
which they reach a round must not change what is injected. The same seed therefore injects
the same drops, delays, flaps, restarts and poisoned devices in every run (whether a planned
flap finds a connection to cut, or a restart a round still open, depends on timing).
"""

from __future__ import annotations

import numpy as np

from .settings import FaultSettings

CONCERNS = {
    "drop": 1,
    "straggle": 2,
    "flap": 3,
    "restart": 4,
    "poison": 5,
    "poison_codec": 6,
    "hang": 7,
}


def generator(seed: int, concern: str, *keys: int) -> np.random.Generator:
    """The generator of one concern (and device, round): independent of every other draw."""
    return np.random.default_rng([seed, CONCERNS[concern], *keys])


def dropped(s: FaultSettings, device: int, round_id: int) -> bool:
    """Whether device number ``device`` vanishes in round ``round_id`` (before answering)."""
    return bool(s.drop_rate) and generator(s.seed, "drop", device, round_id).random() < s.drop_rate


def training_delay(s: FaultSettings, device: int, round_id: int) -> float | None:
    """Seconds of training the device needs in that round, counted from the announcement."""
    if s.stragglers is None:
        return None
    return s.stragglers.sample(generator(s.seed, "straggle", device, round_id))


def flap_after(s: FaultSettings, device: int, round_id: int, answers: int) -> int | None:
    """After how many of the round's ``answers`` the device's link is cut, or None.

    A moment counted in answers received falls inside the round however long it lasts
    (0.1 s here without stragglers, seconds with them): 0 is right after the announcement.
    """
    if not s.link_flaps:
        return None
    rng = generator(s.seed, "flap", device, round_id)
    if rng.random() >= s.link_flaps:
        return None
    return int(rng.integers(0, max(answers, 1)))


def restart_plan(s: FaultSettings, rounds: int, answers: int) -> dict[int, list[int]]:
    """Round id -> after how many of its answers the broker restarts.

    Distinct rounds among 1..``rounds`` while there are enough, then several per round.
    """
    if not s.broker_restarts or rounds < 1:
        return {}
    rng = generator(s.seed, "restart")
    picks = rng.choice(
        np.arange(1, rounds + 1), size=s.broker_restarts, replace=s.broker_restarts > rounds
    )
    plan: dict[int, list[int]] = {}
    for round_id in sorted(int(r) for r in picks):
        plan.setdefault(round_id, []).append(int(rng.integers(0, max(answers, 1))))
    return {r: sorted(moments) for r, moments in plan.items()}


def poisoned_devices(s: FaultSettings, devices: list[str]) -> list[str]:
    """The devices that send poisoned updates, chosen by the seed."""
    if s.poison is None:
        return []
    picks = generator(s.seed, "poison").choice(len(devices), size=s.poison.devices, replace=False)
    return sorted(devices[int(i)] for i in picks)


def hung_devices(s: FaultSettings, devices: list[str]) -> list[str]:
    """The devices that hang (online, never answering), chosen by the seed."""
    if not s.hung:
        return []
    picks = generator(s.seed, "hang").choice(len(devices), size=s.hung, replace=False)
    return sorted(devices[int(i)] for i in picks)
