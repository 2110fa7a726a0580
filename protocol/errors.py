"""Every error ``fedge.protocol`` raises, in one tree::

    ProtocolError                 base of everything below
    ├── InvalidId (ValueError)    a fleet/device/update id, topic prefix, topic or filter
    │                             that breaks the naming rules
    ├── EncodeError (ValueError)  a message or tensor that cannot be put on the wire
    ├── DecodeError               bytes from the wire that cannot be trusted; ``reason`` is a
    │                             short stable code from ``DECODE_REASONS`` for metrics
    ├── CodecError (codecs.py)    delta tensors/meta that cannot be trusted (CODEC_REASONS)
    ├── HeError (he.py)           HE key files and encrypted payloads that cannot be used
    │   (ValueError)              (HE_REASONS); HeUnavailable: TenSEAL is not installed
    ├── ChunkError (chunking.py)  a chunk that is corrupt, inconsistent, duplicate or late
    ├── SignatureError (signing.py)  a round or global model that is unsigned, signed by a
    │                             key not pinned, or whose signature fails (SIGNATURE_REASONS)
    ├── SecAggError (secagg/errors.py)  a secure-aggregation message that cannot be trusted
    │   │                         (SECAGG_REASONS)
    │   └── SecAggAbort           the secure round cannot finish (too few devices left)
    └── LinkError                 the transport failed (connect, subscribe, publish); paho's
                                  own errors are converted at the boundary (``from exc``)

Pydantic's ``ValidationError`` is what constructing a message with bad fields raises; on the
wire it becomes ``DecodeError("schema", ...)``.
"""

from __future__ import annotations

DECODE_REASONS = frozenset(
    {
        "too_large",  # payload over Limits.max_payload, or a tensor over max_elements
        "too_short",  # shorter than the fixed 8-byte preamble
        "bad_magic",  # does not start with b"FDG"
        "bad_version",  # envelope version we do not speak
        "header_too_large",  # declared header length over Limits.max_header
        "truncated",  # fewer bytes than the header or the tensors declare
        "bad_header_json",  # header is not UTF-8 JSON (or uses NaN/Infinity, duplicate keys)
        "schema",  # header JSON has the wrong structure, or the message fails validation
        "too_many_tensors",  # more tensors than Limits.max_tensors
        "duplicate_tensor",  # two tensors with one name
        "bad_dtype",  # dtype outside the allowed set
        "bad_shape",  # shape is not a short list of non-negative ints
        "trailing_bytes",  # bytes left after the last tensor
    }
)


class ProtocolError(Exception):
    """Base class of every error raised by ``fedge.protocol``."""


class InvalidId(ProtocolError, ValueError):
    """A name on the wire breaks the rules; ``kind`` says which name, ``value`` what it was."""

    def __init__(self, kind: str, value: object, rule: str = "") -> None:
        self.kind = kind
        self.value = value
        detail = f": {rule}" if rule else ""
        super().__init__(f"invalid {kind} {value!r}{detail}")


class EncodeError(ProtocolError, ValueError):
    """A message or tensor cannot be encoded (unknown kind, dtype not allowed, ...)."""


class DecodeError(ProtocolError):
    """Bytes that cannot be trusted. ``reason`` is one of ``DECODE_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown decode reason {reason!r}")
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class LinkError(ProtocolError):
    """The transport failed: cannot connect, subscribe or publish."""
