"""The agent's upload pipeline: codec, error feedback, gate, skip notice, chunks, eligibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedge.agent.daemon import Agent
from fedge.agent.dataset import Dataset
from fedge.agent.eligibility import Decision
from fedge.agent.outbox import Outbox
from fedge.agent.residual import ResidualStore
from fedge.agent.state import AgentState, load_state, save_state
from fedge.models.runtime import load_runtime
from fedge.protocol import (
    GateSettings,
    GlobalModelHeader,
    MemoryBroker,
    MemoryLink,
    Message,
    PrivacySettings,
    Reassembler,
    RoundAnnouncement,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    decode_delta,
    decode_skip,
    encode,
    is_chunk,
    is_skip,
    l2_norm,
)
from helpers import DIGITS_MODEL

pytestmark = pytest.mark.link
FLEET = "pipe"
T = Topics(FLEET)


def data() -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(rng.random((48, 64), dtype=np.float32), rng.integers(0, 10, 48).astype(np.int32))


class Fleet:
    def __init__(self, tmp_path: Path, **agent_kw: object) -> None:
        self.tmp = tmp_path
        self.broker = MemoryBroker()
        self.server = MemoryLink(self.broker, "server")
        self.server.connect()
        self.server.subscribe(T.updates)
        self.g = load_runtime(DIGITS_MODEL).get_weights()
        self.agent_kw = agent_kw
        self.agent = self.make_agent()

    def make_agent(self) -> Agent:
        state_file = self.tmp / "state.json"
        outbox = self.agent_kw.get("outbox")
        pending = outbox.take() if isinstance(outbox, Outbox) else None  # as the service does
        agent = Agent(
            device_id="d1",
            fleet=FLEET,
            link=MemoryLink(self.broker, "d1"),
            runtime=load_runtime(DIGITS_MODEL),
            data=data(),
            state=load_state(state_file, answered=pending and pending.state),
            save_state=lambda s: save_state(state_file, s),
            rng=np.random.default_rng(0),
            residual_store=ResidualStore(self.tmp / "residual.npz"),
            **self.agent_kw,  # type: ignore[arg-type]
        )
        agent.start()
        return agent

    def round(self, round_id: int, **cfg: object) -> list[Message]:
        header = GlobalModelHeader(fleet=FLEET, model_version=round_id - 1, round_id=round_id - 1)
        self.server.publish(T.global_model, encode(header, self.g), retain=True)
        gate = {k.removeprefix("gate_"): cfg.pop(k) for k in list(cfg) if k.startswith("gate_")}
        base = {"epochs": 1, "batch_size": 8, "lr": 0.1, "codec": "float32", "topk_min_entries": 0}
        config = TrainingConfig(
            **(base | cfg),  # type: ignore[arg-type]
            gate=GateSettings(**({"threshold": 0.0} | gate)),  # type: ignore[arg-type]
        )
        ann = RoundAnnouncement(
            fleet=FLEET,
            round_id=round_id,
            model_version=round_id - 1,
            deadline=2e9,
            selected=("d1",),
            config=config,
        )
        self.server.publish(T.round, encode(ann), retain=True)
        while self.agent.step(0):
            pass
        out = []
        while (m := self.server.get(0)) is not None:
            if m.topic == T.update("d1"):
                out.append(m)
        return out


def test_lossy_codec_keeps_what_it_did_not_send(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    [msg] = f.round(1, codec="topk:0.05+int8")
    d = decode(msg.payload)
    assert isinstance(d.msg, UpdateHeader) and d.msg.codec == "topk:0.05+int8"
    shapes = {k: list(v.shape) for k, v in f.g.items()}
    sent = decode_delta(d.tensors, {"codec": d.msg.codec, "shapes": shapes})
    # sent + residual == the full delta the device trained (error feedback loses nothing)
    full = {k: f.agent.runtime.get_weights()[k] - f.g[k] for k in f.g}
    for k in f.g:
        np.testing.assert_allclose(sent[k] + f.agent.residual[k], full[k], atol=1e-6)  # type: ignore[index]
    kept = sum(int(np.count_nonzero(v)) for v in sent.values())
    assert kept == int(np.ceil(0.05 * sum(v.size for v in f.g.values())))
    assert len(msg.payload) < 0.2 * sum(v.nbytes for v in f.g.values())


def test_residual_survives_a_restart(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    f.round(1, codec="topk:0.02")
    before = f.agent.residual
    assert before is not None and (tmp_path / "residual.npz").exists()
    f.agent.link.close()
    f.agent = f.make_agent()  # a new process: state and residual come from disk
    assert f.agent.residual is not None
    for k, v in before.items():
        np.testing.assert_array_equal(f.agent.residual[k], v)
    [msg] = f.round(2, codec="float32")  # a lossless round sends the residual too
    d = decode(msg.payload)
    assert f.agent.residual is None and not (tmp_path / "residual.npz").exists()
    local = f.agent.runtime.get_weights()
    for k in f.g:  # what was sent = this round's delta + the residual carried over
        np.testing.assert_allclose(d.tensors[k], local[k] - f.g[k] + before[k], atol=1e-6)


def test_gate_sends_a_skip_notice_of_at_most_64_bytes(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    [msg] = f.round(1, gate_threshold=5.0, gate_max_skips=3)  # any update is "small"
    assert is_skip(msg.payload) and len(msg.payload) <= 64
    notice = decode_skip(msg.payload, "d1")
    # 10 of its 48 examples held out to evaluate the global model, which the notice carries
    assert notice.reason == "small_update" and notice.trained and notice.num_samples == 38
    assert notice.evaluation is not None and notice.evaluation.count == 10
    assert f.agent.residual is not None  # the whole update is held for later
    assert f.agent.state.consecutive_skips == 1 and f.agent.stats.skipped["small_update"] == 1


def test_staleness_bound_forces_an_upload_with_everything_held(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    kinds, reasons = [], []
    for r in range(1, 5):
        [msg] = f.round(r, gate_threshold=5.0, gate_max_skips=2)
        kinds.append("skip" if is_skip(msg.payload) else "update")
        reasons.append(f.agent.last_gate.reason)  # type: ignore[union-attr]
    assert kinds == ["skip", "skip", "update", "skip"]
    assert reasons == ["small_update", "small_update", "stale", "small_update"]


def test_large_update_goes_in_chunks_and_reassembles(tmp_path: Path) -> None:
    f = Fleet(tmp_path, max_payload=4096)
    msgs = f.round(1)
    assert len(msgs) > 4 and all(is_chunk(m.payload) and len(m.payload) <= 4096 for m in msgs)
    r = Reassembler(clock=lambda: 0.0)
    whole = [r.add(m.payload) for m in msgs[::-1]]  # any order
    payload = next(p for p in whole if p is not None)
    assert isinstance(decode(payload).msg, UpdateHeader)


def test_ineligible_device_says_why_it_sat_out(tmp_path: Path) -> None:
    f = Fleet(tmp_path, eligibility=lambda nbytes: Decision(False, False, "too_hot"))
    [msg] = f.round(1)
    notice = decode_skip(msg.payload, "d1")
    assert notice.reason == "too_hot" and not notice.trained and notice.num_samples == 0
    assert f.agent.stats.rounds_trained == 0


def test_budget_exhausted_trains_but_holds_the_update(tmp_path: Path) -> None:
    f = Fleet(tmp_path, eligibility=lambda nbytes: Decision(True, False, "budget_exhausted"))
    [msg] = f.round(1)
    notice = decode_skip(msg.payload, "d1")
    assert notice.reason == "budget_exhausted" and notice.trained
    assert f.agent.residual is not None


def test_small_model_keeps_at_least_the_minimum_entries(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    [msg] = f.round(1, codec="topk:0.02+int8", topk_min_entries=512)
    d = decode(msg.payload)
    assert d.msg.codec == "topk:0.1065+int8"  # type: ignore[union-attr]  # 512 / 4,810, rounded up
    shapes = {k: list(v.shape) for k, v in f.g.items()}
    sent = decode_delta(d.tensors, {"codec": d.msg.codec, "shapes": shapes})  # type: ignore[union-attr]
    assert sum(int(np.count_nonzero(v)) for v in sent.values()) >= 512


def test_diverged_training_is_sat_out_not_a_crash(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    f.agent.data = Dataset(np.full((8, 64), np.nan, np.float32), np.zeros(8, np.int32))
    [msg] = f.round(1)
    notice = decode_skip(msg.payload, "d1")
    assert notice.reason == "other" and not notice.trained
    assert f.agent.stats.failed == 1 and f.agent.residual is None
    assert f.agent.state.last_round == 1  # the retained round does not bring it back


def test_budget_check_uses_the_real_upload_size(tmp_path: Path) -> None:
    """A budget below the dense model but above a top-k update still lets updates through."""
    from fedge.agent.eligibility import ByteBudget, EligibilityConfig, Readings, decide

    budget = ByteBudget()
    cfg = EligibilityConfig(daily_upload_bytes=15_000)  # the float32 model is 19,240 bytes
    f = Fleet(
        tmp_path,
        budget=budget,
        eligibility=lambda n: decide(cfg, Readings(True, None, 40.0, 0.1), budget, n),
    )
    [msg] = f.round(1, codec="topk:0.02+int8", topk_min_entries=0)
    assert isinstance(decode(msg.payload).msg, UpdateHeader)
    assert 0 < budget.used() < 2_000


def test_a_crash_between_publish_and_state_save_sends_nothing_twice(tmp_path: Path) -> None:
    f = Fleet(tmp_path, outbox=Outbox(tmp_path / "outbox.npz"))

    def power_cut(state: object) -> None:  # right after the publish, before the state save
        raise KeyboardInterrupt

    f.agent._save = power_cut  # type: ignore[method-assign]
    g = f.g
    header = GlobalModelHeader(fleet=FLEET, model_version=0, round_id=0)
    f.server.publish(T.global_model, encode(header, g), retain=True)
    ann = RoundAnnouncement(
        fleet=FLEET,
        round_id=1,
        model_version=0,
        deadline=2e9,
        selected=("d1",),
        config=TrainingConfig(
            epochs=1, batch_size=8, lr=0.1, codec="topk:0.05", gate=GateSettings(threshold=0)
        ),
    )
    f.server.publish(T.round, encode(ann), retain=True)
    with pytest.raises(KeyboardInterrupt):
        while f.agent.step(0):
            pass
    first = [m for m in iter(lambda: f.server.get(0), None) if m.topic == T.update("d1")]
    assert len(first) == 1 and (tmp_path / "outbox.npz").exists()
    sent = decode(first[0].payload)
    shapes = {k: list(v.shape) for k, v in g.items()}
    sent_delta = decode_delta(sent.tensors, {"codec": sent.msg.codec, "shapes": shapes})  # type: ignore[union-attr]
    full = {k: f.agent.runtime.get_weights()[k] - g[k] for k in g}
    f.agent.link.close()
    f.agent = f.make_agent()  # restart: residual.npz still holds the pre-round residual
    again = [m for m in iter(lambda: f.server.get(0), None) if m.topic == T.update("d1")]
    assert [decode(m.payload).msg.update_id for m in again] == [sent.msg.update_id]  # type: ignore[union-attr]
    assert not (tmp_path / "outbox.npz").exists()
    assert load_state(tmp_path / "state.json").last_round == 1
    # What is kept is the full delta minus what was sent: nothing will be sent twice.
    for k in g:
        np.testing.assert_allclose(f.agent.residual[k] + sent_delta[k], full[k], atol=1e-6)  # type: ignore[index]
    while f.agent.step(0):  # the retained round 1 again: already answered
        pass
    assert [m for m in iter(lambda: f.server.get(0), None) if m.topic == T.update("d1")] == []


def test_a_residual_file_lost_to_a_power_cut_comes_back_from_the_outbox(tmp_path: Path) -> None:
    """While the outbox holds the residual the file is not written: after a restart the
    file is older than the residual, which comes back from the outbox."""
    f = Fleet(tmp_path, outbox=Outbox(tmp_path / "outbox.npz"))
    f.round(1, codec="topk:0.05")
    before = {k: v.copy() for k, v in f.agent.residual.items()}  # type: ignore[union-attr]
    f.round(2, codec="topk:0.05")
    after = {k: v.copy() for k, v in f.agent.residual.items()}  # type: ignore[union-attr]
    assert any(not np.array_equal(before[k], after[k]) for k in after)
    ResidualStore(tmp_path / "residual.npz").save(before)  # an older residual on disk
    f.agent.link.close()
    f.agent = f.make_agent()
    assert load_state(tmp_path / "state.json").last_round == 2
    for k, v in after.items():  # round 2's residual, not round 1's (which round 2 sent)
        np.testing.assert_array_equal(f.agent.residual[k], v)  # type: ignore[index]
    assert not (tmp_path / "outbox.npz").exists()  # the file holds it again, flushed
    on_disk = ResidualStore(tmp_path / "residual.npz").load(f.g)
    assert on_disk is not None and all(np.array_equal(on_disk[k], after[k]) for k in after)


def test_answers_commit_with_the_outbox_and_the_state_file_catches_up_when_idle(
    tmp_path: Path,
) -> None:
    """With an outbox, an answered round makes one durable write (the outbox, before the
    publish); the state file is written when the device is next idle. A power cut before
    that, after any number of rounds, loses nothing: the state comes back from the outbox."""
    from fedge.agent.eligibility import ByteBudget, EligibilityConfig, Readings, decide

    budget = ByteBudget()
    cfg = EligibilityConfig(daily_upload_bytes=10**9)
    f = Fleet(
        tmp_path,
        outbox=Outbox(tmp_path / "outbox"),
        budget=budget,
        eligibility=lambda n: decide(cfg, Readings(True, None, 40.0, 0.1), budget, n),
    )
    writes: list[int] = []
    f.agent._save_state = lambda s: writes.append(s.last_round)  # type: ignore[method-assign]
    header = GlobalModelHeader(fleet=FLEET, model_version=0, round_id=0)
    f.server.publish(T.global_model, encode(header, f.g), retain=True)
    assert f.agent.step(0) and not f.agent.step(0)  # the model; then idle: saved
    assert writes == [0]
    answers = {}
    for round_id, threshold in ((1, 0.0), (2, 1000.0), (3, 1000.0)):  # sent, held, held
        cfg_round = TrainingConfig(
            epochs=1,
            batch_size=8,
            lr=0.1,
            codec="topk:0.05",
            gate=GateSettings(threshold=threshold, max_skips=5),
        )
        ann = RoundAnnouncement(
            fleet=FLEET,
            round_id=round_id,
            model_version=0,
            deadline=2e9,
            selected=("d1",),
            config=cfg_round,
        )
        f.server.publish(T.round, encode(ann), retain=True)
        assert f.agent.step(0)  # the round: trained, answered
        assert writes == [0]  # no state file on the round's path
        [answers[round_id]] = [
            m for m in iter(lambda: f.server.get(0), None) if m.topic == T.update("d1")
        ]
    assert f.agent.state.consecutive_skips == 2 and f.agent.state.round_seen == 3
    used = budget.used()
    assert used > 0
    residual = {k: v.copy() for k, v in f.agent.residual.items()}  # type: ignore[union-attr]
    # The power goes before the device is idle again: the state file says round 0.
    assert load_state(tmp_path / "state.json").last_round == 0
    f.agent.link.close()
    f.agent = f.make_agent()
    assert f.agent.state.last_round == 3 and f.agent.state.round_seen == 3
    assert f.agent.state.consecutive_skips == 2
    assert ByteBudget.from_dict(f.agent.state.upload_budget).used() == used  # type: ignore[arg-type]
    for k, v in residual.items():  # round 3's, held back: not round 1's or 2's
        np.testing.assert_array_equal(f.agent.residual[k], v)  # type: ignore[index]
    again = [m for m in iter(lambda: f.server.get(0), None) if m.topic == T.update("d1")]
    assert [m.payload for m in again] == [answers[3].payload]  # the last answer, once more
    assert load_state(tmp_path / "state.json") == f.agent.state  # on disk before the outbox went
    assert not any(s.exists() for s in Outbox(tmp_path / "outbox").slots)
    while f.agent.step(0):  # the retained round 3 again: answered already
        pass
    assert [m for m in iter(lambda: f.server.get(0), None) if m.topic == T.update("d1")] == []
    assert len(f.round(4)) == 1  # answered, then idle: the state file catches up
    assert load_state(tmp_path / "state.json").last_round == 4
    assert Outbox(tmp_path / "outbox").take() is not None


def test_a_crash_after_holding_an_update_back_does_not_hold_it_twice(tmp_path: Path) -> None:
    f = Fleet(tmp_path, outbox=Outbox(tmp_path / "outbox.npz"))
    save = f.agent._save

    def power_cut_at_state_save(state: AgentState) -> None:  # residual saved, state not
        if state.last_round >= 1:
            raise KeyboardInterrupt
        save(state)

    f.agent._save = power_cut_at_state_save  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        f.round(1, gate_threshold=1000, gate_max_skips=5)  # every update is "small": held back
    held = {k: v.copy() for k, v in f.agent.residual.items()}  # type: ignore[union-attr]
    f.agent.link.close()
    f.agent = f.make_agent()
    assert load_state(tmp_path / "state.json").last_round == 1
    assert load_state(tmp_path / "state.json").consecutive_skips == 1
    for k, v in held.items():  # not trained again: the residual holds round 1 once
        np.testing.assert_array_equal(f.agent.residual[k], v)  # type: ignore[index]
    resent = [m for m in iter(lambda: f.server.get(0), None) if m.topic == T.update("d1")]
    assert len(resent) == 2 and resent[0].payload == resent[1].payload  # the same notice again


def test_the_daemon_uploads_the_clipped_update_with_its_clip_bit(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    [msg] = f.round(1, privacy=PrivacySettings(clip=0.01))
    d = decode(msg.payload)
    assert isinstance(d.msg, UpdateHeader)
    shapes = {k: list(v.shape) for k, v in f.g.items()}
    sent = decode_delta(d.tensors, {"codec": d.msg.codec, "shapes": shapes})
    assert l2_norm(sent) <= 0.01 and d.msg.within_clip is False  # a round of SGD is longer
    assert d.msg.train_loss is not None  # central DP: the aggregator is trusted with it


def test_under_local_dp_only_the_noised_update_leaves_the_device(tmp_path: Path) -> None:
    f = Fleet(tmp_path, noise_rng=np.random.default_rng(4))
    [msg] = f.round(1, privacy=PrivacySettings(clip=0.01, noise_multiplier=2.0), eval_fraction=0.2)
    d = decode(msg.payload)
    assert isinstance(d.msg, UpdateHeader)
    assert d.msg.train_loss is None and d.msg.evaluation is None and d.msg.within_clip is None
    shapes = {k: list(v.shape) for k, v in f.g.items()}
    sent = decode_delta(d.tensors, {"codec": d.msg.codec, "shapes": shapes})
    entries = sum(v.size for v in sent.values())
    # the noise (std 0.02 per entry) dwarfs the clipped update (norm 0.01)
    assert l2_norm(sent) == pytest.approx(0.02 * np.sqrt(entries), rel=0.05)
