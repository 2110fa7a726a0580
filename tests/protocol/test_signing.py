"""Signed rounds and global models: what verifies, and why the rest does not."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedge.protocol import GlobalModelHeader, SignatureError, encode, is_signed, sign, verify
from fedge.protocol.signing import (
    OVERHEAD,
    key_id,
    load_private_key,
    load_public_key,
    private_pem,
    public_pem,
)
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
ENVELOPE = encode(GlobalModelHeader(fleet="f", model_version=3, round_id=3))


def test_a_signed_payload_verifies_and_gives_back_the_envelope() -> None:
    signed = sign(ENVELOPE, KEY, fleet="f", kind="global")
    assert is_signed(signed) and len(signed) == len(ENVELOPE) + OVERHEAD
    assert verify(signed, [KEY.public_key()], fleet="f", kind="global") == ENVELOPE


def test_either_of_two_pinned_keys_verifies() -> None:
    keys = [OTHER.public_key(), KEY.public_key()]  # rotation: old and new pinned together
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
        verify(data, [KEY.public_key()], fleet=fleet, kind=kind)
    assert err.value.reason == reason


def test_a_forged_signature_under_the_right_key_id_is_refused() -> None:
    forged = sign(ENVELOPE, OTHER, fleet="f", kind="global")
    forged = forged[:4] + key_id(KEY.public_key()) + forged[12:]
    with pytest.raises(SignatureError) as err:
        verify(forged, [KEY.public_key()], fleet="f", kind="global")
    assert err.value.reason == "bad_signature"


def test_keys_round_trip_through_pem_and_other_kinds_are_refused() -> None:
    assert private_pem(load_private_key(private_pem(KEY))) == private_pem(KEY)
    assert key_id(load_public_key(public_pem(KEY.public_key()))) == key_id(KEY.public_key())
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import serialization

    pem = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ValueError, match="Ed25519 public key"):
        load_public_key(pem)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["round", "global"]))
def test_verify_never_accepts_or_crashes_on_arbitrary_bytes(data: bytes, kind: str) -> None:
    with pytest.raises(SignatureError):
        verify(data, [KEY.public_key()], fleet="f", kind=kind)
    with pytest.raises(SignatureError):
        verify(b"FSG\x01" + data, [KEY.public_key()], fleet="f", kind=kind)
