"""A throwaway signing key pair for a simulated fleet, so the sim runs the same signed rounds
and models a real fleet does (a real fleet's pair comes from ``fedge provision --init``)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedge.protocol.signing import private_pem, public_pem, verify_key


def write_signing_pair(folder: Path) -> tuple[Path, Path]:
    """``signing.key`` (mode 0600) and ``signing.pub`` in ``folder``: a new pair each run."""
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private, public = folder / "signing.key", folder / "signing.pub"
    private.unlink(missing_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem(key))
    public.write_bytes(public_pem(verify_key(key)))
    return private, public
