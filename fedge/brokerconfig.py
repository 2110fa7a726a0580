"""How agent and aggregator reach the broker and trust each other: the ``[tls]`` table, key
files, and the link they make from them. Shared by both configs; knows neither.

The password and the keys live in files of their own (mode 0600), never in the config.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fedge.protocol import Link, Message, TlsSettings, make_link
from fedge.protocol.link import tls_context
from fedge.protocol.signing import load_private_key, load_public_key

from .configfile import readable_file

if TYPE_CHECKING:
    from fedge.protocol.paho_hub import PahoHub


class BrokerTls(BaseModel):
    """``[tls]``: the broker's CA, the client's certificate, and/or a username and password."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path | None = None  # the fleet CA that signed the broker's certificate
    cert_file: Path | None = None  # this client's certificate: its CN is its identity
    key_file: Path | None = None  # the certificate's private key
    username: str | None = Field(default=None, min_length=1, max_length=256)
    password_file: Path | None = None  # the password, alone in a file
    verify_hostname: bool = True  # the broker's certificate must name the host in `broker`

    @field_validator("ca_file", "cert_file", "key_file", "password_file", mode="after")
    @classmethod
    def _readable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return readable_file(value, info)

    @model_validator(mode="after")
    def _pairs(self) -> BrokerTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        try:  # the files' contents, now: later the error could not name the field
            tls_context(self.settings())
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"{self._which_file(exc)}: {exc}") from exc
        return self

    def _which_file(self, exc: BaseException) -> str:
        """The field a TLS loading error is about (the CA is loaded first, then the pair)."""
        try:
            tls_context(TlsSettings(ca_file=None if self.ca_file is None else str(self.ca_file)))
        except (ssl.SSLError, OSError):
            return f"ca_file {self.ca_file} is not a PEM certificate"
        return (
            f"cert_file {self.cert_file} and key_file {self.key_file} are not a matching PEM pair"
        )

    @property
    def uses_tls(self) -> bool:
        return any(f is not None for f in (self.ca_file, self.cert_file, self.key_file))

    def settings(self) -> TlsSettings:
        return TlsSettings(
            ca_file=None if self.ca_file is None else str(self.ca_file),
            cert_file=None if self.cert_file is None else str(self.cert_file),
            key_file=None if self.key_file is None else str(self.key_file),
            verify_hostname=self.verify_hostname,
        )

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return self.password_file.read_text().rstrip("\r\n")


def check_tls_scheme(broker: str, tls: BrokerTls | None) -> None:
    """A CA or a client certificate over plain ``mqtt://`` would be silently unused, and a
    password would go out in clear."""
    if tls is None or broker.startswith("mqtts://"):
        return
    if tls.uses_tls:
        raise ValueError("[tls] has certificate files but broker is not an mqtts:// URL")
    if tls.password_file is not None:
        raise ValueError("[tls] password_file over a plain mqtt:// broker would be sent in clear")


def broker_link(
    broker: str,
    client_id: str,
    tls: BrokerTls | None,
    will: Message | None = None,
    birth: Message | None = None,
    *,
    manual_ack: bool = False,
    hub: PahoHub | None = None,
    network_thread: bool = True,
) -> Link:
    """The link a config describes (``birth``: published on every connect; ``hub``: the
    PahoHub that drives it, for many links in one process; ``network_thread`` False: the
    owner's calls drive it, see :mod:`fedge.protocol.paho_link`)."""
    settings = tls.settings() if tls is not None and broker.startswith("mqtts://") else None
    return make_link(
        broker,
        client_id,
        will,
        birth=birth,
        manual_ack=manual_ack,
        tls=settings,
        username=None if tls is None else tls.username,
        password=None if tls is None else tls.password(),
        hub=hub,
        network_thread=network_thread,
    )


def check_public_key(value: Path, info: ValidationInfo) -> Path:
    path = readable_file(value, info)
    assert path is not None
    try:
        load_public_key(path.read_bytes())
    except ValueError as exc:  # says what it wants and what it got
        raise ValueError(f"{path}: {exc}") from exc
    return path


def check_private_key(value: Path | None, info: ValidationInfo) -> Path | None:
    path = readable_file(value, info)
    if path is None:
        return None
    try:
        load_private_key(path.read_bytes())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not an Ed25519 private key in PEM ({exc})") from exc
    return path
