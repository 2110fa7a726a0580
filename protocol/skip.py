"""The skip notice on the wire: 22 bytes (34 with an evaluation), so that not sending an
update costs almost nothing.

A selected device that does not upload still answers, so the aggregator can tell a skip
from a dropout. The device id is the topic's last level (``update/{device}``), so the
payload carries only::

    b"FDS" 0x01 | round_id u32 | num_samples u32 | update_id 8 bytes | flags u8 | reason u8

big-endian. ``flags`` bit 0: the device trained (its update was too small to be worth
sending and stays in its residual). ``reason`` indexes :data:`REASONS`; unknown codes
decode as ``"other"``. ``flags`` bit 1: the device evaluated the global model before
training (federated evaluation), and 12 bytes follow::

    count u32 | loss f32 | metric f32

with ``flags`` bit 2 saying the metric is the mean absolute error, else accuracy. ``flags``
bit 3: a quiet device rests (``SkipNotice.rest``), and one byte follows, last::

    rest u8        # rounds it will not take part in

Notices without an evaluation or a rest keep the 22 bytes of before.
"""

from __future__ import annotations

import struct

from pydantic import ValidationError

from .errors import DecodeError
from .messages import Evaluation, SkipNotice

MAGIC = b"FDS\x01"
_LAYOUT = struct.Struct(">4sII8sBB")
SIZE = _LAYOUT.size  # 22 bytes of payload
_EVAL = struct.Struct(">Iff")
EVAL_SIZE = SIZE + _EVAL.size  # 34 bytes with an evaluation
TRAINED, EVALUATED, MAE, RESTS = 1, 2, 4, 8  # flag bits

# Append only: the index is the wire code.
REASONS = (
    "other",
    "small_update",  # the gate: ||update|| / ||w_global|| below the threshold
    "irrelevant",  # the gate: signs disagree with the last global update (CMFL)
    "battery_low",
    "battery_unknown",
    "power_unknown",
    "too_hot",
    "busy",
    "budget_exhausted",
    "not_ready",
    "he_no_key",  # the round is homomorphically encrypted and the device has no key
    "he_required",  # the device has the key and the round is not encrypted
)
_CODES = {reason: code for code, reason in enumerate(REASONS)}


def is_skip(payload: bytes) -> bool:
    return payload[:4] == MAGIC


def encode_skip(notice: SkipNotice) -> bytes:
    """Pack a skip notice; its ``update_id`` must be 16 hex digits (8 bytes)."""
    try:
        uid = bytes.fromhex(notice.update_id)
    except ValueError as exc:
        raise ValueError(f"skip update_id must be 16 hex digits, got {notice.update_id!r}") from exc
    if len(uid) != 8:
        raise ValueError(f"skip update_id must be 16 hex digits, got {notice.update_id!r}")
    ev = notice.evaluation
    flags = (TRAINED if notice.trained else 0) | (EVALUATED if ev is not None else 0)
    tail = b""
    if ev is not None:
        flags |= MAE if ev.mae is not None else 0
        metric = ev.mae if ev.mae is not None else ev.accuracy
        tail = _EVAL.pack(ev.count, ev.loss, metric)
    if notice.rest:
        flags |= RESTS
        tail += bytes([notice.rest])
    return (
        _LAYOUT.pack(
            MAGIC, notice.round_id, notice.num_samples, uid, flags, _CODES.get(notice.reason, 0)
        )
        + tail
    )


def decode_skip(payload: bytes, device_id: str) -> SkipNotice:
    """Unpack a skip notice from ``device_id`` (taken from the topic)."""
    flags = payload[SIZE - 2] if len(payload) >= SIZE else 0
    want = (EVAL_SIZE if flags & EVALUATED else SIZE) + (1 if flags & RESTS else 0)
    if len(payload) != want:
        raise DecodeError(
            "too_short" if len(payload) < want else "trailing_bytes",
            f"skip notice of {len(payload)} bytes, want {want}",
        )
    magic, round_id, num_samples, uid, flags, code = _LAYOUT.unpack_from(payload)
    if magic != MAGIC:
        raise DecodeError("bad_magic", "not a skip notice")
    if round_id < 1:
        raise DecodeError("schema", "skip notice for round 0")
    try:
        evaluation = None
        if flags & EVALUATED:
            count, loss, metric = _EVAL.unpack_from(payload, SIZE)
            key = "mae" if flags & MAE else "accuracy"
            evaluation = Evaluation.model_validate({"count": count, "loss": loss, key: metric})
        return SkipNotice(
            rest=payload[-1] if flags & RESTS else 0,
            device_id=device_id,
            round_id=round_id,
            update_id=uid.hex(),
            reason=REASONS[code] if code < len(REASONS) else "other",
            trained=bool(flags & TRAINED),
            num_samples=num_samples,
            evaluation=evaluation,
        )
    except ValidationError as exc:  # e.g. a NaN loss, an accuracy above 1
        raise DecodeError("schema", f"skip notice: {exc.errors()[0]['msg']}") from exc
