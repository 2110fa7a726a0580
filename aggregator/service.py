"""Glue from a config file to a running aggregator."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedge.models.runtime import load_runtime
from fedge.protocol import Link, make_link

from fedge.systemd import serve_until_stopped

from .config import AggregatorConfig
from .coordinator import Aggregator, Evaluator
from .store import Store

log = logging.getLogger("fedge.aggregator")


def make_evaluator(cfg: AggregatorConfig) -> Evaluator | None:
    if cfg.eval_data is None:
        return None
    import numpy as np

    with np.load(cfg.eval_data, allow_pickle=False) as npz:
        x = np.asarray(npz["x"], np.float32)
        y = np.asarray(npz["y"], np.int32)
    runtime = load_runtime(cfg.model)

    def evaluate(weights: dict) -> tuple[float, float]:
        runtime.set_weights(weights)
        return runtime.evaluate(x, y)

    return evaluate


def build_aggregator(
    cfg: AggregatorConfig, link: Link | None = None, on_round: Callable[[dict], None] | None = None
) -> Aggregator:
    initial = load_runtime(cfg.model).get_weights()
    if link is None:
        link = make_link(cfg.broker, cfg.client_id)
    return Aggregator(
        cfg,
        link=link,
        store=Store(cfg.state_dir / "aggregator.sqlite"),
        initial_weights=initial,
        evaluator=make_evaluator(cfg),
        on_round=on_round,
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
