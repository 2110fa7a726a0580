"""Glue from a config file to a running aggregator."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from fedge.models.runtime import load_runtime
from fedge.protocol import Link
from fedge.protocol.signing import load_private_key

from fedge.brokerconfig import broker_link
from fedge.configfile import ConfigError
from fedge.systemd import serve_until_stopped

from .config import AggregatorConfig
from .coordinator import Aggregator, Evaluator
from .store import Store

log = logging.getLogger("fedge.aggregator")


class HeldOutEvaluator:
    """Scores a global model on the held-out set: (loss, metric)."""

    def __init__(self, model: Path, x: np.ndarray, y: np.ndarray) -> None:
        self.runtime = load_runtime(model)
        self.x = np.asarray(x, np.float32)
        self.regression = np.asarray(y).dtype.kind == "f"
        self.y = np.asarray(y, np.float32 if self.regression else np.int32)
        self.metric_name = "mae" if self.regression else "accuracy"

    @classmethod
    def from_file(cls, model: Path, data: Path) -> HeldOutEvaluator:
        with np.load(data, allow_pickle=False) as npz:
            return cls(model, npz["x"], npz["y"])

    def __call__(self, weights: dict) -> tuple[float, float]:
        self.runtime.set_weights(weights)
        return self.runtime.evaluate(self.x, self.y)


def make_evaluator(cfg: AggregatorConfig) -> Evaluator | None:
    return None if cfg.eval_data is None else HeldOutEvaluator.from_file(cfg.model, cfg.eval_data)


def load_registry(cfg: AggregatorConfig) -> tuple[dict[str, int], set[str]]:
    """Per-device sample caps (the provisioning registry's, overridden by the config's) and the
    revoked devices, which the aggregator neither counts online nor selects."""
    caps: dict[str, int] = {}
    revoked: set[str] = set()
    registry = cfg.samples.registry
    if registry is not None:
        try:
            devices = json.loads(registry.read_text()).get("devices", {})
            for device, entry in devices.items():
                if entry.get("revoked"):
                    revoked.add(str(device))
                elif entry.get("max_samples"):
                    caps[str(device)] = int(entry["max_samples"])
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise ConfigError([f"{registry}: not a fedge provisioning registry ({exc})"]) from exc
    caps.update(cfg.samples.caps)
    return caps, revoked


def build_aggregator(
    cfg: AggregatorConfig, link: Link | None = None, on_round: Callable[[dict], None] | None = None
) -> Aggregator:
    initial = load_runtime(cfg.model).get_weights()
    if link is None:
        link = broker_link(cfg.broker, cfg.client_id, cfg.tls)
    key = cfg.signing_key
    caps, revoked = load_registry(cfg)
    return Aggregator(
        cfg,
        link=link,
        store=Store(cfg.state_dir / "aggregator.sqlite"),
        initial_weights=initial,
        evaluator=make_evaluator(cfg),
        on_round=on_round,
        signing_key=None if key is None else load_private_key(key.read_bytes()),
        sample_caps=caps,
        revoked=revoked,
    )


def serve(cfg: AggregatorConfig) -> int:
    """Run until SIGTERM/SIGINT or the configured rounds are done."""
    agg = build_aggregator(cfg)
    agg.start()
    try:
        serve_until_stopped(agg.step, poll=0.2, done=lambda: agg.done)
    finally:
        agg.link.close()
        agg.store.close()
    if agg.done:
        log.info("finished %d round(s)", agg.completed)
    return 0
