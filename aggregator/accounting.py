"""What differential privacy has spent so far (docs/privacy.md), with Google's
``dp-accounting`` (RDP or PLD accountant); never a formula of our own.

Central DP: each round is one Gaussian mechanism of noise multiplier
``z`` on a sum of updates clipped to C, with devices sampled at rate ``q`` = devices the round
selected / devices online and eligible when it was announced. Selection is uniform under DP
(``Aggregator._select``), a fixed number out of those online; it is accounted as Poisson
sampling at that rate (``PoissonSampledDpEvent``, add-or-remove-one-device adjacency), as
TensorFlow Federated and Flower account DP-FedAvg. A round counts when it is announced: a
selected device that skipped or dropped counts (accounting is by selection, not by
uploads), and so does a round that then fails (it published nothing: a small overcount
that keeps the ledger simple and on the safe side).

Local DP: each device's upload is a Gaussian mechanism on its own clipped update. Its data
can change that update by up to 2C (replacing it), so each is one ``GaussianDpEvent`` of
multiplier ``z / 2``, with no amplification by sampling (the aggregator knows who was
selected); a device's epsilon grows with the rounds it was selected for, and the one
reported is that of the device selected most often.

The ledger is plain data (JSON in the aggregator's state database), so epsilon survives a
restart.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

EXTRA_HINT = "pip install 'fedge[privacy]'"


class _NotConverged(logging.Filter):
    """The RDP accountant logs a warning for every order whose series does not converge
    (some orders below 2 at small noise), and leaves that order out: the bound from the
    others holds. Ten lines a round would drown the aggregator's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextmanager
def _quiet_orders() -> Iterator[None]:
    logger = logging.getLogger("absl")
    quiet = _NotConverged()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def require_dp_accounting() -> None:
    """ValueError (one line) when dp-accounting, the privacy extra, is not installed."""
    try:
        import dp_accounting  # noqa: F401 - only whether it imports
    except ImportError as exc:
        raise ValueError(
            f"[privacy] needs the dp-accounting package ({EXTRA_HINT}): {exc}"
        ) from exc


def _accountant(kind: str) -> Any:
    import dp_accounting

    if kind == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    if kind == "pld":
        return dp_accounting.pld.PLDAccountant()
    raise ValueError(f"unknown accountant {kind!r} (rdp or pld)")


def _central_event(q: float, z: float) -> Any:
    """One round: a Gaussian of multiplier ``z`` on devices Poisson-sampled at rate ``q``
    (a rate of 1 is no sampling)."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(z)
    return gaussian if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)


def _local_epsilon(z: float, rounds: int, delta: float, kind: str) -> float:
    """One device's uploads: ``rounds`` Gaussians of multiplier ``z / 2`` (sensitivity 2C)."""
    import dp_accounting

    if rounds == 0:
        return 0.0
    acc = _accountant(kind)
    acc.compose(dp_accounting.GaussianDpEvent(z / 2), rounds)
    return float(acc.get_epsilon(delta))


def _check_q(q: float) -> float:
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate {q} is not in (0, 1]")
    return round(float(q), 9)  # rounds at the same rate are kept as one event, counted


