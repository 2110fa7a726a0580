"""The agent over the in-memory link: trains when selected, sends its delta, remembers rounds."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.daemon import Agent, DayCounter
from fedge.agent.dataset import Dataset
from fedge.agent.eligibility import Decision
from fedge.agent.state import AgentState, load_state, save_state
from fedge.models.runtime import load_runtime
from fedge.protocol import (
    GateSettings,
    GlobalModelHeader,
    MemoryBroker,
    MemoryLink,
    RoundAnnouncement,
    Status,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    encode,
)
from fedge.protocol.status import decode_status
from helpers import DIGITS_MODEL

pytestmark = pytest.mark.link
FLEET = "unit"
T = Topics(FLEET)


def data(n: int = 40, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(rng.random((n, 64), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32))


def server(broker: MemoryBroker) -> MemoryLink:
    link = MemoryLink(broker, "server")
    link.connect()
    link.subscribe(T.updates)
    link.subscribe(T.statuses)
    return link


def publish_global(link: MemoryLink, version: int, weights: dict[str, np.ndarray]) -> None:
    link.publish(
        T.global_model,
        encode(GlobalModelHeader(fleet=FLEET, model_version=version, round_id=version), weights),
        retain=True,
    )


def announce(
    link: MemoryLink, round_id: int, version: int, selected: tuple[str, ...], deadline: float = 2e9
) -> None:
    ann = RoundAnnouncement(
        fleet=FLEET,
        round_id=round_id,
        model_version=version,
        deadline=deadline,
        selected=selected,
        config=TrainingConfig(
            epochs=2, batch_size=8, lr=0.1, codec="float32", gate=GateSettings(threshold=0)
        ),
    )
    link.publish(T.round, encode(ann), retain=True)


def make_agent(broker: MemoryBroker, device: str = "d1", state_file: Path | None = None) -> Agent:
    state = load_state(state_file) if state_file else None
    agent = Agent(
        device_id=device,
        fleet=FLEET,
        link=MemoryLink(broker, device, will=Agent.will(device, FLEET)),
        runtime=load_runtime(DIGITS_MODEL),
        data=data(),
        state=state,
        save_state=(lambda s: save_state(state_file, s)) if state_file else None,
        rng=np.random.default_rng(0),
    )
    agent.start()
    return agent


def drain(agent: Agent) -> None:
    while agent.step(0):
        pass


def updates(link: MemoryLink) -> list:
    out = []
    while (msg := link.get(0)) is not None:
        if "/status/" in msg.topic:
            continue
        d = decode(msg.payload)
        if isinstance(d.msg, UpdateHeader):
            out.append(d)
    return out


def test_selected_agent_trains_and_sends_a_delta() -> None:
    broker = MemoryBroker()
    srv = server(broker)
    agent = make_agent(broker)
    g = load_runtime(DIGITS_MODEL).get_weights()
    publish_global(srv, 0, g)
    announce(srv, 1, 0, ("d1",))
    drain(agent)
    [up] = updates(srv)
    # The newest 10 of the 40 examples are held out to evaluate (eval_min_samples).
    assert up.msg.device_id == "d1" and up.msg.round_id == 1 and up.msg.num_samples == 30
    assert up.msg.base_version == 0
    # The delta is what local training on the other 30 moved: replaying the same batches
    # reproduces it.
    ref = load_runtime(DIGITS_MODEL, prefer=("numpy",))
    from fedge.agent.trainer import train_local

    train = Dataset(data().x[:30], data().y[:30])
    train_local(ref, train, epochs=2, batch_size=8, lr=0.1, rng=np.random.default_rng(0))
    for k, w in ref.get_weights().items():
        np.testing.assert_allclose(g[k] + up.tensors[k], w, atol=1e-5)
    assert np.abs(up.tensors["dense0_kernel"]).max() > 1e-3


def test_agent_scores_the_global_model_on_examples_it_does_not_train_on() -> None:
    broker = MemoryBroker()
    srv = server(broker)
    agent = make_agent(broker)
    g = load_runtime(DIGITS_MODEL).get_weights()
    publish_global(srv, 0, g)
    announce(srv, 1, 0, ("d1",))
    drain(agent)
    [up] = updates(srv)
    ev = up.msg.evaluation
    assert ev is not None and ev.count == 10 and ev.mae is None
    held = Dataset(data().x[30:], data().y[30:])
    ref = load_runtime(DIGITS_MODEL, prefer=("numpy",))
    ref.set_weights(g)
    assert (ev.loss, ev.accuracy) == pytest.approx(ref.evaluate(held.x, held.y), abs=1e-5)
    # Not the trained weights: they score the held-out examples differently.
    ref.set_weights({k: g[k] + up.tensors[k] for k in g})
    assert abs(ref.evaluate(held.x, held.y)[0] - ev.loss) > 1e-3
    # Training never saw them: the update is the same with the held-out examples replaced.
    other = np.random.default_rng(9)
    shuffled = Dataset(
        np.concatenate([data().x[:30], other.random((10, 64), dtype=np.float32)]),
        np.concatenate([data().y[:30], other.integers(0, 10, 10).astype(np.int32)]),
    )
    broker2 = MemoryBroker()
    srv2 = server(broker2)
    agent2 = make_agent(broker2)
    agent2.data = agent2._round_data = shuffled
    publish_global(srv2, 0, g)
    announce(srv2, 1, 0, ("d1",))
    drain(agent2)
    [up2] = updates(srv2)
    for k in g:
        np.testing.assert_array_equal(up.tensors[k], up2.tensors[k])
    assert up2.msg.evaluation != ev


def test_unselected_agent_stays_quiet() -> None:
    broker = MemoryBroker()
    srv = server(broker)
    agent = make_agent(broker)
    publish_global(srv, 0, load_runtime(DIGITS_MODEL).get_weights())
    announce(srv, 1, 0, ("someone-else",))
    drain(agent)
    assert updates(srv) == []


def test_round_waits_for_the_global_model_it_names() -> None:
    broker = MemoryBroker()
    srv = server(broker)
    agent = make_agent(broker)
    g = load_runtime(DIGITS_MODEL).get_weights()
    announce(srv, 1, 0, ("d1",))  # announcement first, model later
    drain(agent)
    assert updates(srv) == [] and agent.pending is not None
    publish_global(srv, 0, g)
    drain(agent)
    assert len(updates(srv)) == 1


def test_expired_round_is_sat_out() -> None:
    broker = MemoryBroker()
    srv = server(broker)
    agent = make_agent(broker)
    publish_global(srv, 0, load_runtime(DIGITS_MODEL).get_weights())
    announce(srv, 1, 0, ("d1",), deadline=1.0)
    drain(agent)
    assert updates(srv) == []


def test_answered_round_is_not_trained_again_after_restart(tmp_path: Path) -> None:
    broker = MemoryBroker()
    srv = server(broker)
    state_file = tmp_path / "state.json"
    agent = make_agent(broker, state_file=state_file)
    publish_global(srv, 0, load_runtime(DIGITS_MODEL).get_weights())
    announce(srv, 1, 0, ("d1",))
    drain(agent)
    assert len(updates(srv)) == 1
    agent.link.close()
    assert load_state(state_file) == AgentState(last_round=1, round_seen=1, model_version=0)
    again = make_agent(broker, state_file=state_file)  # retained round 1 is delivered again
    drain(again)
    assert updates(srv) == []


def test_will_marks_a_vanished_device_offline() -> None:
    broker = MemoryBroker()
    srv = server(broker)
    agent = make_agent(broker)
    agent.link.kill()  # type: ignore[attr-defined]
    states = [decode_status(m.payload)[0] for m in iter(lambda: srv.get(0), None)]
    assert [s.state for s in states] == ["online", "offline"]


def test_applies_each_new_global_model_and_ignores_old_ones() -> None:
    broker = MemoryBroker()
    srv = server(broker)
    agent = make_agent(broker)
    g = load_runtime(DIGITS_MODEL).get_weights()
    publish_global(srv, 3, {k: v + 1 for k, v in g.items()})
    drain(agent)
    publish_global(srv, 2, g)
    drain(agent)
    assert agent.global_version == 3
    np.testing.assert_array_equal(agent.runtime.get_weights()["dense1_bias"], g["dense1_bias"] + 1)
    assert agent.stats.models_applied == 1


def statuses(link: MemoryLink) -> list[Status]:
    out = []
    while (msg := link.get(0)) is not None:
        if "/status/" in msg.topic:
            assert msg.payload.startswith(b"{")  # plain JSON, for mosquitto_sub
            out.append(decode_status(msg.payload)[0])
    return out


def test_status_says_what_the_device_did_in_plain_json() -> None:
    broker = MemoryBroker()
    srv = server(broker)
    agent = make_agent(broker)
    agent.readings = lambda: {"cpu_temp_c": 51.5, "battery_percent": float("nan")}
    publish_global(srv, 0, load_runtime(DIGITS_MODEL).get_weights())
    announce(srv, 1, 0, ("d1",))
    drain(agent)
    last = statuses(srv)[-1]
    assert last.state == "idle" and last.model_version == 0 and not last.wants_model
    assert last.last_round == 1 and last.outcome == "sent" and last.skip_reason is None
    assert last.train_loss is not None and last.train_loss > 0
    assert last.readings == {"cpu_temp_c": 51.5}  # an unreadable value is left out
    # everything sent before this status: the update at least, not the status itself
    assert agent.stats.bytes_sent < last.bytes_up_today < agent.link.bytes_up
    assert 0 < last.bytes_down_today <= agent.link.bytes_down
    assert last.agent_version and last.uptime_s is not None and last.uptime_s >= 0


def test_status_names_the_skip_reason_and_asks_for_a_missing_model() -> None:
    broker = MemoryBroker()
    srv = server(broker)
    agent = make_agent(broker)
    agent.eligibility = lambda n: Decision(train=False, upload=False, reason="too_hot")
    publish_global(srv, 0, load_runtime(DIGITS_MODEL).get_weights())
    announce(srv, 1, 0, ("d1",))
    drain(agent)
    last = statuses(srv)[-1]
    assert (last.outcome, last.skip_reason, last.last_round) == ("skipped", "too_hot", 1)
    announce(srv, 2, 1, ("d1",))  # names model v1, which never came
    drain(agent)
    last = statuses(srv)[-1]
    assert last.wants_model and last.model_version == 0


def test_a_round_costs_one_status_and_a_model_alone_is_still_said() -> None:
    broker = MemoryBroker()
    srv = server(broker)
    agent = make_agent(broker)
    assert [s.state for s in statuses(srv)] == ["online"]
    g = load_runtime(DIGITS_MODEL).get_weights()
    publish_global(srv, 0, g)
    announce(srv, 1, 0, ("d1",))  # right behind the model, as the aggregator sends them
    drain(agent)
    # Not "idle" for the model, "training", "idle" for the round: the round's status says all.
    [said] = statuses(srv)
    assert (said.state, said.model_version, said.last_round, said.outcome) == (
        "idle",
        0,
        1,
        "sent",
    )
    publish_global(srv, 1, g)
    announce(srv, 2, 1, ("d2",))  # a round for another device
    drain(agent)
    [said] = statuses(srv)
    assert (said.state, said.model_version, said.last_round) == ("idle", 1, 1)


def test_long_training_says_training() -> None:
    broker = MemoryBroker()
    srv = server(broker)
    agent = make_agent(broker)
    agent.training_note_after = 0.0  # every round is long
    publish_global(srv, 0, load_runtime(DIGITS_MODEL).get_weights())
    announce(srv, 1, 0, ("d1",))
    drain(agent)
    assert [s.state for s in statuses(srv)] == ["online", "training", "idle"]


def test_day_counter_restarts_at_local_midnight() -> None:
    counter = DayCounter()
    noon = time.mktime((2026, 12, 1, 12, 0, 0, 0, 0, -1))
    assert counter.today(noon, 100, 1000) == (100, 1000)  # the first day counts from the start
    assert counter.today(noon + 3600, 150, 1200) == (150, 1200)
    assert counter.today(noon + 13 * 3600, 170, 1300) == (0, 0)
    assert counter.today(noon + 14 * 3600, 200, 1400) == (30, 100)


def test_an_answered_round_is_one_state_write_and_an_unselected_one_is_remembered(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    srv = server(broker)
    state_file = tmp_path / "agent.json"
    agent = make_agent(broker, state_file=state_file)
    writes: list[int] = []
    agent._save_state = lambda s: (writes.append(s.round_seen), save_state(state_file, s))  # type: ignore[method-assign]
    publish_global(srv, 0, load_runtime(DIGITS_MODEL).get_weights())
    drain(agent)
    writes.clear()
    announce(srv, 1, 0, ("d1",))
    drain(agent)
    assert writes == [1]  # round_seen goes to disk with the answer, not before it
    assert load_state(state_file).last_round == 1
    announce(srv, 2, 0, ("someone-else",))
    drain(agent)
    assert writes == [1, 2] and load_state(state_file).round_seen == 2


def test_training_starts_from_the_global_model_set_once(tmp_path: Path) -> None:
    """The model applied is not set again for the round right after it; a round that names
    the model the device already trained on sets it back first."""
    broker = MemoryBroker()
    srv = server(broker)
    agent = make_agent(broker)
    g0 = load_runtime(DIGITS_MODEL).get_weights()
    publish_global(srv, 0, g0)
    announce(srv, 1, 0, ("d1",))
    drain(agent)
    calls: list[dict[str, np.ndarray]] = []
    real = agent.runtime.set_weights

    def spy(weights: dict[str, np.ndarray]) -> None:
        calls.append({k: np.array(v) for k, v in weights.items()})
        real(weights)

    agent.runtime.set_weights = spy  # type: ignore[method-assign]
    announce(srv, 2, 0, ("d1",))  # the same model again: the runtime holds round 1's weights
    drain(agent)
    assert len(calls) == 1 and all(np.array_equal(calls[0][k], g0[k]) for k in g0)
    g1 = {k: v + 0.01 for k, v in g0.items()}
    calls.clear()
    publish_global(srv, 1, g1)
    announce(srv, 3, 1, ("d1",))
    drain(agent)
    assert len(calls) == 1 and all(np.array_equal(calls[0][k], g1[k]) for k in g1)
    assert len(updates(srv)) == 3
