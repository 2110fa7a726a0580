"""The agent's config file (TOML), validated before anything connects.

Example::

    device_id = "pi-kitchen-01"
    fleet = "home"
    broker = "mqtts://broker.local:8883"
    aggregator_keys = ["aggregator.pub"]
    model = "/opt/fedge/models/digits_mlp.tflite"
    data = "/var/lib/fedge/partition.npz"
    state_dir = "/var/lib/fedge"

    [tls]
    ca_file = "ca.crt"
    cert_file = "device.crt"
    key_file = "device.key"

Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedge.brokerconfig import BrokerTls, check_public_key, check_tls_scheme
from fedge.configfile import BROKER_URL_PATTERN, ID_PATTERN, existing_file, state_folder
from fedge.heconfig import DeviceHeConfig

from .eligibility import EligibilityConfig

Backend = Literal["litert", "tflite_runtime", "numpy"]


class SerialConfig(BaseModel):
    """The microcontroller on a serial port, and how long its samples are kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: str  # /dev/ttyACM0, or any pyserial URL
    baudrate: int = Field(default=115200, gt=0)
    format: Literal["binary", "text"] = "binary"
    channels: tuple[str, ...] | None = None  # key=value text lines: which keys, in order
    max_rows: int = Field(default=200_000, ge=100)
    max_bytes: int | None = Field(default=None, ge=65536)  # cap on the store file
    retention_s: float = Field(default=7 * 86400.0, gt=0)


class TaskConfig(BaseModel):
    """How windows of the stream become training examples (fedge.agent.tasks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["forecast", "autoencode", "classify", "failure"] = "forecast"
    window: int = Field(default=16, ge=1, le=4096)
    targets: tuple[int, ...] | None = None  # forecast: which channels to predict (all)
    # failure: warn of a failure within this many readings; the last channel is the event
    # flag (1 on the reading at which the machine failed).
    horizon: int = Field(default=60, ge=1)
    history: int = Field(default=2000, ge=2)  # latest samples to train on each round
    min_examples: int = Field(default=32, ge=1)  # fewer: sit the round out ("not_ready")
    # Fixed per-channel scaling, (value - center) / scale, shared by the whole fleet.
    center: tuple[float, ...] | None = None
    scale: tuple[float, ...] | None = None


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str = Field(pattern=ID_PATTERN)
    fleet: str = Field(default="default", pattern=ID_PATTERN)
    broker: str = Field(default="mqtt://127.0.0.1:1883", pattern=BROKER_URL_PATTERN)
    tls: BrokerTls | None = None  # CA, client certificate, username + password_file
    # The aggregator's Ed25519 public key(s), PEM: rounds and global models must be signed by
    # one of them. Two while a key is rotated. Empty: accept unsigned ones (development only).
    aggregator_keys: tuple[Path, ...] = Field(default=(), max_length=2)
    model: Path
    data: Path | None = None  # a prepared .npz (x, y); or read a sensor: [serial] and [task]
    serial: SerialConfig | None = None
    task: TaskConfig | None = None
    state_dir: Path = Path("/var/lib/fedge")
    runtime: tuple[Backend, ...] = ("litert", "tflite_runtime", "numpy")
    delegates: tuple[str, ...] = ()
    num_threads: int = Field(default=1, ge=1, le=64)
    keepalive: int = Field(default=30, ge=5, le=3600)
    # Largest MQTT payload the broker takes (AWS IoT: 131072); bigger updates go in chunks.
    max_payload: int = Field(default=0, ge=0)  # 0: no limit; else at least 256

    @field_validator("max_payload")
    @classmethod
    def _payload(cls, value: int) -> int:
        if 0 < value < 256:
            raise ValueError("must be 0 (no limit) or at least 256 bytes")
        return value

    # When to sit out: power, temperature, load, daily upload bytes. None: always take part.
    eligibility: EligibilityConfig | None = None
    # Keep the radio asleep between the rounds this device is selected for: listen only on
    # its own inbox topic, where the aggregator sends those rounds and the model they train
    # on (docs/bandwidth.md, Quiet devices). For battery devices on LTE and the like.
    quiet: bool = False
    # A quiet device whose gate holds its update back sits the next rest_rounds rounds out
    # without a word (its skip notice says so, so the aggregator does not take it for a
    # dropout). 0: it takes every round it is selected for.
    rest_rounds: int = Field(default=0, ge=0, le=255)
    seed: int = 0
    # Prometheus /metrics on metrics_addr:metrics_port (fedge.metrics); 0: off.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_addr: str = "127.0.0.1"
    # Homomorphic encryption: the fleet's he.secret (docs/homomorphic-encryption.md). None:
    # rounds that announce HE are sat out (skip notice "he_no_key").
    he: DeviceHeConfig | None = None

    @field_validator("aggregator_keys", mode="after")
    @classmethod
    def _keys(cls, value: tuple[Path, ...], info: ValidationInfo) -> tuple[Path, ...]:
        return tuple(check_public_key(path, info) for path in value)

    @model_validator(mode="after")
    def _tls_needs_mqtts(self) -> AgentConfig:
        check_tls_scheme(self.broker, self.tls)
        return self

    @model_validator(mode="after")
    def _rest_needs_quiet(self) -> AgentConfig:
        if self.rest_rounds and not self.quiet:
            raise ValueError("rest_rounds needs quiet = true (only a quiet device can rest)")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> AgentConfig:
        if (self.data is None) == (self.serial is None):
            raise ValueError("give either data (a .npz file) or a [serial] sensor, not both")
        if self.serial is not None and self.task is None:
            raise ValueError(
                "a [serial] sensor needs a [task] (forecast, autoencode, classify or failure)"
            )
        return self

    @field_validator("model", "data", mode="after")
    @classmethod
    def _must_exist(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return existing_file(value, info)

    @field_validator("state_dir", mode="after")
    @classmethod
    def _state_dir(cls, value: Path, info: ValidationInfo) -> Path:
        return state_folder(value, info)
