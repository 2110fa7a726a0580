"""The aggregator's config file (TOML). Relative paths resolve against its folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fedge.protocol import TrainingConfig, parse_codec
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedge.brokerconfig import BrokerTls, check_private_key, check_public_key, check_tls_scheme
from fedge.configfile import (
    BROKER_URL_PATTERN,
    ID_PATTERN,
    existing_file,
    resolve_path,
    state_folder,
)
from fedge.heconfig import AggregatorHeConfig

from .accounting import require_dp_accounting
from .privacy import PrivacyConfig
from .schedule import Schedule, parse_window
from .strategies.config import StrategyConfig


class SampleLimits(BaseModel):
    """Bounds on the sample counts devices declare, which weight their updates.

    A device's count is clipped to the smallest of: its own cap (``caps``, or ``max_samples``
    in the provisioning registry), ``max_per_device``, and ``median_factor`` times the median
    of the counts declared in the round. Clipped counts are logged in rounds.jsonl.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_per_device: int = Field(default=0, ge=0)  # 0: no fleet-wide cap
    median_factor: float = Field(default=3.0, ge=0)  # 0: no cap relative to the median
    caps: dict[str, int] = Field(default_factory=dict)  # device id -> cap
    registry: Path | None = None  # devices.json of `fedge provision` (max_samples per device)

    @field_validator("caps")
    @classmethod
    def _caps(cls, value: dict[str, int]) -> dict[str, int]:
        for device, cap in value.items():
            if cap < 1:
                raise ValueError(f"cap of {device} must be at least 1, not {cap}")
        return value

    @field_validator("registry", mode="after")
    @classmethod
    def _registry(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return existing_file(value, info)


class ScheduleConfig(BaseModel):
    """When rounds start (aggregator.schedule): at most every ``interval`` seconds, and only
    inside the daily ``window`` of local time ("22:00-06:00" wraps midnight) in
    ``timezone`` (an IANA name; default: the machine's). A round open at the window's end
    runs to its deadline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval: float = Field(default=0.0, ge=0)  # seconds between round starts; 0: back to back
    window: str | None = None  # "HH:MM-HH:MM"; None: any time of day
    timezone: str | None = None  # e.g. "Europe/Berlin"; None: the machine's local time

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None:
            parse_window(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        if value is not None:
            _zone(value)
        return value

    def build(self) -> Schedule:
        return Schedule(
            interval=self.interval,
            window=None if self.window is None else parse_window(self.window),
            tz=None if self.timezone is None else _zone(self.timezone),
        )


class ShardsConfig(BaseModel):
    """Aggregator shards (aggregator/shard.py, docs/scale.md): ``workers`` (each a
    ``fedge aggregator --worker NAME`` with this same config) share the update topic through
    an MQTT shared subscription and keep partial sums; this process coordinates the rounds
    and merges the sums. A round whose partial sums are not all in ``close_timeout`` seconds
    after it closes fails."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: list[Annotated[str, StringConstraints(pattern=ID_PATTERN)]] = Field(min_length=1)
    close_timeout: float = Field(default=30.0, gt=0)

    @field_validator("workers")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("worker names must differ")
        return value


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (an IANA name, e.g. Europe/Berlin)") from exc


class SecureConfig(BaseModel):
    """``[secure]``: secure aggregation (docs/secure-aggregation.md). Each round the devices
    agree pairwise keys, secret-share their mask seeds and upload masked, quantised updates;
    the aggregator learns only their sum, and survives up to just under half of a device's
    share holders dropping out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Neighbours per device (even): None is the complete graph (every device shares with
    # every other: O(N) keys and shares per device); SecAgg+ with k of O(log N) above a few
    # dozen devices per round (e.g. 20 at 100, 30 at 1,000).
    degree: int | None = Field(default=None, ge=2, le=1 << 16)
    # Shares needed to rebuild a device's secrets; None: a strict majority of its holders.
    threshold: int | None = Field(default=None, ge=2, le=1 << 16)
    bits: int = Field(default=8, ge=2, le=24)  # quantisation bits per entry
    # Every entry is clipped to [-clip, clip] before quantising (the same range on every
    # device, or the integers would not add up); under [privacy] the L2 clip bounds it.
    clip: float = Field(default=0.05, gt=0, le=1e6)
    # Seconds the aggregator waits for the devices' keys, and for their unmask answers;
    # the shares and the masked inputs have until the round's deadline.
    stage_timeout: float = Field(default=15.0, gt=0)

    @field_validator("degree")
    @classmethod
    def _even(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError(f"the graph's degree must be even, not {value}")
        return value


class DownlinkConfig(BaseModel):
    """``[downlink]``: compact globals (``fedge.protocol.downlink``). Between full syncs the
    aggregator sends the change to the devices' copy of the model, compressed with
    ``codec`` (with error feedback: what one delta leaves out, the next carries), on the
    retained ``global/delta`` topic; the whole model goes out every ``resync_every``
    versions, and when a device that is behind asks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The largest 10% of the change, int8: at 100 devices 5% cost 4 points of accuracy and
    # 10% none (bench/README.md, Bytes to target, both ways).
    codec: str = "topk:0.1+int8"
    resync_every: int = Field(default=100, ge=1, le=1_000_000)

    @field_validator("codec")
    @classmethod
    def _codec(cls, value: str) -> str:
        return str(parse_codec(value))


class AggregatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fleet: str = Field(default="default", pattern=ID_PATTERN)
    broker: str = Field(default="mqtt://127.0.0.1:1883", pattern=BROKER_URL_PATTERN)
    client_id: str = Field(default="fedge-aggregator", pattern=ID_PATTERN)
    tls: BrokerTls | None = None  # CA, client certificate, username + password_file
    # Ed25519 private key (PEM) that signs every round announcement and global model. None:
    # they go out unsigned, and agents that pin a key refuse them (development only).
    signing_key: Path | None = None
    # A shard worker's check of the announcements: the coordinator's public key(s) (PEM; two
    # while it rotates), as the agents' aggregator_keys. Empty: the public half of signing_key,
    # or none. A site gateway's worker has these and never the private key.
    aggregator_keys: tuple[Path, ...] = Field(default=(), max_length=2)
    model: Path  # the initial global model (.tflite)
    state_dir: Path = Path("/var/lib/fedge-aggregator")
    rounds: int = Field(default=0, ge=0)  # 0: run until stopped
    min_devices: int = Field(default=1, ge=1)  # online devices needed before round 1
    devices_per_round: int = Field(default=0, ge=0)  # 0: every online device
    # With devices_per_round: select this many times more (reliable devices first) and close
    # the round once devices_per_round have answered.
    overselect: float = Field(default=1.3, ge=1.0, le=10.0)
    quorum: float = Field(default=0.5, gt=0, le=1)  # share of selected updates after deadline
    round_timeout: float = Field(default=120.0, gt=0)  # seconds
    training: TrainingConfig = TrainingConfig()  # announced with every round
    samples: SampleLimits = SampleLimits()
    schedule: ScheduleConfig = ScheduleConfig()
    strategy: StrategyConfig = StrategyConfig()
    eval_data: Path | None = None  # .npz (x, y) held out for accuracy and loss per round
    log: Path | None = None  # rounds.jsonl; default: state_dir/rounds.jsonl
    seed: int = 0
    chunk_timeout: float = Field(default=60.0, gt=0)  # seconds to wait for a missing chunk
    # Send the global model again when a device reports an older one or a round fails,
    # at most once per this many seconds for the same model version.
    republish_interval: float = Field(default=10.0, ge=0)
    wait_log_interval: float = Field(default=60.0, gt=0)  # WARNING while a round cannot start
    backup_every: int = Field(default=10, ge=0)  # rounds between state backups; 0: never
    # Prometheus /metrics on metrics_addr:metrics_port (fedge.metrics); 0: off.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_addr: str = "127.0.0.1"
    shards: ShardsConfig | None = None  # None: this process takes every update itself
    privacy: PrivacyConfig | None = None  # differential privacy (docs/privacy.md); None: off
    secure: SecureConfig | None = None  # secure aggregation; None: off
    downlink: DownlinkConfig | None = None  # compact globals; None: the whole model each time
    # Homomorphic encryption (docs/homomorphic-encryption.md): the fleet's he.public; None: off.
    he: AggregatorHeConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _he_announced(cls, data: object) -> object:
        """[he] makes every round announce ``training.he`` (the one training model says it)."""
        if isinstance(data, dict) and data.get("he") is not None:
            training = data.get("training")
            if isinstance(training, TrainingConfig):
                training = training.model_copy(update={"he": True})
            elif isinstance(training, dict):
                training = {**training, "he": True}
            elif training is None:
                training = {"he": True}
            data = {**data, "training": training}
        return data

    @model_validator(mode="after")
    def _he_fits(self) -> AggregatorConfig:
        if self.he is None:
            if self.training.he:
                raise ValueError("[training] he is set from [he]: give [he] key_file (he.public)")
            return self
        from fedge.protocol.he import refuse_strategy

        s = self.strategy
        try:
            refuse_strategy(s.name, s.robust, s.norm_bound)  # one line: FedAvg only
        except ValueError as exc:
            raise ValueError(f'{exc} (under [he]: [strategy] name = "fedavg")') from exc
        if self.privacy is not None and self.privacy.mode == "central":
            raise ValueError(
                '[privacy] mode = "central" cannot be combined with [he]: the aggregator cannot'
                ' clip an update it cannot read (use mode = "local": devices clip and noise)'
            )
        if self.secure is not None:
            raise ValueError(
                "[he] and [secure] are two ways to hide the updates from the aggregator:"
                " choose one (docs/privacy.md)"
            )
        if self.downlink is not None:
            raise ValueError(
                "[downlink] cannot be combined with [he]: the global model is a ciphertext,"
                " sent whole"
            )
        if self.shards is not None:
            raise ValueError(
                "[he] cannot be combined with [shards] (yet): shard workers send their partial"
                " sums in the clear; run one aggregator (it adds ciphertexts: ~9 ms an update"
                " for a 50k model)"
            )
        return self

    @field_validator("model", "eval_data", mode="after")
    @classmethod
    def _must_exist(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return existing_file(value, info)

    @field_validator("signing_key", mode="after")
    @classmethod
    def _signing_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return check_private_key(value, info)

    @field_validator("aggregator_keys", mode="after")
    @classmethod
    def _public_keys(cls, value: tuple[Path, ...], info: ValidationInfo) -> tuple[Path, ...]:
        return tuple(check_public_key(path, info) for path in value)

    @model_validator(mode="after")
    def _tls_needs_mqtts(self) -> AggregatorConfig:
        check_tls_scheme(self.broker, self.tls)
        return self

    @model_validator(mode="after")
    def _shards_need_the_mean(self) -> AggregatorConfig:
        s = self.strategy
        if self.shards is not None and (s.robust != "mean" or s.norm_bound > 0):
            raise ValueError(
                '[shards] needs [strategy] robust = "mean" and norm_bound = 0: a robust'
                " combiner needs every delta of a round in one place"
            )
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> AggregatorConfig:
        p = self.privacy
        if self.training.privacy is not None:
            raise ValueError(
                "[training] privacy is set by the aggregator from [privacy]; configure"
                " differential privacy there"
            )
        if p is None:
            return self
        require_dp_accounting()
        if p.mode == "central":
            s = self.strategy
            if s.robust != "mean" or s.norm_bound > 0:
                raise ValueError(
                    '[privacy] mode = "central" needs [strategy] robust = "mean" and'
                    " norm_bound = 0: the noise is calibrated to the sum of the clipped updates"
                )
            if self.shards is not None:
                raise ValueError('[privacy] mode = "central" cannot be combined with [shards]')
            p.value_noise_multiplier(self.expected_devices)  # adaptive clip: z must fit
        return self

    @model_validator(mode="after")
    def _secure_fits(self) -> AggregatorConfig:
        if self.training.secure is not None:
            raise ValueError(
                "[training] secure is set by the aggregator from [secure]; configure secure"
                " aggregation there"
            )
        if self.secure is None:
            return self
        s = self.strategy
        if s.robust != "mean" or s.norm_bound > 0:
            raise ValueError(
                '[secure] needs [strategy] robust = "mean" and norm_bound = 0: a robust'
                " combiner needs every update, and the aggregator sees only their sum"
            )
        if self.shards is not None:
            raise ValueError("[secure] cannot be combined with [shards]")
        if self.min_devices < 3 or 0 < self.devices_per_round < 3:
            raise ValueError(
                f"[secure] needs min_devices (and devices_per_round, if set) of at least 3,"
                f" not {self.min_devices} ({self.devices_per_round}): with two, each device"
                " could subtract its own update from the sum"
            )
        return self

    @property
    def expected_devices(self) -> int:
        """The devices a round selects, as far as the config tells before any is online."""
        if self.devices_per_round:
            return math.ceil(self.devices_per_round * self.overselect)
        return self.min_devices

    @field_validator("state_dir", mode="after")
    @classmethod
    def _state_dir(cls, value: Path, info: ValidationInfo) -> Path:
        return state_folder(value, info)

    @field_validator("log", mode="after")
    @classmethod
    def _log(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)

    @property
    def log_path(self) -> Path:
        return self.log or self.state_dir / "rounds.jsonl"
