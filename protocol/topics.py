"""Topic names of wire version 1, the id rule and MQTT filter matching.

Every topic lives under ``{prefix}/{fleet}/`` (default prefix ``fedge/v1``)::

    round             retained round announcement      aggregator -> devices
    global            retained global model            aggregator -> devices
    update/{device}   model update or skip notice      device -> aggregator
    status/{device}   heartbeat; the Last Will says offline
    inbox/{device}    a quiet device's rounds and models, each signed as on its broadcast topic
    shard/{worker}/accepted|close|partial   aggregator shards (fedge.aggregator.shard)

Shard workers share ``update/+`` through an MQTT shared subscription, ``$share/{group}/...``:
the broker hands each message to one worker of the group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidId

# One rule for every id (fleet, device, update): 1-64 of these characters.
ID_CHARS = r"[A-Za-z0-9_.-]{1,64}"
# The same rule for pydantic (Rust regex, where ``$`` is the end of the text).
ID_PATTERN = rf"^{ID_CHARS}$"
_ID = re.compile(ID_CHARS)


def validate_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid id (1-64 of ``[A-Za-z0-9_.-]``), else raise InvalidId."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise InvalidId(kind, value, "want 1-64 characters of [A-Za-z0-9_.-]")
    return value


def _validate_prefix(prefix: str) -> str:
    levels = prefix.split("/") if isinstance(prefix, str) else [""]
    if not all(_ID.fullmatch(level) for level in levels):
        raise InvalidId("topic prefix", prefix, "want levels of [A-Za-z0-9_.-] joined by '/'")
    return prefix


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid MQTT subscription filter, else raise InvalidId."""
    if not isinstance(topic_filter, str) or not topic_filter or "\0" in topic_filter:
        raise InvalidId("topic filter", topic_filter, "empty or contains NUL")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if level == "#" and i != len(levels) - 1:
            raise InvalidId("topic filter", topic_filter, "'#' must be the last level")
        if len(level) > 1 and ("#" in level or "+" in level):
            raise InvalidId("topic filter", topic_filter, "wildcards must fill a whole level")
    return topic_filter


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``(group, filter)`` of a shared subscription ``$share/{group}/{filter}``, else
    ``(None, topic_filter)``; InvalidId for a ``$share`` filter without a group or filter."""
    if not topic_filter.startswith("$share/"):
        return None, topic_filter
    _, group, rest = [*topic_filter.split("/", 2), "", ""][:3]
    if not group or "+" in group or "#" in group or not rest:
        raise InvalidId("topic filter", topic_filter, "want $share/<group>/<filter>")
    return group, validate_filter(rest)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching: ``+`` is exactly one level, a final ``#`` is the parent and everything
    below it. Wildcards at the first level do not match topics starting with ``$``."""
    validate_filter(topic_filter)
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    want = topic_filter.split("/")
    have = topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


@dataclass(frozen=True)
class Topics:
    """The topics of one fleet. Construction validates the fleet id and the prefix."""

    fleet: str
    prefix: str = "fedge/v1"

    def __post_init__(self) -> None:
        validate_id("fleet id", self.fleet)
        _validate_prefix(self.prefix)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    @property
    def global_model(self) -> str:
        return f"{self.base}/global"

    @property
    def global_delta(self) -> str:
        """Retained: the compressed change to the newest global model (compact globals)."""
        return f"{self.base}/global/delta"

    def update(self, device: str) -> str:
        return f"{self.base}/update/{validate_id('device id', device)}"

    @property
    def updates(self) -> str:
        return f"{self.base}/update/+"

    def status(self, device: str) -> str:
        return f"{self.base}/status/{validate_id('device id', device)}"

    @property
    def statuses(self) -> str:
        return f"{self.base}/status/+"

    def inbox(self, device: str) -> str:
        """Where a quiet device (``Status.quiet``) gets the rounds it is selected for and the
        model they train on, instead of listening to ``round`` and ``global``."""
        return f"{self.base}/inbox/{validate_id('device id', device)}"

    def secagg(self, device: str) -> str:
        """Where the aggregator sends one device its secure-aggregation messages."""
        return f"{self.base}/secagg/{validate_id('device id', device)}"

    @property
    def secagg_all(self) -> str:
        """Where the aggregator sends the secure-aggregation messages of every device."""
        return f"{self.base}/secagg"

    def shared_updates(self, group: str) -> str:
        """``update/+`` shared by a group of subscribers: each message goes to one of them."""
        return f"$share/{validate_id('share group', group)}/{self.updates}"

    def shard(self, worker: str, what: str) -> str:
        """``shard/{worker}/{what}``: ``accepted``, ``close`` or ``partial``, or ``+``."""
        name = worker if worker == "+" else validate_id("worker id", worker)
        return f"{self.base}/shard/{name}/{what}"

    def device_of(self, topic: str) -> str:
        """The device id of an ``update/{device}`` or ``status/{device}`` topic of this fleet."""
        head = f"{self.base}/"
        rest = topic[len(head) :] if isinstance(topic, str) and topic.startswith(head) else ""
        kind, _, device = rest.partition("/")
        if kind not in ("update", "status"):
            raise InvalidId("update or status topic", topic, f"want {head}update|status/<id>")
        return validate_id("device id", device)
