"""The message schemas of wire version 1 (pydantic v2, frozen, no extra fields).

``Header`` is the tagged union over every message kind; ``kind`` is the tag. Ids follow the
rule of ``topics.validate_id``. Floats must be finite: JSON has no NaN or Infinity.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
    model_validator,
)

from .codecs import MAX_CODEC_TEXT, parse_codec
from .topics import ID_PATTERN

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
# Counters on the wire fit an unsigned 32-bit field (the skip notice packs them so) and
# SQLite's INTEGER: an unbounded int from a device must not reach the aggregator's store.
U32 = 2**32 - 1
# The largest finite float32: the skip notice packs evaluation scores as float32.
F32_MAX = 3.4028234663852886e38


def _canonical_codec(text: str) -> str:
    return str(parse_codec(text))  # ValueError -> ValidationError -> DecodeError("schema")


Codec = Annotated[
    str, StringConstraints(max_length=MAX_CODEC_TEXT), AfterValidator(_canonical_codec)
]
# Uploads that are not a codec's encoding of a delta, read by a step of their own on the
# aggregator: a secure-aggregation masked input (``fedge.protocol.secagg``) and a CKKS
# ciphertext (``fedge.protocol.he``, which loads TenSEAL lazily; not here).
HE_CODEC = "ckks"
SEALED_CODECS = ("secagg", HE_CODEC)


def _upload_codec(text: str) -> str:
    return text if text in SEALED_CODECS else _canonical_codec(text)


UploadCodec = Annotated[
    str, StringConstraints(max_length=MAX_CODEC_TEXT), AfterValidator(_upload_codec)
]
# -- end homomorphic encryption ------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    # Optional fields added to wire version 1 later: left out of the JSON while unset, so a
    # message without them keeps the bytes it had.
    _omit_unset: ClassVar[tuple[str, ...]] = ()
    # Settings added later, left out while at their defaults: a device of the version before
    # (which refuses keys it does not know) still takes the message, so a fleet upgrades its
    # aggregator first and its devices after (deploy/README.md, Upgrading a fleet).
    _omit_default: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for key in self._omit_unset:
            if key in data and data[key] is None:
                del data[key]
        for key in self._omit_default:
            if key in data and getattr(self, key) == type(self).model_fields[key].default:
                del data[key]
        return data


class GateSettings(_Message):
    """The devices' upload gate (fedge.agent.gate).

    A device holds its update back when ``||delta|| / (lr ||w_global||)`` is below
    ``threshold`` (0: never), or when fewer than ``min_agreement`` of the signs agree with the
    last global update (None: no relevance test, CMFL); after ``max_skips`` skips in a row it
    uploads regardless.
    """

    threshold: float = Field(default=0.1, ge=0, le=1000)
    min_agreement: float | None = Field(default=None, ge=0, le=1)
    max_skips: int = Field(default=2, ge=0, le=1000)


class PrivacySettings(_Message):
    """What a device does under differential privacy (docs/privacy.md), set by the
    aggregator's ``[privacy]`` table for each round: clip the update (its residual included)
    to an L2 norm of ``clip``; add Gaussian noise of standard deviation
    ``noise_multiplier * clip`` to every entry (local DP; 0 under central DP, where the
    aggregator adds the noise to the sum). With privacy on, the upload gate is off: a skip
    decided on the update would itself tell the aggregator something about the data."""

    clip: float = Field(gt=0, le=1e6)
    noise_multiplier: float = Field(default=0.0, ge=0, le=1000)


class SecureSettings(_Message):
    """Secure aggregation for a round (docs/secure-aggregation.md), set by the aggregator's
    ``[secure]`` table: the public round ``seed`` (fresh each round: it keys the sparse graph,
    top-k's shared index set and every derived key), the Shamir ``threshold`` (None: a strict
    majority of a device's share holders), the graph's ``degree`` (None: complete; SecAgg+
    otherwise), and the quantisation every device shares: ``bits`` per entry over the range
    [-clip, clip]. The round's devices are its selected devices."""

    seed: str = Field(pattern="^[0-9a-f]{64}$")
    threshold: int | None = Field(default=None, ge=2, le=1 << 16)
    degree: int | None = Field(default=None, ge=2, le=1 << 16)
    bits: int = Field(default=8, ge=2, le=24)
    clip: float = Field(gt=0, le=1e6)
    _omit_unset = ("threshold", "degree")


class TrainingConfig(_Message):
    """How devices train in a round: the aggregator's ``[training]`` table, carried by every
    round announcement. The defaults are the fleet's defaults (the only place they live)."""

    epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=65536)
    lr: float = Field(default=0.05, gt=0, le=10)
    mu: float = Field(default=0.0, ge=0, le=100)  # FedProx proximal weight; 0 is plain SGD
    # How devices encode their deltas (fedge.protocol.codecs). The default sends the largest
    # 2% of the entries as int8, with error feedback; with the gate it cut bytes to target
    # about 58x (bench/README.md). "float32" sends everything exactly.
    codec: Codec = "topk:0.02+int8"
    # ...but never fewer than this many entries: 2% of a 4,810-weight model is 97, too few
    # to learn from in 20 rounds; 512 keeps the 50k model at 2% (bench/README.md).
    topk_min_entries: int = Field(default=512, ge=0, le=1 << 30)
    gate: GateSettings = GateSettings()
    # Federated evaluation: each device scores the global model on this share of its most
    # recent examples before it trains, and does not train on them that round; 0: off. A
    # device holds out at least ``eval_min_samples``, and nothing when that would leave it
    # fewer examples to train on than it holds out.
    eval_fraction: float = Field(default=0.1, ge=0, le=0.5)
    eval_min_samples: int = Field(default=10, ge=1, le=1 << 30)
    # Differential privacy on the devices (clip, local noise); None: off. The aggregator
    # sets it from its [privacy] table, and moves the clip between rounds (adaptive clip).
    privacy: PrivacySettings | None = None
    # Secure aggregation (the aggregator sees only the sum); None: off. Set by the
    # aggregator's [secure] table, with a fresh seed each round.
    secure: SecureSettings | None = None
    # Homomorphic encryption (docs/homomorphic-encryption.md): devices encrypt their updates
    # under the fleet's CKKS key and the global model comes encrypted. The aggregator sets it
    # from its [he] table; a device without the key sits such a round out.
    he: bool = False
    _omit_default = ("eval_fraction", "eval_min_samples", "privacy", "secure", "he")


