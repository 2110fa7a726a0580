"""Homomorphic encryption over the in-memory link: real agents and the aggregator, a few
rounds of encrypted updates give the model plain FedAvg gives (within CKKS precision); the
aggregator resumes an encrypted round after a crash; a device without the key says so."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.daemon import Agent
from fedge.agent.dataset import Dataset
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.coordinator import Aggregator
from fedge.aggregator.store import Store, StoreError
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.models.runtime import load_runtime
from fedge.protocol import (
    GateSettings,
    MemoryBroker,
    MemoryLink,
    Reassembler,
    SkipNotice,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    decode_skip,
    he,
    is_skip,
)
from fedge.protocol.envelope import HE_TENSOR
from fedge.protocol.messages import HE_CODEC
from helpers import DIGITS_MODEL

from fedge.heconfig import AggregatorHeConfig

pytestmark = pytest.mark.link

FLEET = "hefleet"
T = Topics(FLEET)
DEVICES = ("d0", "d1", "d2")
PRECISION = 1e-5  # CKKS: a decrypted model against float64 arithmetic (docs)


@pytest.fixture(scope="module")
def key_files() -> he.KeyFiles:
    pytest.importorskip("tenseal", reason=he.INSTALL_HINT)
    return he.generate_keys()


@pytest.fixture(scope="module")
def secret(key_files: he.KeyFiles) -> he.HeKeys:
    return he.keys_from_bytes(key_files.secret, secret=True)


@pytest.fixture(scope="module")
def public(key_files: he.KeyFiles) -> he.HeKeys:
    return he.keys_from_bytes(key_files.public, secret=False)


@pytest.fixture
def public_file(tmp_path: Path, key_files: he.KeyFiles) -> Path:
    path = tmp_path / "he.public"
    path.write_bytes(key_files.public)
    return path


@pytest.fixture(autouse=True)
def stores() -> Iterator[list[Store]]:
    opened: list[Store] = []
    yield opened
    for store in opened:
        store.close()


def data(i: int) -> Dataset:
    rng = np.random.default_rng(100 + i)
    n = 24 + 8 * i  # unequal counts: the weights matter
    return Dataset(rng.random((n, 64), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32))


def training() -> TrainingConfig:
    return TrainingConfig(
        epochs=1,
        batch_size=8,
        lr=0.1,
        codec="float32",
        eval_fraction=0.0,
        gate=GateSettings(threshold=0.0),
    )


def aggregator(
    tmp: Path,
    broker: MemoryBroker,
    stores: list[Store],
    *,
    keys: he.HeKeys | None,
    key_file: Path | None,
    rounds: int,
) -> Aggregator:
    config = AggregatorConfig(
        fleet=FLEET,
        model=DIGITS_MODEL,
        state_dir=tmp,
        round_timeout=600.0,
        min_devices=len(DEVICES),
        rounds=rounds,
        training=training(),
        strategy=StrategyConfig(name="fedavg"),
        he=None if key_file is None else AggregatorHeConfig(key_file=key_file),
    )
    store = Store(tmp / "agg.sqlite")
    stores.append(store)
    agg = Aggregator(
        config,
        link=MemoryLink(broker, "aggregator"),
        store=store,
        initial_weights=load_runtime(DIGITS_MODEL).get_weights(),
        he_keys=keys,
    )
    agg.start()
    return agg


def agents(broker: MemoryBroker, keys: he.HeKeys | None, max_payload: int = 0) -> list[Agent]:
    out = []
    for i, device in enumerate(DEVICES):
        agent = Agent(
            device_id=device,
            fleet=FLEET,
            link=MemoryLink(broker, device),
            runtime=load_runtime(DIGITS_MODEL),
            data=data(i),
            rng=np.random.default_rng(i),
            he_keys=keys,
            max_payload=max_payload,
        )
        agent.start()
        out.append(agent)
    return out


def run(agg: Aggregator, devices: list[Agent], until: object = None) -> None:
    """Step everyone until the aggregator is done (or ``until()`` holds)."""
    for _ in range(10_000):
        if agg.done or (callable(until) and until()):
            for agent in devices:  # what is on its way to them (the last global model)
                while agent.step(0):
                    pass
            return
        for agent in devices:
            agent.step(0)
        agg.step(0)
    raise AssertionError("the fleet did not get there")


def close(weights: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(weights[k].astype(np.float64) - want[k]).max()) for k in want)


def test_encrypted_rounds_give_the_plain_fedavg_model(
    tmp_path: Path,
    stores: list[Store],
    secret: he.HeKeys,
    public: he.HeKeys,
    public_file: Path,
) -> None:
    rounds = 3
    plain_dir, he_dir = tmp_path / "plain", tmp_path / "he"
    plain_broker, he_broker = MemoryBroker(), MemoryBroker()
    plain = aggregator(plain_dir, plain_broker, stores, keys=None, key_file=None, rounds=rounds)
    run(plain, agents(plain_broker, None))
    spy = MemoryLink(he_broker, "spy")
    spy.connect()
    spy.subscribe(T.updates)
    enc = aggregator(he_dir, he_broker, stores, keys=public, key_file=public_file, rounds=rounds)
    fleet = agents(he_broker, secret, max_payload=128 * 1024)  # AWS IoT's limit: in chunks
    run(enc, fleet)
    assert enc.version == plain.version == rounds
    # The aggregator never held the model: its weights are the zero template ...
    assert all(not np.any(w) for w in enc.weights.values())
    # ... and every device decrypted the model plain FedAvg made, within CKKS precision.
    for agent in fleet:
        assert agent.global_version == rounds
        assert agent.global_weights is not None
        assert close(agent.global_weights, plain.weights) < PRECISION
    # What went up was ciphertexts, with the sample count as the weight.
    reassembler = Reassembler()
    whole = [reassembler.add(m.payload) for m in iter(lambda: spy.get(0), None)]
    updates = [decode(payload) for payload in whole if payload is not None]
    assert len(whole) >= 4 * len(updates)  # about 460 kB each, in 128 kB chunks
    headers = [d.msg for d in updates if isinstance(d.msg, UpdateHeader)]
    assert len(headers) == rounds * len(DEVICES)
    assert {h.codec for h in headers} == {HE_CODEC}
    assert all(set(d.tensors) == {HE_TENSOR} for d in updates)
    # rounds.jsonl says the aggregator could not evaluate.
    summary = [line for line in (he_dir / "rounds.jsonl").read_text().splitlines()][-1]
    assert '"encrypted": true' in summary and "accuracy" not in summary


def test_a_killed_aggregator_resumes_an_encrypted_round(
    tmp_path: Path,
    stores: list[Store],
    secret: he.HeKeys,
    public: he.HeKeys,
    public_file: Path,
) -> None:
    plain_broker = MemoryBroker()
    plain = aggregator(tmp_path / "plain", plain_broker, stores, keys=None, key_file=None, rounds=1)
    run(plain, agents(plain_broker, None))

    broker = MemoryBroker()
    enc = aggregator(tmp_path, broker, stores, keys=public, key_file=public_file, rounds=1)
    fleet = agents(broker, secret)
    # Two devices answer, then the aggregator dies before the third update arrives.
    run(enc, fleet[:2], until=lambda: enc.current is not None and len(enc.current.uploaded) == 2)
    enc.store.db.close()
    enc = aggregator(tmp_path, broker, stores, keys=public, key_file=public_file, rounds=1)
    assert enc.current is not None and sorted(enc.current.uploaded) == ["d0", "d1"]
    run(enc, fleet)
    assert enc.version == 1 and not enc.rejected
    for agent in fleet:
        assert agent.global_weights is not None and agent.global_version == 1
        assert close(agent.global_weights, plain.weights) < PRECISION
    # A restart after the round resumes at the encrypted v1, and without [he] it is refused.
    enc.store.db.close()
    again = aggregator(tmp_path, broker, stores, keys=public, key_file=public_file, rounds=2)
    assert again.version == 1 and again.he is not None
    assert again.he.payload == enc.he.payload  # type: ignore[union-attr]
    again.store.db.close()
    with pytest.raises(StoreError, match="encrypted"):
        aggregator(tmp_path, broker, stores, keys=None, key_file=None, rounds=2)


def test_a_device_without_the_key_sits_encrypted_rounds_out(
    tmp_path: Path, stores: list[Store], public: he.HeKeys, public_file: Path
) -> None:
    broker = MemoryBroker()
    spy = MemoryLink(broker, "spy")
    spy.connect()
    spy.subscribe(T.updates)
    enc = aggregator(tmp_path, broker, stores, keys=public, key_file=public_file, rounds=1)
    fleet = agents(broker, None)
    run(enc, fleet, until=lambda: all(a.state.last_round == 1 for a in fleet))
    for agent in fleet:
        assert agent.global_version == -1  # it could not decrypt the model
        assert agent.stats.rejected["he_no_secret_key"] == 1
        assert agent.outcome == ("skipped", "he_no_key")
        assert agent.stats.rounds_trained == 0
    notices = [
        decode_skip(m.payload, m.topic.rsplit("/", 1)[1])
        for m in iter(lambda: spy.get(0), None)
        if is_skip(m.payload)
    ]
    assert {n.reason for n in notices} == {"he_no_key"}
    assert all(isinstance(n, SkipNotice) and not n.trained for n in notices)


def test_a_device_with_the_key_sends_nothing_in_the_clear(
    tmp_path: Path, stores: list[Store], secret: he.HeKeys
) -> None:
    broker = MemoryBroker()
    spy = MemoryLink(broker, "spy")
    spy.connect()
    spy.subscribe(T.updates)
    plain = aggregator(tmp_path, broker, stores, keys=None, key_file=None, rounds=1)
    fleet = agents(broker, secret)  # an aggregator that announces plain rounds: a downgrade
    run(plain, fleet, until=lambda: all(a.state.last_round == 1 for a in fleet))
    for agent in fleet:
        assert agent.global_version == -1 and agent.stats.rejected["he_plain_model"] == 1
        assert agent.outcome == ("skipped", "he_required")
    sent = list(iter(lambda: spy.get(0), None))
    assert sent and all(is_skip(m.payload) for m in sent)
