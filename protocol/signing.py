"""Signed payloads: the aggregator signs every round announcement and global model (Ed25519).

Anyone who may publish on the broker could otherwise replace the retained ``round`` or
``global`` message that every agent obeys. A signed payload wraps the envelope::

    offset  size  field
    0       4     magic b"FSG" + version 0x01
    4       8     key id: the first 8 bytes of SHA-256 over the raw 32-byte public key
    12      64    Ed25519 signature
    76      ...   the envelope (envelope.py)

The signature covers ``b"fedge/v1 signed\\0" + fleet + b"\\0" + kind + b"\\0" + envelope``:
the fleet and the topic kind (``round``, ``global``, ``global_delta``, or ``secagg`` for the
aggregator's secure-aggregation messages, whose payload names the device they are for) bind it
to where it was published, and
the envelope's header carries the round id and the model version, so a verified payload says
exactly which fleet, round and model it is for. Whether it is new is for the receiver to judge
(a replayed old message verifies); see ``fedge.agent.daemon``.

``verify`` accepts any of the pinned keys (one, or two while a key is rotated) and raises
``SignatureError`` with a ``reason`` from :data:`SIGNATURE_REASONS` otherwise.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ProtocolError

MAGIC = b"FSG\x01"
KEY_ID_SIZE = 8
SIGNATURE_SIZE = 64
_LAYOUT = struct.Struct(f">4s{KEY_ID_SIZE}s{SIGNATURE_SIZE}s")
OVERHEAD = _LAYOUT.size  # 76 bytes in front of the envelope
KINDS = ("round", "global", "global_delta", "secagg")
_CONTEXT = b"fedge/v1 signed\0"

SIGNATURE_REASONS = frozenset(
    {
        "unsigned",  # no signature where one is required
        "unknown_key",  # signed with a key that is not pinned
        "bad_signature",  # the signature does not match (forged, altered, other fleet or topic)
    }
)


class SignatureError(ProtocolError):
    """A payload whose signature cannot be trusted. ``reason`` is one of SIGNATURE_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in SIGNATURE_REASONS:
            raise ValueError(f"unknown signature reason {reason!r}")
        self.reason = reason
        super().__init__(f"{reason}: {message}")


def key_id(public_key: Ed25519PublicKey) -> bytes:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:KEY_ID_SIZE]


def is_signed(data: bytes) -> bool:
    return data[:4] == MAGIC


def _message(envelope: bytes, fleet: str, kind: str) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"signed kind must be one of {KINDS}, not {kind!r}")
    return b"".join([_CONTEXT, fleet.encode(), b"\0", kind.encode(), b"\0", envelope])


def sign(envelope: bytes, private_key: Ed25519PrivateKey, *, fleet: str, kind: str) -> bytes:
    """The envelope with a signature in front, for ``fleet``'s ``kind`` topic."""
    signature = private_key.sign(_message(envelope, fleet, kind))
    return _LAYOUT.pack(MAGIC, key_id(private_key.public_key()), signature) + envelope


def verify(data: bytes, keys: Sequence[Ed25519PublicKey], *, fleet: str, kind: str) -> bytes:
    """The envelope inside ``data`` if one of ``keys`` signed it for ``fleet`` and ``kind``."""
    if not is_signed(data) or len(data) < OVERHEAD:
        raise SignatureError("unsigned", f"{kind} message carries no signature")
    _, kid, signature = _LAYOUT.unpack_from(data)
    envelope = data[OVERHEAD:]
    matching = [key for key in keys if key_id(key) == kid]
    if not matching:
        raise SignatureError("unknown_key", f"{kind} message signed by key {kid.hex()}")
    try:
        matching[0].verify(signature, _message(envelope, fleet, kind))
    except InvalidSignature as exc:
        raise SignatureError(
            "bad_signature", f"{kind} message for fleet {fleet} fails its signature"
        ) from exc
    return envelope


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS8); ValueError if it is anything else."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"want an Ed25519 private key, got {type(key).__name__}")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo); ValueError otherwise."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"want an Ed25519 public key, got {type(key).__name__}")
    return key


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