class RoundAnnouncement(_Message):
    """Retained on ``round``: who trains, on which model version, until when."""

    kind: Literal["round"] = "round"
    fleet: Id
    round_id: int = Field(ge=1, le=U32)
    model_version: int = Field(ge=0, le=U32)
    deadline: float  # unix seconds
    selected: tuple[Id, ...]
    config: TrainingConfig
    # Compact globals: the checksum (fedge.protocol.downlink) of the model the round trains
    # on, so a device that holds those weights already (its installed model file, at v0)
    # needs nothing sent. None: not said.
    model_checksum: str | None = Field(default=None, pattern="^[0-9a-f]{16}$")
    _omit_unset = ("model_checksum",)


class GlobalModelHeader(_Message):
    """Retained on ``global``, followed by the model's tensors."""

    kind: Literal["global"] = "global"
    fleet: Id
    model_version: int = Field(ge=0, le=U32)
    round_id: int = Field(ge=0, le=U32)  # the round that produced it; 0 = initial model


class GlobalDeltaHeader(_Message):
    """Retained on ``global/delta`` (compact globals, ``fedge.protocol.downlink``), followed
    by the change from model ``base_version`` to ``model_version``, encoded by ``codec``. A
    device that holds ``base_version`` adds it and checks ``checksum`` (SHA-256 of the
    resulting weights, 16 hex digits) against what it got: then it holds exactly the
    aggregator's copy of version ``model_version``, which is within ``error_bound`` (the
    largest entry of the difference) of the true global model."""

    kind: Literal["global_delta"] = "global_delta"
    fleet: Id
    base_version: int = Field(ge=0, le=U32)
    model_version: int = Field(ge=1, le=U32)
    round_id: int = Field(ge=0, le=U32)
    codec: Codec
    checksum: str = Field(pattern="^[0-9a-f]{16}$")
    error_bound: float = Field(ge=0, le=F32_MAX)

    @model_validator(mode="after")
    def _forward(self) -> GlobalDeltaHeader:
        if self.model_version <= self.base_version:
            raise ValueError("a model delta goes from an older version to a newer one")
        return self


