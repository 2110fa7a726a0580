"""Prometheus metrics for the agent and the aggregator, read from their state at scrape time.

The collectors read the objects the loops already keep up to date (the agent's ``stats``, the
aggregator's counters, each link's byte counts), so the loops make no calls of their own for
metrics. Each server has its own :class:`CollectorRegistry`, never the process-wide default, so
several can run in one process (tests, simulated fleets).

This module imports neither ``fedge.agent`` nor ``fedge.aggregator``: it reads their objects by
attribute. The server listens on localhost unless the config says otherwise; port 0 means off.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .configfile import ConfigError

log = logging.getLogger("fedge.metrics")


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`close` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(
    collectors: Iterable[Collector], port: int | None, addr: str = "127.0.0.1"
) -> MetricsServer | None:
    """Serve the collectors on ``addr:port`` (None or 0: off, and None is returned).
    A port that cannot be served is a ``ConfigError`` naming ``metrics_port``."""
    if not port:
        return None
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:  # a port in use or not ours to take: the setting is wrong
        raise ConfigError(
            [f"metrics_port: cannot serve metrics on {addr}:{port} ({exc.strerror or exc})"]
        ) from exc
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return MetricsServer(server, thread)


def _name(key: str) -> str:
    """A counter key as part of a metric name: [a-z0-9_]."""
    return re.sub(r"[^a-z0-9_]", "_", key.lower())


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    # prometheus_client appends "_total" to a counter family's samples itself.
    return CounterMetricFamily(name.removesuffix("_total"), doc, value=value)


def _by_label(name: str, doc: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=[label])
    for key, value in sorted(dict(counts).items()):  # a copy: the loop may add keys meanwhile
        family.add_metric([str(key)], value)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class AgentCollector(Collector):
    """What one agent (:class:`fedge.agent.daemon.Agent`) has done, read at scrape time."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        s = a.stats
        yield _counter("fedge_agent_rounds_trained_total", "Rounds trained.", s.rounds_trained)
        yield _counter(
            "fedge_agent_models_applied_total", "Global models applied.", s.models_applied
        )
        yield _counter(
            "fedge_agent_rounds_failed_total",
            "Rounds that could not be answered (diverged, encode errors).",
            s.failed,
        )
        yield _by_label(
            "fedge_agent_updates_skipped_total", "Rounds sat out, by reason.", "reason", s.skipped
        )
        yield _by_label(
            "fedge_agent_messages_rejected_total",
            "Messages from the broker rejected, by reason.",
            "reason",
            s.rejected,
        )
        yield _counter(
            "fedge_agent_update_bytes_sent_total",
            "MQTT bytes of updates and skip notices sent.",
            s.bytes_sent,
        )
        yield _gauge(
            "fedge_agent_last_update_bytes", "MQTT bytes of the last update.", a.last_update_bytes
        )
        yield _counter(
            "fedge_agent_mqtt_bytes_sent_total", "MQTT bytes sent (all messages).", a.link.bytes_up
        )
        yield _counter(
            "fedge_agent_mqtt_bytes_received_total",
            "MQTT bytes received (all messages).",
            a.link.bytes_down,
        )
        yield _gauge(
            "fedge_agent_model_version",
            "Global model version applied (-1: none).",
            a.global_version,
        )
        yield _gauge(
            "fedge_agent_last_round", "Last round answered (update or skip).", a.state.last_round
        )
        if a.anomaly_score is not None:
            yield _gauge(
                "fedge_agent_anomaly_score",
                "Latest window's reconstruction error under the global model.",
                a.anomaly_score,
            )
        if a.last_train_loss is not None:
            yield _gauge(
                "fedge_agent_train_loss",
                "Training loss of the last local round.",
                a.last_train_loss,
            )
        if a.readings is not None:
            yield from _readings(a.readings())
        sensor = getattr(a, "sensor", None)
        if sensor is not None:
            yield from _serial(sensor)
            yield _gauge(
                "fedge_agent_store_size_bytes", "The sample store on disk.", sensor.store_bytes
            )


# What the eligibility check reads (fedge.agent.eligibility), in base units.
_READINGS = {
    "on_mains": ("fedge_agent_on_mains", "1 on mains power, 0 on battery.", 1.0),
    "battery_percent": ("fedge_agent_battery_ratio", "Battery charge (0-1).", 0.01),
    "cpu_temp_c": ("fedge_agent_cpu_temperature_celsius", "CPU temperature.", 1.0),
    "load_per_cpu": ("fedge_agent_load_per_cpu", "1-minute load average per core.", 1.0),
}


def _readings(values: Mapping[str, float]) -> Iterator[Metric]:
    """The eligibility readings the device could read (unknown ones are left out)."""
    for key, (name, doc, scale) in _READINGS.items():
        if values.get(key) is not None:
            yield _gauge(name, doc, values[key] * scale)


def _serial(sensor: Any) -> Iterator[Metric]:
    """The serial path's counters: one metric each, and frame faults by kind."""
    counts = dict(sensor.counters)
    faults = {k: counts.pop(k) for k in list(getattr(sensor.decoder, "faults", {})) if k in counts}
    for key, value in sorted(counts.items()):
        name = f"fedge_agent_serial_{_name(key)}_total"
        yield _counter(name, f"Serial path: {key}.", value)
    yield _by_label(
        "fedge_agent_serial_frame_faults_total", "Serial frames rejected, by kind.", "kind", faults
    )


