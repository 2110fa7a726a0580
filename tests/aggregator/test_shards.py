"""Aggregator shards over the in-memory link: workers on a shared subscription and a
coordinator give the single aggregator's model on the same updates."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from fedge.aggregator.config import AggregatorConfig, ShardsConfig
from fedge.aggregator.coordinator import Aggregator
from fedge.aggregator.shard import ShardWorker
from fedge.aggregator.store import Store
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.protocol import (
    MemoryBroker,
    MemoryLink,
    ShardAccepted,
    SkipNotice,
    Status,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    encode,
    encode_skip,
    split,
)
from helpers import DIGITS_MODEL
from pydantic import ValidationError
from test_coordinator import STORES, Clock, close_stores, weights  # noqa: F401

pytestmark = pytest.mark.link

FLEET = "shards"
T = Topics(FLEET)


def config(tmp_path: Path, workers: int, **cfg: object) -> AggregatorConfig:
    settings: dict[str, object] = {
        "fleet": FLEET,
        "model": DIGITS_MODEL,
        "state_dir": tmp_path,
        "round_timeout": 10.0,
        "min_devices": 7,
        "training": TrainingConfig(epochs=1, batch_size=4, lr=0.1, codec="float32"),
        "strategy": StrategyConfig(name="fedadam"),
        "shards": ShardsConfig(workers=[f"w{i}" for i in range(workers)], close_timeout=5)
        if workers
        else None,
    }
    return AggregatorConfig.model_validate({**settings, **cfg})


def store(path: Path) -> Store:
    s = Store(path)
    STORES.append(s)
    return s


class Setup:
    """A coordinator (a single aggregator when ``workers`` is 0) and its workers."""

    def __init__(self, tmp_path: Path, workers: int, clock: Clock) -> None:
        self.broker, self.clock = MemoryBroker(), clock
        self.cfg = config(tmp_path, workers)
        self.agg = Aggregator(
            self.cfg,
            link=MemoryLink(self.broker, "aggregator"),
            store=store(tmp_path / "agg.sqlite"),
            initial_weights=weights(),
            clock=clock,
        )
        self.agg.start()
        self.tmp = tmp_path
        self.workers = {f"w{i}": self.worker(f"w{i}") for i in range(workers)}

    def worker(self, name: str) -> ShardWorker:
        w = ShardWorker(
            self.cfg,
            name,
            link=MemoryLink(self.broker, f"worker-{name}"),
            store=store(self.tmp / f"worker-{name}.sqlite"),
            template=weights(),
            clock=self.clock,
        )
        w.start()
        return w

    def pump(self) -> None:
        for _ in range(20):
            for w in self.workers.values():
                while (msg := w.link.get(0)) is not None:
                    w.handle(msg)
            while (msg := self.agg.link.get(0)) is not None:
                self.agg.handle(msg)
            self.agg.tick()


def device(broker: MemoryBroker, name: str) -> MemoryLink:
    link = MemoryLink(broker, name)
    link.connect()
    link.publish(
        T.status(name), encode(Status(device_id=name, state="online", timestamp=0)), retain=True
    )
    return link


def update(link: MemoryLink, round_id: int, base: int, value: float, n: int, uid: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{link.client_id}/{round_id}/{uid}".encode()))
    delta = {
        "w": (value + rng.normal(size=(2, 3))).astype(np.float32),
        "b": (value + rng.normal(size=3)).astype(np.float32),
    }
    header = UpdateHeader(
        device_id=link.client_id, round_id=round_id, update_id=uid, base_version=base, num_samples=n
    )
    link.publish(T.update(link.client_id), encode(header, delta))


def skip(link: MemoryLink, round_id: int, n: int, trained: bool) -> None:
    notice = SkipNotice(
        device_id=link.client_id,
        round_id=round_id,
        update_id=f"{zlib.crc32(link.client_id.encode()):08x}{round_id:08x}",
        reason="below_threshold" if trained else "battery",
        trained=trained,
        num_samples=n,
    )
    link.publish(T.update(link.client_id), encode_skip(notice))


def play(s: Setup, rounds: int = 2) -> list[dict]:
    """Two rounds of seven devices: a clipped sample count, a held update (zero delta), a
    skip, and a device that answers twice under two update ids."""
    devs = [device(s.broker, f"d{i}") for i in range(7)]
    s.pump()
    for r in range(1, rounds + 1):
        base = r - 1
        update(devs[0], r, base, 1.0, 10, f"a{r}")
        update(devs[1], r, base, -2.0, 20, f"a{r}")
        update(devs[2], r, base, 0.5, 1000, f"a{r}")  # clipped to 3x the median
        skip(devs[3], r, 15, trained=True)
        skip(devs[4], r, 0, trained=False)
        s.pump()
        update(devs[5], r, base, 3.0, 12, f"a{r}")
        s.pump()
        # Answered already: must not count, even in the sum of another worker. (Of two
        # answers that reach two workers at once, the first the coordinator hears counts.)
        update(devs[5], r, base, 9.0, 12, f"b{r}")
        s.pump()
        update(devs[6], r, base, -1.0, 8, f"a{r}")
        s.pump()
    return [json.loads(line) for line in (s.tmp / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_a_sharded_round_gives_the_single_aggregators_model(tmp_path: Path, workers: int) -> None:
    single = Setup(tmp_path / "single", 0, Clock())
    sharded = Setup(tmp_path / "sharded", workers, Clock())
    one, many = play(single), play(sharded)
    assert sharded.agg.version == single.agg.version == 2
    for name, w in single.agg.weights.items():
        assert np.max(np.abs(sharded.agg.weights[name] - w)) <= 1e-6
    for a, b in zip(one, many, strict=True):
        assert a["status"] == b["status"] == "done"
        for key in ("participants", "skipped", "missing", "weights", "samples_clipped"):
            assert a[key] == b[key]
        assert b["train_loss"] is None and b["samples_clipped"] == {"d2": 1000}
    # The updates were spread over the workers, and the second answer of d5 refused once.
    assert sum(1 for w in sharded.workers.values() if w.accepted) >= 2
    assert sharded.agg.rejected["already_answered"] == 2


def test_a_worker_that_restarts_mid_round_takes_its_updates_up_again(tmp_path: Path) -> None:
    single = Setup(tmp_path / "single", 0, Clock())
    sharded = Setup(tmp_path / "sharded", 2, Clock())
    for s in (single, sharded):
        devs = [device(s.broker, f"d{i}") for i in range(7)]
        s.pump()
        for i, dev in enumerate(devs[:4]):
            update(dev, 1, 0, float(i), 10 + i, "a")
        s.pump()
        if s is sharded:
            old = s.workers["w0"]
            assert old.accepted == 2  # taken turns: two each
            old.link.kill()
            old.store.close()
            s.workers["w0"] = s.worker("w0")  # the same store file: what it accepted is kept
        for i, dev in enumerate(devs[4:], start=4):
            update(dev, 1, 0, float(i), 10 + i, "a")
        s.pump()
    # Its partial sum held what it accepted before the restart, or the round would fail.
    assert sharded.agg.version == single.agg.version == 1
    for name, w in single.agg.weights.items():
        assert np.max(np.abs(sharded.agg.weights[name] - w)) <= 1e-6


def test_a_round_fails_when_a_worker_never_sends_its_partial_sum(tmp_path: Path) -> None:
    clock = Clock()
    s = Setup(tmp_path, 2, clock)
    devs = [device(s.broker, f"d{i}") for i in range(7)]
    s.pump()
    for dev in devs:
        update(dev, 1, 0, 1.0, 10, "a")
    for w in s.workers.values():
        while (msg := w.link.get(0)) is not None:
            w.handle(msg)
    s.workers["w1"].link.kill()  # down after it accepted, before the close
    del s.workers["w1"]
    s.pump()
    assert s.agg.version == 0 and s.agg.current is not None  # waiting for w1
    clock.now += 6
    s.pump()
    line = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[-1])
    assert line["status"] == "failed"
    assert line["why"] == "no partial sum from worker(s) w1 within 5 s"
    assert s.agg.current is not None and s.agg.current.round_id == 2


def test_a_worker_refuses_chunks_and_the_coordinator_unknown_workers(tmp_path: Path) -> None:
    s = Setup(tmp_path, 2, Clock())
    devs = [device(s.broker, f"d{i}") for i in range(7)]
    s.pump()
    header = UpdateHeader(device_id="d0", round_id=1, update_id="c", base_version=0, num_samples=5)
    for chunk in split(encode(header, weights()), 64, b"12345678"):
        devs[0].publish(T.update("d0"), chunk)
    report = ShardAccepted(worker="w9", nbytes=10, answer=header)
    devs[1].publish(T.shard("w9", "accepted"), encode(report))
    s.pump()
    assert sum(w.rejected["chunk_sharded"] for w in s.workers.values()) > 0
    assert s.agg.rejected["unknown_worker"] == 1
    assert s.agg.current is not None and not s.agg.current.answered


@pytest.mark.unit
def test_shard_messages_round_trip_and_config_refuses_robust_combiners(tmp_path: Path) -> None:
    answer = SkipNotice(device_id="d", round_id=3, update_id="u", reason="heat")
    report = ShardAccepted(worker="w0", nbytes=40, answer=answer)
    assert decode(encode(report)).msg == report
    with pytest.raises(ValidationError, match="robust combiner needs every delta"):
        config(tmp_path, 2, strategy=StrategyConfig(robust="median"))
    with pytest.raises(ValidationError, match="worker names must differ"):
        ShardsConfig(workers=["a", "a"])
    cfg = config(tmp_path, 2)
    with pytest.raises(ValueError, match="not one of"):
        ShardWorker(
            cfg,
            "w7",
            link=MemoryLink(MemoryBroker(), "x"),
            store=store(tmp_path / "x.sqlite"),
            template=weights(),
        )
