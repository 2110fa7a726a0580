"""The aggregator's intake as named pure steps (no I/O), in the order they run::

    parse -> validate -> decode -> [clip] -> (the round keeps the delta; the strategy folds them)

and in a secure round (``aggregator/secure.py``)::

    [is_secagg: a stage message -> the round's SecAggServer]
    parse -> validate -> masked_input -> (folded into the masked sum) ... unmask, once, for
    the sum of the round (``SecureSum.advance``), never for one update

``fedge.aggregator.coordinator`` calls them for every message on ``update/{device}`` once its
chunks are whole. Each step turns untrusted bytes or values into the next stage's input or a
short reason (counted by the coordinator); a new mechanism (unmasking, a clip) is one step
added here and tested alone. Under homomorphic encryption ``he_round.HeModel.take`` stands
where ``decode`` does: a ciphertext is checked whole and folded into an encrypted sum.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from fedge.protocol import (
    DecodeError,
    SkipNotice,
    UpdateHeader,
    clip_l2,
    decode_delta,
    decode_skip,
    is_skip,
    parse_codec,
)
from fedge.protocol import decode as decode_envelope
from fedge.protocol.secagg import SecAggError

Answer: TypeAlias = UpdateHeader | SkipNotice


@dataclass(frozen=True)
class Parsed:
    header: Answer
    tensors: dict[str, np.ndarray]


def parse(payload: bytes, device: str) -> Parsed:
    """A whole update or skip notice from ``device`` (the topic's last level); DecodeError
    (with a counted reason) for anything else, including other message kinds."""
    if is_skip(payload):
        return Parsed(decode_skip(payload, device), {})
    decoded = decode_envelope(payload)
    if not isinstance(decoded.msg, UpdateHeader):
        raise DecodeError("schema", f"{decoded.msg.kind} message on an update topic")
    return Parsed(decoded.msg, decoded.tensors)


@dataclass(frozen=True)
class OpenRoundView:
    """What validation needs to know of the round that is open."""

    round_id: int
    selected: Collection[str]
    answered: Collection[str]


def validate(
    header: Answer,
    *,
    topic_device: str,
    round_: OpenRoundView | None,
    model_version: int,
    seen: bool,
    codec: str | None = None,
) -> str | None:
    """None if the answer counts in the open round, else the reason it does not.

    ``topic_device`` is the device the broker delivered it for (the topic, which the ACL
    binds to the sender); ``seen``: this device sent this update id before; ``codec``: the
    codec the round expects (``expected_codec``), None to take any.
    """
    if header.device_id != topic_device:
        return "topic_mismatch"
    if seen:
        return "duplicate"
    if round_ is None or header.round_id != round_.round_id:
        return "wrong_round"
    if header.device_id not in round_.selected:
        return "not_selected"
    if header.device_id in round_.answered:
        return "already_answered"
    if isinstance(header, UpdateHeader) and header.base_version != model_version:
        return "stale_base"
    if isinstance(header, UpdateHeader) and codec is not None and header.codec != codec:
        return "codec_mismatch"  # e.g. dense where the round asked for top-k
    ev = header.evaluation
    trained = isinstance(header, UpdateHeader) or header.trained
    if ev is not None and (not trained or ev.count > header.num_samples):
        # Only a device that trained evaluated, on no more examples than it trained on.
        return "bad_evaluation"
    return None


def expected_codec(announced: str, min_entries: int, size: int) -> str:
    """The codec every device of a round uses: the announced one, its top-k fraction raised
    to keep ``min_entries`` of the model's ``size`` entries."""
    return str(parse_codec(announced).with_min_entries(size, min_entries))


def decode(
    header: UpdateHeader, tensors: Mapping[str, np.ndarray], shapes: Mapping[str, list[int]]
) -> dict[str, np.ndarray]:
    """The dense float32 delta, checked against the model's shapes (CodecError otherwise)."""
    return decode_delta(dict(tensors), {"codec": header.codec, "shapes": dict(shapes)})


def masked_input(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The masked input of a secure round's update envelope: one uint8 tensor ``masked``
    (its size is checked against the round by ``SecAggServer.add_masked``)."""
    masked = tensors.get("masked")
    if set(tensors) != {"masked"} or masked is None or masked.dtype != np.uint8:
        raise SecAggError("bad_magic", "a secure update carries one uint8 tensor, masked")
    return masked.tobytes()


def clip(delta: Mapping[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    """Central DP: the decoded delta clipped to the round's L2 bound again, so the noised
    sum's sensitivity holds whatever a device sent (docs/privacy.md)."""
    return clip_l2(delta, bound)[0]
