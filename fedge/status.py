"""``fedge status``: the fleet as a table, from each device's retained status on the broker.

Subscribes to ``status/+`` of one fleet, gathers what the broker holds (retained messages
arrive at once; ``--wait`` bounds the wait) and prints one row per device. ``--watch``
keeps the link open and redraws as statuses change; ``--json`` prints the statuses as
they came (one JSON array, or one line per change with ``--watch``).

A status that fails to decode is shown as such, never dropped: an operator sees that a
device talks, even when what it says cannot be read.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedge.protocol import DecodeError, Link, Status, Topics
from fedge.protocol.status import decode_status

from .brokerconfig import BrokerTls, broker_link, check_tls_scheme
from .configfile import BROKER_URL_PATTERN, ID_PATTERN, ConfigError, describe, load_config


class WatchConfig(BaseModel):
    """What ``fedge status --config`` takes from an agent's or aggregator's config file (or
    the ``watch.toml`` of an operator bundle from ``fedge provision --operator``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    fleet: str = Field(pattern=ID_PATTERN)
    broker: str = Field(pattern=BROKER_URL_PATTERN)
    tls: BrokerTls | None = None

    @model_validator(mode="after")
    def _tls_needs_mqtts(self) -> WatchConfig:
        check_tls_scheme(self.broker, self.tls)
        return self


@dataclass
class Seen:
    """The latest status of one device and when it arrived (monotonic seconds)."""

    status: Status | None
    at: float
    problem: str | None = None  # why the payload could not be read


class FleetView:
    """Device id -> its latest status, fed with the messages of ``status/+``."""

    def __init__(self, topics: Topics, clock: Callable[[], float] = time.monotonic) -> None:
        self.topics = topics
        self.clock = clock
        self.devices: dict[str, Seen] = {}

    def take(self, topic: str, payload: bytes) -> str | None:
        """Record a message; returns the device it was about (None: not a status topic)."""
        try:
            device = self.topics.device_of(topic)
        except ValueError:
            return None
        if not payload:  # a cleared retained status: the device was removed
            self.devices.pop(device, None)
            return device
        try:
            status, _ = decode_status(payload)
        except DecodeError as exc:
            self.devices[device] = Seen(None, self.clock(), exc.reason)
            return device
        if status.device_id != device:
            self.devices[device] = Seen(None, self.clock(), f"says it is {status.device_id}")
        else:
            self.devices[device] = Seen(status, self.clock())
        return device


COLUMNS = (
    ("DEVICE", "the device id"),
    ("STATE", "online, idle, training, or offline (the broker's Last Will)"),
    ("MODEL", "global model version it holds"),
    ("ROUND", "last round it answered"),
    ("OUTCOME", "what it did then: sent an update, skipped (why), failed (why)"),
    ("LOSS", "its last training loss"),
    ("UP/DOWN", "MQTT bytes sent / received today"),
    ("SENSOR", "serial samples stored, frame faults"),
    ("VERSION", "agent version"),
    ("UPTIME", "since the agent started"),
    ("AGE", "how long ago the status was sent (by the device's clock)"),
)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


_NOT_FAULTS = ("bytes", "samples", "batches", "opens")  # the serial counters that count no fault


def _sensor(counters: dict[str, int]) -> str:
    if not counters:
        return "-"
    faults = sum(v for k, v in counters.items() if k not in _NOT_FAULTS)
    return f"{counters.get('samples', 0)} / {faults} faults"


def row(device: str, seen: Seen, now: float) -> list[str]:
    """One device's cells, in the order of :data:`COLUMNS`; ``now`` in unix seconds."""
    s = seen.status
    if s is None:
        return [device, f"unreadable ({seen.problem})", *["-"] * (len(COLUMNS) - 2)]
    outcome = s.outcome or "-"
    if s.skip_reason and s.outcome != "sent":
        outcome += f" ({s.skip_reason})"
    model = (
        "-"
        if s.model_version is None
        else ("none" if s.model_version < 0 else f"v{s.model_version}")
    )
    return [
        device,
        s.state,
        model + (" (wants newer)" if s.wants_model else ""),
        str(s.last_round) if s.last_round else "-",
        outcome,
        "-" if s.train_loss is None else f"{s.train_loss:.4f}",
        f"{_size(s.bytes_up_today)} / {_size(s.bytes_down_today)}",
        _sensor(s.sensor),
        s.agent_version or "-",
        _duration(s.uptime_s),
        # The Will and the birth message carry no time (timestamp 0).
        _duration(now - s.timestamp) if s.timestamp > 0 else "-",
    ]


def table(view: FleetView, now: float, *, legend: bool = False) -> str:
    """The fleet as aligned text: a header, a row per device, a count line."""
    rows = [[name for name, _ in COLUMNS]]
    rows += [row(d, view.devices[d], now) for d in sorted(view.devices)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    states = [seen.status.state for seen in view.devices.values() if seen.status is not None]
    online = sum(1 for s in states if s != "offline")
    lines.append(
        f"{len(view.devices)} device(s) in fleet {view.topics.fleet}: {online} online,"
        f" {len(states) - online} offline"
        + (
            f", {len(view.devices) - len(states)} unreadable"
            if len(states) < len(view.devices)
            else ""
        )
    )
    if legend:
        lines += ["", *(f"{name:<8} {doc}" for name, doc in COLUMNS)]
    return "\n".join(lines)


def as_json(view: FleetView) -> list[dict]:
    out = []
    for device in sorted(view.devices):
        seen = view.devices[device]
        if seen.status is None:
            out.append({"device_id": device, "unreadable": seen.problem})
        else:
            out.append(
                seen.status.model_dump(mode="json", exclude_defaults=True) | {"kind": "status"}
            )
    return out


def gather(link: Link, view: FleetView, wait: float, *, quiet_after: float = 0.5) -> None:
    """Take messages until none came for ``quiet_after`` seconds (the retained ones come in a
    burst after subscribing), and at most ``wait`` seconds."""
    end = time.monotonic() + wait
    while (left := end - time.monotonic()) > 0:
        msg = link.get(min(quiet_after, left))
        if msg is None:
            if view.devices:
                return
            continue
        view.take(msg.topic, msg.payload)


def connect(cfg: WatchConfig, timeout: float) -> Link:
    # A client id of its own: a workstation must never take over a device's session.
    link = broker_link(cfg.broker, f"fedge-status-{secrets.token_hex(4)}", cfg.tls)
    link.connect(timeout=timeout)
    link.subscribe(Topics(cfg.fleet).statuses, qos=1)
    return link


def run(
    cfg: WatchConfig,
    *,
    wait: float = 3.0,
    watch: float | None = None,
    json_out: bool = False,
    legend: bool = False,
    out: TextIO = sys.stdout,
    link: Link | None = None,
) -> int:
    """Print the fleet once (or every ``watch`` seconds until interrupted). Returns the exit
    status: 0, or 1 when no device has a status on the broker."""
    link = link or connect(cfg, timeout=max(wait, 5.0))
    view = FleetView(Topics(cfg.fleet))
    try:
        gather(link, view, wait)
        if watch is None:
            if json_out:
                json.dump(as_json(view), out, indent=2)
                out.write("\n")
            else:
                print(table(view, time.time(), legend=legend), file=out)
            return 0 if view.devices else 1
        _watch(link, view, watch, json_out, out)
        return 0
    finally:
        link.close()


def _watch(link: Link, view: FleetView, every: float, json_out: bool, out: TextIO) -> None:
    if json_out:  # one line per status as it changes, after the ones held now
        for record in as_json(view):
            print(json.dumps(record), file=out, flush=True)
        while True:
            msg = link.get(1.0)
            if msg is not None and (device := view.take(msg.topic, msg.payload)) is not None:
                if device in view.devices:
                    record = next(r for r in as_json(view) if r["device_id"] == device)
                else:
                    record = {"device_id": device, "removed": True}
                print(json.dumps(record), file=out, flush=True)
    tty = out.isatty()
    while True:
        text = table(view, time.time())
        stamp = time.strftime("%H:%M:%S")
        out.write(("\x1b[H\x1b[2J" if tty else "\n") + f"{stamp}  every {every:g}s, Ctrl-C stops\n")
        out.write(text + "\n")
        out.flush()
        end = time.monotonic() + every
        while (left := end - time.monotonic()) > 0:
            msg = link.get(left)
            if msg is not None:
                view.take(msg.topic, msg.payload)


def load(config: Path | None, broker: str | None, fleet: str | None) -> WatchConfig:
    """The broker, fleet and TLS settings from ``--config`` and/or the flags (flags win)."""
    given = {k: v for k, v in (("broker", broker), ("fleet", fleet)) if v is not None}
    if config is None and len(given) < 2:
        raise ConfigError(["give --broker URL and --fleet FLEET, or --config FILE"])
    base = {} if config is None else load_config(config, WatchConfig).model_dump()
    try:
        return WatchConfig.model_validate(base | given)
    except ValidationError as exc:
        raise ConfigError([f"--{line}" for line in describe(exc)]) from exc
