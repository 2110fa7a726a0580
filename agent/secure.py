"""A device's part in a secure round (docs/secure-aggregation.md), without I/O.

``fedge.agent.daemon`` opens one ``SecureTurn`` when a round with ``TrainingConfig.secure``
selects the device and publishes its ``advertise()``. The aggregator's messages then come on
``secagg/{device}`` and ``secagg``, signed; ``answer`` takes one (its signature already
checked) and says what to do::

    KEYS       -> publish SHARES, then train        (our shares, for our neighbours; the
                                                    sealed update is kept here: ``prepare``)
    FORWARD    -> mask the prepared update, publish it in an update envelope
    SURVIVORS  -> publish UNMASK, and the turn is over

A message that cannot be trusted or comes out of order (``SecAggError``) ends the turn: the
client forgets its secrets and the device counts as a dropout, which the protocol survives.
The same message again for a stage already answered is ignored (``Answer.repeated``): QoS 1
is at least once, and the broker delivers a message again when its PUBACK was lost. A device
that holds its update back (the gate, the byte budget) sends its skip notice instead of a
masked input, and so drops out after sharing its keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum

import numpy as np
from fedge.protocol import Evaluation, RoundAnnouncement
from fedge.protocol.secagg import SecAggClient, SecAggError, SecureRound, addressed
from fedge.protocol.secagg.wire import HEADER_BYTES, MAGIC, Kind

from .update import Sealed


@dataclass(frozen=True)
class Prepared:
    """A trained update waiting for the neighbours' shares before it can be masked."""

    update_id: str
    base_version: int
    sealed: Sealed
    kept: dict[str, np.ndarray] | None  # the residual once it is sent
    num_samples: int
    train_loss: float | None
    evaluation: Evaluation | None
    within_clip: bool | None
    log_line: tuple


class Action(Enum):
    PUBLISH = "publish"  # send ``payload`` on the update topic
    MASKED = "masked"  # ``payload`` is the masked input: send it in an update envelope
    NOTHING = "nothing"


@dataclass(frozen=True)
class Answer:
    action: Action
    payload: bytes = b""
    done: bool = False  # the turn is over
    trains: bool = False  # now train, and prepare the update
    repeated: bool = False  # a stage message answered before, delivered again: ignored


class SecureTurn:
    def __init__(self, plan: SecureRound, device: str, announcement: RoundAnnouncement) -> None:
        self.plan = plan
        self.announcement = announcement
        self.round_id = plan.params.round_id
        self.device = device
        self.client = SecAggClient(plan.params, device)
        self.prepared: Prepared | None = None
        self._forwarded = False
        # The digest of the message answered at each stage: a copy of it is a redelivery,
        # any other message of that stage is out of order.
        self._answered: dict[int, bytes] = {}

    def advertise(self) -> bytes:
        return self.client.advertise()

    def prepare(self, prepared: Prepared) -> None:
        self.prepared = prepared

    def kind_of(self, data: bytes) -> tuple[int, bytes]:
        """The stage kind and the message of an addressed payload (for this device or all)."""
        message = addressed(data, self.device)
        if len(message) < HEADER_BYTES or message[:3] != MAGIC:
            raise SecAggError("bad_magic", "not a secure-aggregation message")
        return message[4], message

    def answer(self, data: bytes) -> Answer:
        """What to send for one of the aggregator's messages (SecAggError if it cannot be
        trusted or comes out of order; the turn is then over). A copy of a message already
        answered is ``repeated``: nothing to send, and the turn goes on."""
        kind, message = self.kind_of(data)
        digest = hashlib.sha256(message).digest()
        if self._answered.get(kind) == digest:
            return Answer(Action.NOTHING, repeated=True)
        answer = self._answer(kind, message)
        self._answered[kind] = digest
        return answer

    def _answer(self, kind: int, message: bytes) -> Answer:
        if kind == Kind.KEYS:
            return Answer(Action.PUBLISH, self.client.share_keys(message), trains=True)
        if kind == Kind.FORWARD:
            self.client.receive_shares(message)
            self._forwarded = True
            if self.prepared is None:
                # No update to mask (not trained yet, or held back): a dropout from here.
                self.client.abort()
                return Answer(Action.NOTHING, done=True)
            return Answer(Action.MASKED, self.client.masked_input(self.prepared.sealed.vector))
        if kind == Kind.SURVIVORS:
            return Answer(Action.PUBLISH, self.client.unmask(message), done=True)
        raise SecAggError("wrong_stage", f"a message of kind {kind} from the aggregator")

    def abort(self) -> None:
        self.client.abort()
