"""Glue from a config file to a running aggregator."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from fedge.models.checks import DataError, check_data, model_io, read_npz
from fedge.models.runtime import load_runtime
from fedge.protocol import Link
from fedge.protocol.signing import load_private_key

from fedge.brokerconfig import broker_link
from fedge.configfile import ConfigError
from fedge.heconfig import load_he_keys
from fedge.metrics import AggregatorCollector, RoundRecorder, serve_metrics
from fedge.systemd import notify, serve_until_stopped

from .config import AggregatorConfig
from .coordinator import Aggregator, Evaluator, describe_round
from .store import Store, StoreCorrupt, read_back

log = logging.getLogger("fedge.aggregator")


class HeldOutEvaluator:
    """Scores a global model on the held-out set: (loss, metric).

    The set is checked against the model when the evaluator is made (shapes, label range,
    finiteness): :class:`fedge.models.checks.DataError` names ``name``.
    """

    def __init__(
        self, model: Path, x: np.ndarray, y: np.ndarray, *, name: str = "held-out data"
    ) -> None:
        fits = model_io(model)
        self.x, self.y = check_data(fits, x, y, name=name)
        self.runtime = load_runtime(model)
        self.regression = fits.task == "regress"
        self.metric_name = "mae" if self.regression else "accuracy"

    @classmethod
    def from_file(cls, model: Path, data: Path) -> HeldOutEvaluator:
        x, y = read_npz(data)
        return cls(model, x, y, name=str(data))

    def __call__(self, weights: dict) -> tuple[float, float]:
        self.runtime.set_weights(weights)
        return self.runtime.evaluate(self.x, self.y)


def make_evaluator(cfg: AggregatorConfig) -> Evaluator | None:
    """The held-out evaluator of ``eval_data``, checked now: before anything connects."""
    if cfg.eval_data is None:
        return None
    try:
        return HeldOutEvaluator.from_file(cfg.model, cfg.eval_data)
    except DataError as exc:  # a file the config names that cannot serve: restarting won't help
        raise ConfigError([f"eval_data {exc}"]) from exc


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


STATE_FILE = "aggregator.sqlite"


def reset_state(cfg: AggregatorConfig, now: float | None = None) -> tuple[int, int] | None:
    """Move the state database aside and return the last (round, model version) the fleet
    can have seen, from rounds.jsonl and the backup, so the new state numbers on above it
    (None: no history)."""
    floor = history(cfg)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    for suffix in ("", "-wal", "-shm"):
        path = cfg.state_dir / f"{STATE_FILE}{suffix}"
        if path.exists():
            aside = path.with_name(f"{path.name}.reset-{stamp}")
            os.replace(path, aside)
            log.warning("--reset-state: moved %s to %s", path, aside)
    if floor is None:
        log.warning("--reset-state: no history found; starting at round 1 with model v0")
    else:
        log.warning(
            "--reset-state: fresh state after round %d and model v%d; the model starts again"
            " from %s",
            *floor,
            cfg.model,
        )
    return floor


def history(cfg: AggregatorConfig) -> tuple[int, int] | None:
    """The highest (round, model version) that rounds.jsonl or the state's backup records."""
    found: list[tuple[int, int]] = []
    for record in read_back(cfg.log_path):
        try:
            found.append((int(record["round"]), int(record["model_version"])))
            break
        except (ValueError, KeyError, TypeError):
            continue  # not a round record
    backup = cfg.state_dir / f"{STATE_FILE}.bak"
    if backup.is_file():
        try:
            # Read as a plain file (immutable): a reader of a WAL database leaves -wal and
            # -shm files beside it, which a later backup would inherit.
            uri = f"file:{backup}?mode=ro&immutable=1"
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
                last_round = db.execute("SELECT MAX(round_id) FROM rounds").fetchone()[0]
                last_version = db.execute("SELECT MAX(version) FROM models").fetchone()[0]
            found.append((int(last_round or 0), int(last_version or 0)))
        except sqlite3.Error as exc:
            log.warning("cannot read the backup %s (%s)", backup, exc)
    if not found:
        return None
    return max(r for r, _ in found), max(v for _, v in found)


def build_aggregator(
    cfg: AggregatorConfig,
    link: Link | None = None,
    on_round: Callable[[dict], None] | None = None,
    floor: tuple[int, int] | None = None,
) -> Aggregator:
    evaluator = make_evaluator(cfg)  # the files the config names first: one clear line
    # Homomorphic encryption: the public key only (the config refused the secret one).
    he_keys = None if cfg.he is None else load_he_keys(cfg.he.key_file, secret=False)
    caps, revoked = load_registry(cfg)
    db = cfg.state_dir / STATE_FILE
    if floor is None:
        # What the fleet can have seen. A state behind it (a restored backup) numbers on
        # above it (Aggregator._catch_up): agents refuse older rounds and models.
        floor = history(cfg)
        if floor is not None and not db.exists():
            raise StoreCorrupt(
                f"aggregator state {db} is missing, but {cfg.log_path.name} or the backup"
                f" shows round {floor[0]} and model v{floor[1]}: restore the backup"
                f" {db.name}.bak, or start afresh with"
                " `fedge aggregator --config CONFIG --reset-state`"
            )
        if not db.exists():
            log.info("no aggregator state yet (%s): starting at round 1 with model v0", db)
    initial = load_runtime(cfg.model).get_weights()
    if link is None:
        # Acknowledged only once handled: what a crash interrupts, the broker sends again.
        # No network thread: the loop's get() runs the connection (every 0.2 s at most), so
        # each message, ack and publish is handled on one thread, with no wake-up between two.
        link = broker_link(
            cfg.broker, cfg.client_id, cfg.tls, manual_ack=True, network_thread=False
        )
    key = cfg.signing_key
    return Aggregator(
        cfg,
        link=link,
        store=Store(db),
        initial_weights=initial,
        evaluator=evaluator,
        on_round=on_round,
        signing_key=None if key is None else load_private_key(key.read_bytes()),
        sample_caps=caps,
        revoked=revoked,
        floor=floor,
        he_keys=he_keys,
    )


def show_status(text: str) -> None:
    """The line ``systemctl status`` shows for the service."""
    notify(f"STATUS={text}")


def serve(cfg: AggregatorConfig, *, reset: bool = False) -> int:
    """Run until SIGTERM/SIGINT or the configured rounds are done."""
    floor = reset_state(cfg) if reset else None

    # The last round's line for `systemctl status`, its gauges for the metrics.
    rounds = RoundRecorder(then=lambda summary: show_status(describe_round(summary)))
    agg = build_aggregator(cfg, on_round=rounds, floor=floor)
    agg.on_note = show_status  # what it waits for, until the next round line
    metrics = serve_metrics([AggregatorCollector(agg, rounds)], cfg.metrics_port, cfg.metrics_addr)
    agg.start(keep_trying=True)
    # What start-up made (modules, runtime, config) lives as long as the process: the
    # collector need not walk it again in every full collection (about 1 ms a round).
    gc.freeze()
    try:
        serve_until_stopped(agg.step, poll=0.2, done=lambda: agg.done)
    finally:
        agg.link.close()
        agg.store.close()
        if metrics is not None:
            metrics.close()
    if agg.done:
        log.info("finished %d round(s)", agg.completed)
    return 0