@dataclass
class Ledger:
    """The privacy-relevant history of a fleet: central rounds by (q, z), and how often each
    device was selected under local DP; and the accountant that composes them.

    The accountant is kept composed in memory: a round costs one composition (about a
    second with the RDP accountant's default orders), and the look-ahead of the budget check
    (:meth:`preview`) is adopted by :meth:`add_round` instead of composed again.
    """

    mode: str
    z: float  # the configured noise multiplier (the combined one, under adaptive clipping)
    delta: float
    kind: str = "rdp"
    central: Counter[tuple[float, float]] = field(default_factory=Counter)
    selections: Counter[str] = field(default_factory=Counter)
    # Local DP: rounds whose selection is not known (a restored state's missed rounds): on
    # the safe side, they count for every device.
    anyone: int = 0
    _acc: Any = field(default=None, repr=False)
    _ahead: tuple[float, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._acc = _accountant(self.kind)

    @property
    def rounds(self) -> int:
        """The rounds the epsilon covers (for local DP: of the most selected device)."""
        if self.mode == "local":
            return max(self.selections.values(), default=0) + self.anyone
        return sum(self.central.values())

    def epsilon(self) -> float:
        """Epsilon at ``delta`` so far."""
        if self.mode == "local":
            return _local_epsilon(self.z, self.rounds, self.delta, self.kind)
        if not self.central:
            return 0.0
        with _quiet_orders():
            return float(self._acc.get_epsilon(self.delta))

    def preview(self, *, q: float = 1.0, devices: Iterable[str] = ()) -> float:
        """Epsilon as it would be after one more round: central DP at sampling rate ``q``;
        local DP with ``devices`` selected."""
        if self.mode == "local":
            counts = self.selections.copy()
            counts.update(devices)
            rounds = max(counts.values(), default=0) + self.anyone
            return _local_epsilon(self.z, rounds, self.delta, self.kind)
        q = _check_q(q)
        acc = copy.deepcopy(self._acc)
        with _quiet_orders():
            acc.compose(_central_event(q, self.z))
            self._ahead = (q, acc)
            return float(acc.get_epsilon(self.delta))

    def add_round(self, *, q: float = 1.0, devices: Iterable[str] = ()) -> None:
        """A round was announced: central DP, devices sampled at rate ``q``; local DP, these
        ``devices`` selected (each uploads a noised update)."""
        if self.mode == "local":
            self.selections.update(devices)
            return
        q = _check_q(q)
        if self._ahead is not None and self._ahead[0] == q:
            self._acc = self._ahead[1]
        else:
            with _quiet_orders():
                self._acc.compose(_central_event(q, self.z))
        self._ahead = None
        self.central[(q, self.z)] += 1

    def add_rounds(
        self, events: Iterable[tuple[float, float]], selections: Iterable[Iterable[str] | None]
    ) -> None:
        """Rounds counted at once (those a restored state missed): central DP, each a
        (sampling rate, noise multiplier), composed once per kind as :meth:`load` does; local
        DP, the devices each selected (None: not known, it counts for every device)."""
        if self.mode == "local":
            for devices in selections:
                if devices is None:
                    self.anyone += 1
                else:
                    self.selections.update(devices)
            return
        counts = Counter((_check_q(q), float(z)) for q, z in events)
        with _quiet_orders():
            for (q, z), n in sorted(counts.items()):
                self._acc.compose(_central_event(q, z), n)
                self.central[(q, z)] += n
        self._ahead = None

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "mode": self.mode,
            "central": [[q, z, n] for (q, z), n in sorted(self.central.items())],
            "selections": dict(sorted(self.selections.items())),
        }
        if self.anyone:
            data["anyone"] = self.anyone
        return json.dumps(data)

    @classmethod
    def load(cls, text: str | None, mode: str, z: float, delta: float, kind: str) -> Ledger:
        """The ledger kept in the state (a fresh one if none), composed again. A ledger of
        the other mode is an error: epsilon of one does not carry over to the other."""
        ledger = cls(mode, z, delta, kind)
        if not text:
            return ledger
        data = json.loads(text)
        if data.get("mode") != mode:
            raise ValueError(
                f"the state holds a {data.get('mode')}-DP privacy ledger, the config asks for"
                f" {mode} DP: start afresh with --reset-state, or keep the mode"
            )
        with _quiet_orders():
            for q, noise, n in data.get("central", []):
                key = (_check_q(q), float(noise))
                ledger.central[key] = int(n)
                ledger._acc.compose(_central_event(*key), int(n))
        ledger.selections.update({str(d): int(n) for d, n in data.get("selections", {}).items()})
        ledger.anyone = int(data.get("anyone", 0))
        return ledger
