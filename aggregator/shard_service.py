"""Glue from a config file to a running shard worker (``fedge aggregator --worker NAME``)."""

from __future__ import annotations

import logging

from fedge.models.runtime import load_runtime
from fedge.protocol import Link
from fedge.protocol.signing import load_private_key, load_public_key, verify_key

from fedge.brokerconfig import broker_link
from fedge.configfile import ConfigError
from fedge.systemd import serve_until_stopped

from .config import AggregatorConfig
from .shard import ShardWorker
from .store import Store

log = logging.getLogger("fedge.aggregator")


def build_worker(cfg: AggregatorConfig, name: str, link: Link | None = None) -> ShardWorker:
    """The worker ``name`` of ``[shards] workers``: its own client id and state file."""
    if cfg.shards is None or name not in cfg.shards.workers:
        known = ", ".join(cfg.shards.workers) if cfg.shards else "none: the config has no [shards]"
        raise ConfigError([f"--worker {name}: not one of [shards] workers ({known})"])
    template = load_runtime(cfg.model).get_weights()
    if link is None:
        # Acknowledged only once kept: what a crash interrupts, the broker sends again.
        link = broker_link(cfg.broker, f"{cfg.client_id}-{name}", cfg.tls, manual_ack=True)
    if cfg.aggregator_keys:  # a site gateway: the coordinator's public key, pinned
        keys = [load_public_key(path.read_bytes()) for path in cfg.aggregator_keys]
    elif cfg.signing_key is not None:  # beside the coordinator: the public half of its key
        keys = [verify_key(load_private_key(cfg.signing_key.read_bytes()))]
    else:
        keys = []
    return ShardWorker(
        cfg,
        name,
        link=link,
        store=Store(cfg.state_dir / f"worker-{name}.sqlite"),
        template=template,
        verify_keys=keys,
    )


def serve_worker(cfg: AggregatorConfig, name: str) -> int:
    """Run until SIGTERM/SIGINT."""
    worker = build_worker(cfg, name)
    worker.start(keep_trying=True)
    try:
        serve_until_stopped(worker.step, poll=0.2)
    finally:
        worker.link.close()
        worker.store.close()
    log.info("worker %s stopped after %d accepted answer(s)", name, worker.accepted)
    return 0
