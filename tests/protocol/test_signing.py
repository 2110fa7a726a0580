"""Signed rounds and global models: what verifies, and why the rest does not."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedge.protocol import GlobalModelHeader, SignatureError, encode, is_signed, sign, verify
from fedge.protocol.signing import (
    OVERHEAD,
    key_id,
    load_private_key,
    load_public_key,
    private_pem,
    public_pem,
    verify_key,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey, VerifyKey

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
ENVELOPE = encode(GlobalModelHeader(fleet="f", model_version=3, round_id=3))


def test_a_signed_payload_verifies_and_gives_back_the_envelope() -> None:
    signed = sign(ENVELOPE, KEY, fleet="f", kind="global")
    assert is_signed(signed) and len(signed) == len(ENVELOPE) + OVERHEAD
    assert verify(signed, [verify_key(KEY)], fleet="f", kind="global") == ENVELOPE


def test_either_of_two_pinned_keys_verifies() -> None:
    keys = [verify_key(OTHER), verify_key(KEY)]  # rotation: old and new pinned together
    assert verify(sign(ENVELOPE, KEY, fleet="f", kind="round"), keys, fleet="f", kind="round")
    assert verify(sign(ENVELOPE, OTHER, fleet="f", kind="round"), keys, fleet="f", kind="round")


@pytest.mark.parametrize(
    ("data", "fleet", "kind", "reason"),
    [
        (ENVELOPE, "f", "global", "unsigned"),
        (sign(ENVELOPE, OTHER, fleet="f", kind="global"), "f", "global", "unknown_key"),
        (sign(ENVELOPE, KEY, fleet="g", kind="global"), "f", "global", "bad_signature"),
        (sign(ENVELOPE, KEY, fleet="f", kind="round"), "f", "global", "bad_signature"),
        (
            sign(ENVELOPE, KEY, fleet="f", kind="global")[:-1] + b"\0",
            "f",
            "global",
            "bad_signature",
        ),
        (sign(ENVELOPE, KEY, fleet="f", kind="global")[:40], "f", "global", "unsigned"),
    ],
    ids=["unsigned", "other-key", "other-fleet", "other-topic", "altered", "truncated"],
)
def test_what_does_not_verify(data: bytes, fleet: str, kind: str, reason: str) -> None:
    with pytest.raises(SignatureError) as err:
        verify(data, [verify_key(KEY)], fleet=fleet, kind=kind)
    assert err.value.reason == reason


def test_a_forged_signature_under_the_right_key_id_is_refused() -> None:
    forged = sign(ENVELOPE, OTHER, fleet="f", kind="global")
    forged = forged[:4] + key_id(verify_key(KEY)) + forged[12:]
    with pytest.raises(SignatureError) as err:
        verify(forged, [verify_key(KEY)], fleet="f", kind="global")
    assert err.value.reason == "bad_signature"


def spki_pem(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    """The public half in PEM as cryptography (OpenSSL) writes it."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_keys_round_trip_through_pem_as_openssl_writes_it() -> None:
    assert private_pem(load_private_key(private_pem(KEY))) == private_pem(KEY)
    assert public_pem(verify_key(KEY)) == spki_pem(KEY)  # byte for byte
    assert bytes(load_public_key(spki_pem(KEY))) == bytes(verify_key(KEY))
    crlf = b"\r\n".join(spki_pem(KEY).splitlines()) + b"\r\n"
    assert bytes(load_public_key(crlf)) == bytes(verify_key(KEY))


@pytest.mark.parametrize(
    ("pem", "got"),
    [
        (spki_pem(ec.generate_private_key(ec.SECP256R1())), "91 bytes of another kind of key"),
        (private_pem(KEY), "no PUBLIC KEY block alone"),
        (spki_pem(KEY) * 2, "no PUBLIC KEY block alone"),
        (b"", "no PUBLIC KEY block alone"),
        (spki_pem(KEY).replace(b"MCow", b"MC*w"), "a block that is not base64"),
        (spki_pem(KEY).replace(b"MCow", b"MCo"), "a block that is not base64"),
    ],
    ids=["ec-p256", "private-key", "two-blocks", "empty", "not-base64", "truncated"],
)
def test_anything_but_an_ed25519_public_key_is_refused_in_one_line(pem: bytes, got: str) -> None:
    with pytest.raises(ValueError, match="want an Ed25519 public key") as err:
        load_public_key(pem)
    assert str(err.value).endswith(f"got {got}") and "\n" not in str(err.value)


def test_cryptography_and_libsodium_make_and_accept_the_same_signatures() -> None:
    """Ed25519 (RFC 8032) is deterministic: from one seed, the aggregator's signature
    (cryptography) is the one PyNaCl (libsodium) makes, and each library accepts the other's."""
    seed = bytes(range(32))  # KEY's
    signed = sign(ENVELOPE, KEY, fleet="f", kind="global")
    message = b"fedge/v1 signed\0f\0global\0" + ENVELOPE  # what the signature covers
    theirs = SigningKey(seed).sign(message).signature
    assert signed[12:OVERHEAD] == theirs
    assert signed[4:12] == key_id(SigningKey(seed).verify_key)
    KEY.public_key().verify(theirs, message)  # cryptography accepts libsodium's
    VerifyKey(bytes(verify_key(KEY))).verify(message, signed[12:OVERHEAD])  # and the reverse
    # A payload put together with PyNaCl alone verifies as the aggregator's does.
    by_nacl = b"FSG\x01" + key_id(SigningKey(seed).verify_key) + theirs + ENVELOPE
    assert verify(by_nacl, [verify_key(KEY)], fleet="f", kind="global") == ENVELOPE


def reason_by_cryptography(data: bytes, kind: str) -> str | None:
    """What verify said when it checked with cryptography (the code before PyNaCl), for
    fleet "f" and KEY pinned: None for a payload it accepts."""
    if data[:4] != b"FSG\x01" or len(data) < OVERHEAD:
        return "unsigned"
    if data[4:12] != key_id(verify_key(KEY)):
        return "unknown_key"
    message = b"fedge/v1 signed\0f\0" + kind.encode() + b"\0" + data[OVERHEAD:]
    try:
        KEY.public_key().verify(data[12:OVERHEAD], message)
    except InvalidSignature:
        return "bad_signature"
    return None


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["round", "global"]),
    st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), max_size=3),
    st.integers(0, 200),
)
def test_a_tampered_payload_is_refused_for_the_reason_cryptography_gave(
    kind: str, flips: list[tuple[int, int]], cut: int
) -> None:
    """Bytes flipped anywhere (magic, key id, signature, envelope) or cut off the end of a
    payload the aggregator signed: PyNaCl refuses it exactly when, and why, cryptography did."""
    data = bytearray(sign(ENVELOPE, KEY, fleet="f", kind="global"))
    for at, mask in flips:
        data[at % len(data)] ^= mask
    tampered = bytes(data[: len(data) - cut % 8])
    expected = reason_by_cryptography(tampered, kind)
    if expected is None:
        assert verify(tampered, [verify_key(KEY)], fleet="f", kind=kind) == ENVELOPE
        return
    with pytest.raises(SignatureError) as err:
        verify(tampered, [verify_key(KEY)], fleet="f", kind=kind)
    assert err.value.reason == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["round", "global"]))
def test_verify_never_accepts_or_crashes_on_arbitrary_bytes(data: bytes, kind: str) -> None:
    with pytest.raises(SignatureError):
        verify(data, [verify_key(KEY)], fleet="f", kind=kind)
    with pytest.raises(SignatureError):
        verify(b"FSG\x01" + data, [verify_key(KEY)], fleet="f", kind=kind)