class Evaluation(_Message):
    """What a device measured of the round's global model on examples it held out of
    training: the mean loss, and accuracy (classifiers) or mean absolute error (regression,
    autoencoders), over ``count`` examples."""

    count: int = Field(ge=1, le=U32)
    loss: float = Field(ge=0, le=F32_MAX)
    accuracy: float | None = Field(default=None, ge=0, le=1)
    mae: float | None = Field(default=None, ge=0, le=F32_MAX)
    _omit_unset = ("accuracy", "mae")

    @model_validator(mode="after")
    def _one_metric(self) -> Evaluation:
        if (self.accuracy is None) == (self.mae is None):
            raise ValueError("an evaluation carries accuracy or mae, exactly one")
        return self


class UpdateHeader(_Message):
    """A device's update on ``update/{device}``, followed by the encoded delta tensors."""

    kind: Literal["update"] = "update"
    device_id: Id
    round_id: int = Field(ge=1, le=U32)
    update_id: Id  # unique per update; the aggregator ignores duplicates
    base_version: int = Field(ge=0, le=U32)  # global model version the delta is relative to
    num_samples: int = Field(ge=1, le=U32)
    # a fedge.protocol.codecs spec, e.g. "topk:0.02+int8", or one of SEALED_CODECS
    codec: UploadCodec = "float32"
    train_loss: float | None = None
    evaluation: Evaluation | None = None  # the global model on held-out data, before training
    # Under differential privacy: whether the update's norm was within the round's clip
    # before clipping (one bit; the aggregator's adaptive clip counts them with noise).
    within_clip: bool | None = None
    _omit_unset = ("evaluation", "within_clip")


class SkipNotice(_Message):
    """A selected device decided not to upload (so a skip is not mistaken for a dropout)."""

    kind: Literal["skip"] = "skip"
    device_id: Id
    round_id: int = Field(ge=1, le=U32)
    update_id: Id
    reason: str = Field(max_length=64)
    # A device that trained but found its update too small to send counts in the average
    # as a zero delta with its sample count; one that sat out (battery, heat) does not.
    trained: bool = False
    num_samples: int = Field(default=0, ge=0, le=U32)
    evaluation: Evaluation | None = None  # a device that trained also evaluated
    # A quiet device (``Status.quiet``) that will not take part in the next ``rest`` rounds:
    # its radio stays asleep, and the aggregator selects it again after them (a rest, not a
    # dropout). 0: none.
    rest: int = Field(default=0, ge=0, le=255)
    _omit_unset = ("evaluation",)
    _omit_default = ("rest",)


class ShardAccepted(_Message):
    """A shard worker's report on ``shard/{worker}/accepted`` of one answer it accepted: the
    coordinator keeps the round's bookkeeping from it; the delta stays in the worker's sum."""

    kind: Literal["shard_accepted"] = "shard_accepted"
    worker: Id
    nbytes: int = Field(ge=0, le=U32)  # the answer's MQTT bytes (PUBLISH packet and PUBACK)
    answer: UpdateHeader | SkipNotice = Field(discriminator="kind")