class RoundRecorder:
    """The aggregator's ``on_round`` callback: keeps the last round's summary, then calls on."""

    def __init__(self, then: Callable[[dict], None] | None = None) -> None:
        self.last: dict | None = None
        self.statuses: Counter[str] = Counter()  # rounds closed in this process, by status
        self.then = then

    def __call__(self, summary: dict) -> None:
        self.last = summary
        self.statuses[str(summary.get("status"))] += 1
        if self.then is not None:
            self.then(summary)


class AggregatorCollector(Collector):
    """What the aggregator (:class:`fedge.aggregator.coordinator.Aggregator`) has done."""

    def __init__(self, aggregator: Any, rounds: RoundRecorder) -> None:
        self.aggregator = aggregator
        self.rounds = rounds

    def collect(self) -> Iterator[Metric]:
        g = self.aggregator
        rounds = CounterMetricFamily(
            "fedge_aggregator_rounds", "Rounds closed, by status.", labels=["status"]
        )
        # "done" from the aggregator (it survives restarts); the others as this process saw them.
        statuses = dict(self.rounds.statuses) | {"done": g.completed}
        statuses.setdefault("failed", 0)
        for status, count in sorted(statuses.items()):
            rounds.add_metric([status], count)
        yield rounds
        yield _gauge("fedge_aggregator_model_version", "Global model version.", g.version)
        yield _gauge(
            "fedge_aggregator_devices_online", "Devices online (status heartbeat).", len(g.online)
        )
        current = g.current
        yield _gauge(
            "fedge_aggregator_round_open", "1 while a round is open.", int(current is not None)
        )
        yield _gauge(
            "fedge_aggregator_round_selected",
            "Devices selected for the open round.",
            0 if current is None else len(current.selected),
        )
        yield _gauge(
            "fedge_aggregator_round_answered",
            "Devices that answered the open round (update or skip).",
            0 if current is None else len(current.answered),
        )
        yield _by_label(
            "fedge_aggregator_messages_rejected_total",
            "Messages rejected, by reason.",
            "reason",
            g.rejected,
        )
        yield _counter(
            "fedge_aggregator_samples_clipped_total",
            "Declared sample counts clipped.",
            g.samples_clipped,
        )
        yield _counter(
            "fedge_aggregator_global_republished_total",
            "Times the global model was sent again.",
            g.republished,
        )
        yield _counter(
            "fedge_aggregator_stray_bytes_total",
            "Update bytes no open round could be credited with.",
            g.stray_bytes,
        )
        yield _counter(
            "fedge_aggregator_mqtt_bytes_sent_total", "MQTT bytes sent.", g.link.bytes_up
        )
        yield _counter(
            "fedge_aggregator_mqtt_bytes_received_total", "MQTT bytes received.", g.link.bytes_down
        )
        yield from _last_round(self.rounds.last)


def _last_round(summary: dict | None) -> Iterator[Metric]:
    """Gauges of the last closed round (none before the first)."""
    if summary is None:
        return
    yield _gauge("fedge_aggregator_last_round", "Id of the last closed round.", summary["round"])
    yield _gauge(
        "fedge_aggregator_round_participants",
        "Devices whose update went into the last round.",
        len(summary.get("participants", ())),
    )
    yield _gauge(
        "fedge_aggregator_round_skipped",
        "Devices that sat the last round out.",
        len(summary.get("skipped", ())),
    )
    yield _gauge(
        "fedge_aggregator_round_missing",
        "Selected devices that did not answer the last round.",
        len(summary.get("missing", ())),
    )
    yield _gauge(
        "fedge_aggregator_round_duration_seconds",
        "Time from announcement to close of the last round.",
        summary.get("duration_s", 0.0),
    )
    yield _gauge(
        "fedge_aggregator_round_received_bytes",
        "MQTT bytes of updates received in the last round.",
        summary.get("bytes_received", 0),
    )
    if summary.get("train_loss") is not None:
        yield _gauge(
            "fedge_aggregator_round_train_loss",
            "Sample-weighted training loss the devices reported in the last round.",
            summary["train_loss"],
        )
    if summary.get("accuracy") is not None:
        yield _gauge(
            "fedge_aggregator_accuracy_ratio",
            "Held-out accuracy of the global model after the last round.",
            summary["accuracy"],
        )
    if summary.get("mae") is not None:
        yield _gauge(
            "fedge_aggregator_mae",
            "Held-out mean absolute error of the global model after the last round.",
            summary["mae"],
        )
    if summary.get("loss") is not None:
        yield _gauge("fedge_aggregator_loss", "Held-out loss of the global model.", summary["loss"])
    yield from _federated(summary.get("fed_eval"))
    dp = summary.get("privacy")
    if dp:
        yield _gauge(
            "fedge_aggregator_privacy_epsilon",
            "Differential privacy: epsilon spent so far, at the configured delta.",
            dp["epsilon"],
        )


def _federated(scored: dict | None) -> Iterator[Metric]:
    """The devices' scores of the model the last round started from (federated evaluation),
    weighted by the examples each held out; none when no device evaluated."""
    if not scored:
        return
    yield _gauge(
        "fedge_aggregator_federated_eval_samples",
        "Examples the devices held out and scored in the last round.",
        scored.get("count", 0),
    )
    yield _gauge(
        "fedge_aggregator_federated_loss",
        "Loss of the last round's starting model on the devices' held-out data.",
        scored.get("loss", float("nan")),
    )
    if scored.get("accuracy") is not None:
        yield _gauge(
            "fedge_aggregator_federated_accuracy_ratio",
            "Accuracy of the last round's starting model on the devices' held-out data.",
            scored["accuracy"],
        )
    if scored.get("mae") is not None:
        yield _gauge(
            "fedge_aggregator_federated_mae",
            "Mean absolute error of the last round's starting model on the devices' held-out data.",
            scored["mae"],
        )
