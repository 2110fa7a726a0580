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

Two libraries, one signature scheme (Ed25519, RFC 8032): the aggregator signs with
``cryptography``'s ``Ed25519PrivateKey``; pinned keys are PyNaCl ``VerifyKey`` objects and verify
with libsodium, so a device's agent imports ``cryptography`` only for a secure round (it cost
an agent 7.5 MiB of peak RSS, PyNaCl about 1: bench/README.md). The functions that take or make
a private key import ``cryptography`` when called; the public key's PEM (SubjectPublicKeyInfo)
is read and written here, as the fixed 12 bytes of DER in front of the raw 32-byte key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from .errors import ProtocolError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MAGIC = b"FSG\x01"
KEY_ID_SIZE = 8
SIGNATURE_SIZE = 64
_LAYOUT = struct.Struct(f">4s{KEY_ID_SIZE}s{SIGNATURE_SIZE}s")
OVERHEAD = _LAYOUT.size  # 76 bytes in front of the envelope
KINDS = ("round", "global", "global_delta", "secagg")
_CONTEXT = b"fedge/v1 signed\0"
# An Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 },
# BIT STRING { the 32-byte key } }, always these 12 bytes and then the key.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN, _PEM_END = b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----"

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


def key_id(public_key: VerifyKey) -> bytes:
    return _raw_key_id(bytes(public_key))


def _raw_key_id(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()[:KEY_ID_SIZE]


def verify_key(private_key: Ed25519PrivateKey) -> VerifyKey:
    """The public half of ``private_key``, as ``verify`` takes it."""
    return VerifyKey(private_key.public_key().public_bytes_raw())


def is_signed(data: bytes) -> bool:
    return data[:4] == MAGIC


def _message(envelope: bytes | memoryview, fleet: str, kind: str, prefix: bytes = b"") -> bytes:
    """What a signature covers (with ``prefix`` in front: the signature, for libsodium)."""
    if kind not in KINDS:
        raise ValueError(f"signed kind must be one of {KINDS}, not {kind!r}")
    return b"".join([prefix, _CONTEXT, fleet.encode(), b"\0", kind.encode(), b"\0", envelope])


def sign(envelope: bytes, private_key: Ed25519PrivateKey, *, fleet: str, kind: str) -> bytes:
    """The envelope with a signature in front, for ``fleet``'s ``kind`` topic."""
    signature = private_key.sign(_message(envelope, fleet, kind))
    kid = _raw_key_id(private_key.public_key().public_bytes_raw())
    return _LAYOUT.pack(MAGIC, kid, signature) + envelope


def verify(data: bytes, keys: Sequence[VerifyKey], *, fleet: str, kind: str) -> bytes:
    """The envelope inside ``data`` if one of ``keys`` signed it for ``fleet`` and ``kind``."""
    if not is_signed(data) or len(data) < OVERHEAD:
        raise SignatureError("unsigned", f"{kind} message carries no signature")
    _, kid, signature = _LAYOUT.unpack_from(data)
    matching = [key for key in keys if key_id(key) == kid]
    if not matching:
        raise SignatureError("unknown_key", f"{kind} message signed by key {kid.hex()}")
    # libsodium checks signature + message in one buffer: one join copies the envelope in
    # (from a view, not a slice); the copy it hands back is dropped at once, and the
    # envelope returned is one more. Transient, for a payload the size of a model.
    view = memoryview(data)[OVERHEAD:]
    try:
        matching[0].verify(_message(view, fleet, kind, prefix=signature))
    except BadSignatureError as exc:
        raise SignatureError(
            "bad_signature", f"{kind} message for fleet {fleet} fails its signature"
        ) from exc
    return data[OVERHEAD:]


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS8); ValueError if it is anything else."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"want an Ed25519 private key, got {type(key).__name__}")
    return key


def load_public_key(pem: bytes) -> VerifyKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo, as ``fedge provision`` and
    ``openssl pkey -pubout`` write it: one ``PUBLIC KEY`` block); ValueError otherwise."""
    lines = [line.strip() for line in pem.strip().splitlines()]
    body = lines[1:-1]
    if len(lines) < 3 or (lines[0], lines[-1]) != (_PEM_BEGIN, _PEM_END) or b"-" in b"".join(body):
        got = "no PUBLIC KEY block alone"
    else:
        try:
            der = base64.b64decode(b"".join(body), validate=True)
        except binascii.Error:
            got = "a block that is not base64"
        else:
            if len(der) == len(_SPKI_PREFIX) + 32 and der.startswith(_SPKI_PREFIX):
                return VerifyKey(der[len(_SPKI_PREFIX) :])
            got = f"{len(der)} bytes of another kind of key"
    raise ValueError(
        f"want an Ed25519 public key (PEM PUBLIC KEY: 44 bytes, {_SPKI_PREFIX.hex()} and the"
        f" 32-byte key), got {got}"
    )


def private_pem(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: VerifyKey) -> bytes:
    """The PEM ``load_public_key`` reads, byte for byte as ``cryptography`` and OpenSSL write it."""
    body = base64.b64encode(_SPKI_PREFIX + bytes(key))  # 60 characters: one line
    return b"\n".join([_PEM_BEGIN, body, _PEM_END, b""])