class ShardClose(_Message):
    """The coordinator closes a round on ``shard/{worker}/close``: the final weight of each
    device whose update counts in that worker's partial sum (any other it accepted weighs 0)."""

    kind: Literal["shard_close"] = "shard_close"
    round_id: int = Field(ge=1, le=U32)
    weights: dict[Id, Annotated[int, Field(ge=0, le=U32)]]


class ShardPartial(_Message):
    """A worker's answer to a close on ``shard/{worker}/partial``, followed by the float64
    partial sum ``sum_i weight_i delta_i``, each tensor as a float32 pair ``hi/{name}`` and
    ``lo/{name}`` (the envelope has no float64; hi + lo keeps about 48 bits)."""

    kind: Literal["shard_partial"] = "shard_partial"
    worker: Id
    round_id: int = Field(ge=1, le=U32)
    weight: int = Field(ge=0, le=2**63 - 1)  # the sum of the weights it used (a check)


Label = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]  # SQLite's INTEGER holds it
MAX_READINGS = 16  # entries in each of a status's small maps


class Status(_Message):
    """Heartbeat on ``status/{device}``, retained; the Last Will carries ``state="offline"``.

    Sent as plain JSON (``fedge.protocol.status``) so that ``mosquitto_sub`` and home
    automation can read it; only ``device_id``, ``state`` and ``timestamp`` are required.
    """

    kind: Literal["status"] = "status"
    device_id: Id
    state: Literal["online", "offline", "training", "idle"]
    timestamp: float  # unix seconds
    # autoencode task: reconstruction error of the device's latest window under the global
    # model (an anomaly score; the readings themselves never leave the device)
    anomaly_score: float | None = None
    # The global model version the device holds (-1: none yet).
    model_version: int | None = Field(default=None, ge=-1, le=U32)
    # Set when a round names a model this device lacks: an aggregator that has a newer one
    # sends it again, so a device whose retained copy was lost catches up.
    wants_model: bool = False
    last_round: int | None = Field(default=None, ge=0, le=U32)  # the last round it answered
    outcome: Literal["sent", "skipped", "failed"] | None = None  # ...and how
    skip_reason: str | None = Field(default=None, max_length=64)
    train_loss: float | None = None  # of its last local training
    # Eligibility readings (battery_percent, cpu_temp_c, load_per_cpu, on_mains as 0/1).
    readings: dict[Label, float] = Field(default_factory=dict, max_length=MAX_READINGS)
    bytes_up_today: Count | None = None  # MQTT bytes since local midnight
    bytes_down_today: Count | None = None
    # The serial path: bytes, samples, frame faults by kind; and the sample store's size.
    sensor: dict[Label, Count] = Field(default_factory=dict, max_length=MAX_READINGS)
    store_bytes: Count | None = None
    agent_version: str | None = Field(default=None, max_length=32)
    uptime_s: float | None = Field(default=None, ge=0)
    # A quiet device listens only on its own ``inbox/{device}``: the aggregator sends it the
    # rounds it is selected for there, with the model it lacks; between them its radio can
    # sleep (docs/bandwidth.md, Quiet devices).
    quiet: bool = False
    # A quiet device whose inbox has brought nothing yet since it started: it listens to
    # every round until then, so the aggregator also sends it there the rounds that do not
    # select it, and counts it as listening, not asleep. (The birth message, made before the
    # link connects, says nothing of it: the aggregator keeps what it knew.)
    listening: bool = False


Header = Annotated[
    RoundAnnouncement
    | GlobalModelHeader
    | GlobalDeltaHeader
    | UpdateHeader
    | SkipNotice
    | Status
    | ShardAccepted
    | ShardClose
    | ShardPartial,
    Field(discriminator="kind"),
]
MESSAGE_TYPES = (
    RoundAnnouncement,
    GlobalModelHeader,
    GlobalDeltaHeader,
    UpdateHeader,
    SkipNotice,
    Status,
    ShardAccepted,
    ShardClose,
    ShardPartial,
)
