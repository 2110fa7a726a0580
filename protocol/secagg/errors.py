"""The errors of secure aggregation, a branch of ``fedge.protocol``'s tree::

    ProtocolError
    └── SecAggError             a message that cannot be trusted, or a step out of order;
        │                       ``reason`` is one of ``SECAGG_REASONS`` (counted, logged once)
        └── SecAggAbort         the round cannot finish securely (too few devices left, the
                                surviving graph split): every party drops its state for it

A ``SecAggError`` from one device's message rejects that message (the device then counts as a
dropout); a ``SecAggAbort`` ends the secure round, and the aggregator starts a new one.
"""

from __future__ import annotations

from ..errors import ProtocolError

SECAGG_REASONS = frozenset(
    {
        "bad_params",  # round parameters out of range (threshold, bits, degree, devices)
        "bad_magic",  # not a secure-aggregation message of this version
        "wrong_stage",  # a message kind the party does not expect now
        "wrong_round",  # a round id (or round context) other than the party's
        "too_short",  # fewer bytes than the message declares
        "too_large",  # more bytes than the message may have
        "trailing_bytes",  # bytes left after the last field
        "unknown_device",  # a device that is not in the round (or not a neighbour)
        "duplicate",  # a device that already sent this stage's message
        "bad_key",  # a public key that is not usable, repeated, or not the one advertised
        "bad_keylist",  # a key list without this device's own keys, or inconsistent
        "bad_bitmap",  # a set that is not a subset of the one before it
        "bad_ciphertext",  # a share that fails authentication (tampered, or not for us)
        "bad_share",  # a share or reconstructed secret that is inconsistent
        "too_few",  # fewer devices than the threshold: the round cannot go on securely
        "disconnected",  # the surviving devices' graph is split: partial sums would leak
    }
)


class SecAggError(ProtocolError):
    """A secure-aggregation message that cannot be trusted; ``reason`` in ``SECAGG_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in SECAGG_REASONS:
            raise ValueError(f"unknown secure-aggregation reason {reason!r}")
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class SecAggAbort(SecAggError):
    """The secure round cannot be finished; nothing of it may be used."""
