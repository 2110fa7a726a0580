"""The Grafana dashboard in deploy/grafana queries only metrics that fedge really exposes.

The names come from collecting the agent's and the aggregator's collectors over stand-in
objects, so a metric renamed in fedge/metrics.py fails here until the dashboard follows.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from fedge.agent.daemon import AgentStats
from fedge.agent.state import AgentState
from prometheus_client import CollectorRegistry

from fedge.metrics import AgentCollector, AggregatorCollector, RoundRecorder

pytestmark = pytest.mark.unit
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "fedge-dashboard.json"
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}


def exposed() -> dict[str, set[str]]:
    """Every metric name the collectors expose (as PromQL sees it), with its labels."""
    link = SimpleNamespace(bytes_up=10, bytes_down=20)
    agent = SimpleNamespace(
        stats=AgentStats(rejected=Counter(x=1), skipped=Counter(y=1)),
        link=link,
        global_version=1,
        state=AgentState(last_round=1),
        last_update_bytes=5,
        anomaly_score=0.5,
        last_train_loss=0.4,
        readings=lambda: {
            "on_mains": 0.0,
            "battery_percent": 50.0,
            "cpu_temp_c": 50.0,
            "load_per_cpu": 0.5,
        },
        sensor=SimpleNamespace(
            counters={"samples": 1, "crc": 1},
            decoder=SimpleNamespace(faults={"crc": 1}),
            store_bytes=10,
        ),
    )
    rounds = RoundRecorder()
    # Every optional field of a round summary, so every optional gauge appears.
    rounds(
        {
            "round": 1,
            "status": "done",
            "participants": ["a"],
            "skipped": [],
            "missing": [],
            "duration_s": 1.0,
            "bytes_received": 10,
            "train_loss": 0.5,
            "accuracy": 0.9,
            "mae": 0.1,
            "loss": 0.3,
            "fed_eval": {"model_version": 0, "count": 9, "loss": 0.4, "accuracy": 0.8, "mae": 0.2},
        }
    )
    aggregator = SimpleNamespace(
        completed=1,
        version=1,
        rejected=Counter(x=1),
        samples_clipped=0,
        republished=0,
        online={"a"},
        current=None,
        stray_bytes=0,
        link=link,
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    registry.register(AggregatorCollector(aggregator, rounds))
    names: dict[str, set[str]] = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        names[name] = {label for s in family.samples for label in s.labels}
    return names


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_the_dashboard_has_queries() -> None:
    found = queries()
    assert len(found) >= 10 and all(e.strip() for e in found)


@pytest.mark.parametrize("expr", queries())
def test_every_query_names_real_metrics_and_labels(expr: str) -> None:
    metrics = exposed()
    used = set(re.findall(r"\bfedge_[a-z0-9_]+", expr))
    assert used, f"{expr!r} names no fedge metric"
    unknown = used - set(metrics)
    assert not unknown, f"{expr!r}: no such metric {sorted(unknown)}"
    labels = set().union(*(metrics[m] for m in used)) | TARGET_LABELS
    grouped = {
        label.strip()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for label in group.split(",")
    }
    matched = set(re.findall(r"([a-z_]+)\s*=~?", "".join(re.findall(r"\{[^}]*\}", expr))))
    assert not (grouped | matched) - labels, f"{expr!r}: labels {sorted(labels)} only"
