"""Key agreement, share encryption and the mask generator of secure aggregation (pure).

Everything is built from ``cryptography`` (OpenSSL), with primitives that are fast on a
Raspberry Pi without AES instructions (the Pi 4's Cortex-A72 has none): X25519, HKDF-SHA256,
ChaCha20 and ChaCha20-Poly1305.

- Key agreement: X25519 (RFC 7748). A device has two key pairs per round: ``c`` to encrypt
  the shares it sends its neighbours, and ``s`` whose agreement with a neighbour's ``s``
  seeds their pairwise mask. The ``s`` private key is derived from a 16-byte seed (HKDF), so
  that the seed, not the 32-byte key, is what gets secret-shared (shares stay small); the
  seed has the 128-bit strength of X25519 itself.
- Every derived key comes from HKDF-SHA256 with an ``info`` that names its purpose and the
  round context (fleet, round id, round seed) and, for pairwise keys, both device ids.
- Share encryption: ChaCha20-Poly1305 (RFC 8439) under a key derived for one direction
  (sender -> receiver) of one round, so each key encrypts exactly one message and the nonce
  can be the fixed zero nonce. The associated data binds sender, receiver, round and fleet:
  a ciphertext replayed to another device, round or fleet fails authentication.
- Mask generator (PRG): the ChaCha20 keystream (RFC 8439 block function, 32-byte key, block
  counter starting at 0, zero nonce) read as little-endian uint32 words, each reduced mod
  2^k by keeping its low k bits (uniform, since 2^k divides 2^32). Defined by bytes alone:
  identical on every machine, byte order and Python or numpy version.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import SecAggError

RandomBytes = Callable[[int], bytes]
LABEL = b"fedge/secagg/v1"
KEY_BYTES = 32  # an X25519 public key
SEED_BYTES = 16  # the self-mask seed b_u and the seed of the mask key pair s_u
TAG_BYTES = 16  # Poly1305
_ZERO_NONCE = bytes(12)


def field(value: bytes | str | int) -> bytes:
    """One length-prefixed field of a derivation context, so that concatenations of
    different fields can never collide."""
    if isinstance(value, int):
        data = struct.pack("<Q", value)
    elif isinstance(value, str):
        data = value.encode()
    else:
        data = value
    return struct.pack("<H", len(data)) + data


def round_context(fleet: str, round_id: int, seed: bytes) -> bytes:
    """What binds every derived key and ciphertext to one round of one fleet."""
    return field(fleet) + field(round_id) + field(seed)


def hkdf(secret: bytes, purpose: bytes, context: bytes, length: int = 32) -> bytes:
    return HKDF(
        hashes.SHA256(), length=length, salt=None, info=LABEL + field(purpose) + context
    ).derive(secret)


# -- key pairs --------------------------------------------------------------------------------


def encryption_key(random_bytes: RandomBytes) -> X25519PrivateKey:
    """A fresh ``c`` key pair (only its public half leaves the device)."""
    return X25519PrivateKey.from_private_bytes(random_bytes(32))


def mask_key(seed: bytes, context: bytes) -> X25519PrivateKey:
    """The ``s`` key pair of a device, derived from its 16-byte secret-shared seed."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask-key seed has {SEED_BYTES} bytes, not {len(seed)}")
    return X25519PrivateKey.from_private_bytes(hkdf(seed, b"mask-key", context))


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_public(data: bytes) -> X25519PublicKey:
    """A peer's public key; SecAggError("bad_key") unless 32 bytes."""
    if len(data) != KEY_BYTES:
        raise SecAggError("bad_key", f"a public key has {KEY_BYTES} bytes, not {len(data)}")
    return X25519PublicKey.from_public_bytes(data)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 shared secret; SecAggError("bad_key") for a low-order peer key (the
    agreement is all zeros, which OpenSSL refuses)."""
    try:
        return private.exchange(load_public(peer_public))
    except ValueError as exc:
        raise SecAggError("bad_key", f"the key agreement failed: {exc}") from exc


def pair_ids(a: str, b: str) -> bytes:
    """Both device ids, in sorted order: the same bytes on either side of the pair."""
    lo, hi = sorted((a, b))
    return field(lo) + field(hi)


# -- pairwise and self masks ------------------------------------------------------------------


def pair_mask_key(shared: bytes, context: bytes, a: str, b: str) -> bytes:
    """The ChaCha20 key of the pairwise mask between devices ``a`` and ``b`` (symmetric)."""
    return hkdf(shared, b"pair-mask", context + pair_ids(a, b))


def self_mask_key(seed: bytes, context: bytes, device: str) -> bytes:
    """The ChaCha20 key of a device's self mask, from its secret-shared seed b_u."""
    return hkdf(seed, b"self-mask", context + field(device))


def prg(key: bytes, count: int, bits: int) -> np.ndarray:
    """``count`` uint32 values uniform in [0, 2^bits): the ChaCha20 keystream of ``key``
    (block counter 0, zero nonce) as little-endian words, low ``bits`` bits kept."""
    if not 1 <= bits <= 32:
        raise ValueError(f"a mask has 1-32 bits per entry, not {bits}")
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(4 * count)), dtype="<u4").astype(np.uint32)
    if bits < 32:
        words &= np.uint32((1 << bits) - 1)
    return words


# -- share encryption -------------------------------------------------------------------------


def _share_key(shared: bytes, context: bytes, sender: str, receiver: str) -> bytes:
    return hkdf(shared, b"share", context + field(sender) + field(receiver))


def _associated(context: bytes, sender: str, receiver: str) -> bytes:
    return LABEL + field(b"share") + context + field(sender) + field(receiver)


def encrypt_share(
    shared: bytes, context: bytes, sender: str, receiver: str, plaintext: bytes
) -> bytes:
    """ChaCha20-Poly1305 of ``plaintext`` from ``sender`` to ``receiver`` in this round."""
    aead = ChaCha20Poly1305(_share_key(shared, context, sender, receiver))
    return aead.encrypt(_ZERO_NONCE, plaintext, _associated(context, sender, receiver))


def decrypt_share(
    shared: bytes, context: bytes, sender: str, receiver: str, ciphertext: bytes
) -> bytes:
    """The plaintext; SecAggError("bad_ciphertext") if it was altered, or was meant for
    another sender, receiver, round or fleet."""
    aead = ChaCha20Poly1305(_share_key(shared, context, sender, receiver))
    try:
        return aead.decrypt(_ZERO_NONCE, ciphertext, _associated(context, sender, receiver))
    except InvalidTag as exc:
        raise SecAggError(
            "bad_ciphertext", f"the share from {sender} to {receiver} fails authentication"
        ) from exc
