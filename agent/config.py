"""The agent's config file (TOML), validated before anything connects.

Example::

    device_id = "pi-kitchen-01"
    fleet = "home"
    broker = "mqtt://broker.local:1883"
    model = "/opt/fedge/models/digits_mlp.tflite"
    data = "/var/lib/fedge/partition.npz"
    state_dir = "/var/lib/fedge"

Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fedge.configfile import BROKER_URL_PATTERN, ID_PATTERN

from .eligibility import EligibilityConfig

Backend = Literal["litert", "tflite_runtime", "numpy"]


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    return value if value.is_absolute() or base is None else Path(base) / value


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str = Field(pattern=ID_PATTERN)
    fleet: str = Field(default="default", pattern=ID_PATTERN)
    broker: str = Field(default="mqtt://127.0.0.1:1883", pattern=BROKER_URL_PATTERN)
    model: Path
    data: Path
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
    seed: int = 0

    @field_validator("model", "data", mode="after")
    @classmethod
    def _must_exist(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve(value, info)
        if not path.is_file():
            raise ValueError(f"file does not exist: {path}")
        return path

    @field_validator("state_dir", mode="after")
    @classmethod
    def _state_dir(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)
