"""A secure round on the aggregator (docs/secure-aggregation.md): the stages of
``SecAggServer`` against the clock, and the round's unmasked sum, with no I/O.

``SecureSum`` stands where a plain round keeps its running sum (``accumulate.py``): the
coordinator feeds it the devices' stage messages (``add_stage``), their masked inputs
(``add_masked``) and the skip notices of devices that hold their update back (``hold``), and
calls ``advance`` on every tick. ``advance`` closes a stage when every device still expected
has answered or its deadline has passed, and returns what to send next (to each device, or
to all). Stage deadlines::

    advertise   started + stage_timeout (at most the round's deadline)
    shares      the round's deadline (a device sends its shares as soon as the key list is
                in, then trains)
    masked      the round's deadline, and at least MASK_GRACE after the shares (each device
                masks once it has trained and its neighbours' shares are in)
    unmask      stage_timeout after the survivors are announced

Once the unmask answers are in, the sum is dequantised (``finished``), and ``weighted_sum``
and ``mean`` give it to the coordinator as a running sum would: every device weighs 1 (the
aggregator cannot weight an update it never sees; sample counts travel in the clear, but a
device that weighted its own update would have to leave the shared range). A trained device
that held its update back counts as a zero update, as in a plain round; it is a dropout for
the protocol. ``SecAggAbort`` from ``advance``: the round cannot finish securely and fails.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
from fedge.protocol.secagg import (
    SecAggError,
    SecAggServer,
    SecureRound,
    dequantize_sum,
)
from fedge.protocol.secagg.server import Stage
from fedge.protocol.secagg.wire import HEADER_BYTES, MAGIC, Kind

from .accumulate import RoundAnswers
from .strategies.base import Combiner

Weights = Mapping[str, np.ndarray]
MASK_GRACE = 2.0  # seconds


@dataclass
class Outgoing:
    """What a stage's close sends: a message per device, or one for all."""

    to_devices: dict[str, bytes] = field(default_factory=dict)
    to_all: bytes | None = None
    stage: str = ""


class SecureSum(RoundAnswers):
    keeps_deltas = False

    def __init__(
        self,
        plan: SecureRound,
        *,
        started: float,
        deadline: float,
        stage_timeout: float,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.server = SecAggServer(plan.params)
        self.deadline = deadline
        self.stage_timeout = stage_timeout
        self._stage_deadline = min(deadline, started + stage_timeout)
        self.total: dict[str, np.ndarray] | None = None  # the unmasked sum, once finished
        self.survivors = 0

    @property
    def stage(self) -> str:
        return self.server.stage.value

    @property
    def finished(self) -> bool:
        return self.total is not None

    # -- intake -------------------------------------------------------------------------------
    def add_stage(self, device: str, payload: bytes) -> None:
        """A stage message (advertise, shares, unmask); SecAggError if it cannot be taken."""
        if len(payload) < HEADER_BYTES or payload[:3] != MAGIC:
            raise SecAggError("bad_magic", "not a secure-aggregation message")
        kind = payload[4]
        if kind == Kind.ADVERTISE:
            self.server.add_advertise(device, payload)
        elif kind == Kind.SHARES:
            self.server.add_shares(device, payload)
        elif kind == Kind.UNMASK:
            self.server.add_unmask(device, payload)
        else:
            raise SecAggError("wrong_stage", f"a message of kind {kind} from a device")

    def add_masked(self, device: str, masked: bytes) -> None:
        """A device's masked input (the message inside its update envelope)."""
        self.server.add_masked(device, masked)
        self._enter(device, 1, uploaded=True)

    def hold(self, device: str, n: int) -> None:
        """A device that trained and held its update back: a zero update in the mean, and a
        dropout for the protocol (its pairwise masks come off through its neighbours)."""
        super().hold(device, n)
        self.drop(device)

    def drop(self, device: str) -> None:
        """A device that will send no masked input (a skip notice)."""
        server = self.server
        answered = server.masked | server.skipped
        if server.stage is Stage.MASKED and device in server.u2 and device not in answered:
            server.add_skip(device)

    # -- the stages ---------------------------------------------------------------------------
    def advance(self, now: float, selected: Collection[str], gone: Collection[str]) -> Outgoing:
        """Close the open stage if every device still expected has answered (``gone``: the
        devices that said they will not) or its deadline has passed; SecAggAbort if the
        round cannot finish securely."""
        server, stage = self.server, self.server.stage
        out = Outgoing(stage=stage.value)
        expired = now >= self._stage_deadline
        if stage is Stage.ADVERTISE:
            if expired or set(selected) - set(gone) <= server.advertised:
                out.to_devices = server.close_advertise()
                self._stage_deadline = self.deadline
        elif stage is Stage.SHARES:
            if expired or server.u1 - set(gone) <= server.shared:
                out.to_devices = server.close_shares()
                self._stage_deadline = max(self.deadline, now + MASK_GRACE)
        elif stage is Stage.MASKED:
            for device in gone:
                self.drop(device)
            if expired or server.u2 <= server.masked | server.skipped:
                out.to_all = server.close_masked()
                self._stage_deadline = now + self.stage_timeout
        elif stage is Stage.UNMASK and (expired or server.u3 <= server.unmasked):
            self._finish()
        if out.to_devices and len(set(out.to_devices.values())) == 1:
            # The complete graph: every device's message is the same bytes; send it once.
            out.to_all, out.to_devices = next(iter(out.to_devices.values())), {}
        return out

    def _finish(self) -> None:
        p = self.plan.params
        ring_sum = self.server.finish()
        self.survivors = len(self.server.u3)
        vector = dequantize_sum(
            ring_sum,
            p.k,
            count=self.survivors,
            max_devices=len(p.devices),
            clip=p.clip,
            bits=p.bits,
        )
        self.total = self.plan.unflatten(vector)

    # -- what the coordinator takes, as from a running sum ------------------------------------
    def weighted_sum(
        self, used: Mapping[str, int], fetch: Callable[[str], Weights]
    ) -> dict[str, np.ndarray]:
        """The sum of the survivors' updates (float64); every device weighs 1."""
        self._check_final(used)
        if self.total is None:
            raise ValueError("the secure round is not unmasked yet")
        if any(n != 1 for n in used.values()):
            raise ValueError("every device weighs 1 in a secure round")
        return {k: v.copy() for k, v in self.total.items()}

    def mean(
        self, used: Mapping[str, int], fetch: Callable[[str], Weights], combiner: Combiner
    ) -> dict[str, np.ndarray]:
        """The sum over the devices in the round: the survivors and the trained held-back."""
        out = self.weighted_sum(used, fetch)
        count = float(len(used))
        for acc in out.values():
            acc /= count
        return out
