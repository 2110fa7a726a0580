"""The ``[he]`` table of the agent's and the aggregator's config files: the fleet's CKKS key
file (homomorphic encryption, docs/homomorphic-encryption.md).

A device gets ``he.secret``, the aggregator ``he.public``; each refuses the other's file with
one line. The check reads the file's header only, so it needs no TenSEAL: the services load
the keys (and TenSEAL) when they start.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from .configfile import readable_file

if TYPE_CHECKING:
    from fedge.protocol.he import HeKeys


def _key_file(value: Path, info: ValidationInfo, *, want: str) -> Path:
    from fedge.protocol.he import key_file_kind  # numpy and struct only, never TenSEAL

    path = readable_file(value, info)
    assert path is not None
    kind = key_file_kind(path)  # HeError is a ValueError: one line naming the file
    if kind != want:
        if want == "public":
            raise ValueError(
                f"{path} holds the fleet's SECRET key: the aggregator must get the public key"
                " file (he.public) only, or homomorphic encryption protects nothing"
            )
        raise ValueError(f"{path} is the public key file; a device needs he.secret")
    return path


class DeviceHeConfig(BaseModel):
    """A device's ``[he]``: ``key_file`` is the fleet's ``he.secret`` (fedge provision --he)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_file: Path

    @field_validator("key_file", mode="after")
    @classmethod
    def _secret(cls, value: Path, info: ValidationInfo) -> Path:
        return _key_file(value, info, want="secret")


class AggregatorHeConfig(BaseModel):
    """The aggregator's ``[he]``: ``key_file`` is the fleet's ``he.public``, never he.secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_file: Path

    @field_validator("key_file", mode="after")
    @classmethod
    def _public(cls, value: Path, info: ValidationInfo) -> Path:
        return _key_file(value, info, want="public")


def load_he_keys(path: Path, *, secret: bool) -> HeKeys:
    """The keys of a checked ``[he] key_file``; TenSEAL missing or a file it cannot load is a
    ConfigError (exit 78, one line naming the file or the extra to install)."""
    from fedge.protocol.he import HeError, load_keys

    from .configfile import ConfigError

    try:
        return load_keys(path, secret=secret)
    except HeError as exc:
        raise ConfigError([f"[he] key_file {path}: {exc}"]) from exc
