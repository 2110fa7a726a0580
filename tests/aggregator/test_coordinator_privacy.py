"""The round coordinator under differential privacy, over the in-memory link: the noised
mean, the clip announced and moved, the accounting by selection and the budget stop."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from fedge.aggregator.coordinator import describe_round
from fedge.aggregator.store import StoreError
from fedge.protocol import (
    MemoryBroker,
    RoundAnnouncement,
    SkipNotice,
    UpdateHeader,
    clip_l2,
    encode,
    encode_skip,
)
from test_coordinator import Clock, Device, T, close_stores, delta, make, pump  # noqa: F401

pytestmark = pytest.mark.link


# Central DP with the adaptive clip (toward the median norm), the bit count's noise fixed.
ADAPTIVE = {
    "mode": "central",
    "noise_multiplier": 1.0,
    "clip": 2.0,
    "target_quantile": 0.5,
    "count_stddev": 0.6,
}


def send(dev: Device, round_id: int, update: dict[str, np.ndarray], within: bool) -> None:
    header = UpdateHeader(
        device_id=dev.id,
        round_id=round_id,
        update_id=f"{dev.id}-{round_id}",
        base_version=round_id - 1,
        num_samples=1000,  # would dominate a sample-weighted mean; under DP each weighs 1
        within_clip=within,
    )
    dev.link.publish(T.update(dev.id), encode(header, update))


def gaussian_epsilon(z: float, rounds: int) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return float(acc.get_epsilon(1e-5))


def test_central_dp_adds_calibrated_noise_to_the_sum_over_the_selected(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    privacy = {"mode": "central", "noise_multiplier": 0.8, "clip": 1.0}
    agg = make(tmp_path, broker, clock, min_devices=3, rounds=1, privacy=privacy)
    agg.noise_rng = np.random.default_rng(5)
    a, b, c = Device(broker, "a"), Device(broker, "b"), Device(broker, "c")
    pump(agg)
    ann = a.last(RoundAnnouncement).msg  # type: ignore[union-attr]
    assert ann.config.privacy is not None
    assert ann.config.privacy.clip == 1.0 and ann.config.privacy.noise_multiplier == 0.0
    long = delta(3.0)  # norm 3 x 3 = 9: the aggregator clips it to 1 whatever the device did
    send(a, 1, long, within=False)
    send(b, 1, delta(0.1), within=True)
    held = SkipNotice(
        device_id="c", round_id=1, update_id="0c" * 8, reason="other", trained=True, num_samples=9
    )
    c.link.publish(T.update("c"), encode_skip(held))
    pump(agg)
    assert agg.done and agg.version == 1
    rng = np.random.default_rng(5)
    clipped, _ = clip_l2(long, 1.0)
    for name in ("w", "b"):  # the noise is drawn tensor by tensor, in the model's order
        noise = rng.normal(0.0, 0.8 * 1.0, clipped[name].shape)
        want = (clipped[name].astype(np.float64) + 0.1 + noise) / 3  # 3 selected
        np.testing.assert_allclose(agg.weights[name], want.astype(np.float32), rtol=1e-5)
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert line["weights"] == {"a": 1, "b": 1, "c": 1}  # uniform, not by sample count
    dp = line["privacy"]
    assert dp["sampling_rate"] == 1.0 and dp["rounds_accounted"] == 1
    assert dp["epsilon"] == pytest.approx(gaussian_epsilon(0.8, 1), rel=1e-9)
    assert f"epsilon {dp['epsilon']:.3f} (delta 1e-05, central DP)" in describe_round(line)


def test_the_budget_stops_training_before_a_round_would_exceed_it(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    budget = (gaussian_epsilon(2.0, 2) + gaussian_epsilon(2.0, 3)) / 2  # room for 2 rounds
    privacy = {"mode": "central", "noise_multiplier": 2.0, "epsilon_budget": budget}
    agg = make(tmp_path, broker, clock, min_devices=2, rounds=10, privacy=privacy)
    a, b = Device(broker, "a"), Device(broker, "b")
    pump(agg)
    for round_id in (1, 2):
        assert agg.current is not None and agg.current.round_id == round_id
        # a dropped out: it was selected, so the round counts all the same
        send(b, round_id, delta(0.1), within=True)
        clock.now += 11
        pump(agg)
    assert agg.done and agg.completed == 2 and agg.current is None
    assert agg.budget_stop is not None and "round 3 would take epsilon to" in agg.budget_stop
    lines = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [x["privacy"]["epsilon"] <= budget for x in lines] == [True, True]
    assert lines[-1]["privacy"]["epsilon"] == pytest.approx(gaussian_epsilon(2.0, 2))
    assert a.last(RoundAnnouncement).msg.round_id == 2  # type: ignore[union-attr]


def test_the_adaptive_clip_is_announced_with_the_next_round(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    privacy = ADAPTIVE
    agg = make(tmp_path, broker, clock, min_devices=3, rounds=2, privacy=privacy)
    agg.noise_rng = np.random.default_rng(1)  # the bit count's noise, fixed
    devs = [Device(broker, d) for d in "abc"]
    pump(agg)
    for d in devs:  # every norm within the clip: it is too large, it shrinks
        send(d, 1, delta(0.01), within=True)
    pump(agg)
    first = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[0])["privacy"]
    assert first["clip"] == 2.0 and first["next_clip"] < 2.0
    assert first["value_noise_multiplier"] == pytest.approx((1 - (2 * 0.6) ** -2) ** -0.5)
    ann = devs[0].last(RoundAnnouncement).msg  # type: ignore[union-attr]
    assert ann.round_id == 2 and ann.config.privacy.clip == first["next_clip"]


def test_local_dp_announces_the_noise_and_averages_uniformly(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    privacy = {"mode": "local", "noise_multiplier": 3.0, "clip": 0.5}
    agg = make(tmp_path, broker, clock, min_devices=4, devices_per_round=2, privacy=privacy)
    devs = {d: Device(broker, d) for d in "abcd"}
    pump(agg)
    ann = devs["a"].last(RoundAnnouncement).msg  # type: ignore[union-attr]
    assert ann.config.privacy.noise_multiplier == 3.0 and ann.config.privacy.clip == 0.5
    selected = ann.selected  # 2 x overselect 1.3 -> 3 of the 4, uniformly
    assert len(selected) == 3
    for i, d in enumerate(selected[:2]):
        send(devs[d], 1, delta(float(i)), within=True)
    pump(agg)  # the target of 2 answered: the round closes
    np.testing.assert_allclose(agg.weights["w"], 0.5)  # (0 + 1) / 2: noise is the devices'
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(3.0 / 2), 1)
    assert line["privacy"]["sampling_rate"] == 0.75
    assert line["privacy"]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5))


def test_epsilon_and_the_clip_survive_a_restart(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    privacy = ADAPTIVE
    agg = make(tmp_path, broker, clock, min_devices=1, privacy=privacy)
    agg.noise_rng = np.random.default_rng(1)
    a = Device(broker, "a")
    pump(agg)
    send(a, 1, delta(0.01), within=True)
    pump(agg)  # round 1 done (its clip moved), round 2 announced: two rounds spent
    assert agg.ledger.rounds == 2 and agg.clip != 2.0
    spent, clip = agg.ledger.epsilon(), agg.clip
    agg.store.close()
    agg.link.close()
    again = make(tmp_path, broker, clock, min_devices=1, privacy=privacy)
    assert again.ledger.rounds >= 2 and again.clip == clip
    assert again.ledger.epsilon() >= spent == pytest.approx(gaussian_epsilon(1.0, 2))
    again.store.close()
    again.link.close()
    local = {"mode": "local", "noise_multiplier": 1.0}
    with pytest.raises(StoreError, match=r"holds a central-DP privacy ledger.*--reset-state"):
        make(tmp_path, broker, clock, min_devices=1, privacy=local)


@pytest.mark.parametrize("mode", ["central", "local"])
def test_a_restored_backup_counts_the_epsilon_of_the_rounds_it_missed(
    tmp_path: Path, mode: str
) -> None:
    """The backup's ledger misses the rounds after it: they go in from rounds.jsonl (at the
    rate and with the devices they had), and the round open when the state was lost on the
    safe side, so epsilon is not below what was spent."""
    import shutil

    broker, clock = MemoryBroker(), Clock()
    privacy = {"mode": mode, "noise_multiplier": 1.0, "clip": 1.0}
    config = {"min_devices": 4, "devices_per_round": 2, "overselect": 1.0, "backup_every": 2}
    agg = make(tmp_path, broker, clock, privacy=privacy, **config)
    devs = {d: Device(broker, d) for d in "abcd"}
    pump(agg)
    for _ in range(3):  # backed up after round 2; round 4 announced
        rnd = agg.current
        assert rnd is not None
        for d in rnd.selected:
            send(devs[d], rnd.round_id, delta(0.01), within=True)
        pump(agg)
    assert agg.current is not None and agg.current.round_id == 4
    spent, selections = agg.ledger.epsilon(), agg.ledger.selections.copy()
    agg.store.db.close()
    db = tmp_path / "agg.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "agg.sqlite.bak", db)
    restored = make(tmp_path, broker, clock, privacy=privacy, **config)
    assert restored.ledger.rounds >= 4 and restored.ledger.epsilon() >= spent
    if mode == "central":  # the backup's 2 and round 3 at the recorded rate, round 4 at 1
        assert sorted(restored.ledger.central.values()) == [1, 1, 2]
        assert spent == pytest.approx(gaussian_epsilon_sampled(0.5, 1.0, 4))
    else:  # every device at least as often as it was selected (round 4's are not known)
        counted = restored.ledger
        assert counted.anyone == 1
        assert all(counted.selections[d] + counted.anyone >= n for d, n in selections.items())


def gaussian_epsilon_sampled(q: float, z: float, rounds: int) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc.compose(event, rounds)
    return float(acc.get_epsilon(1e-5))


def test_a_backup_restored_mid_round_counts_that_round_and_passes_over_its_id(
    tmp_path: Path,
) -> None:
    """Backups are taken between rounds: lost during the round after one, the state leaves
    rounds.jsonl ending where the backup does. That round was announced (counted) and
    answered: the restored aggregator passes over its id (a device that answered it would
    refuse it) and counts it on the safe side (local DP: as if every device was selected)."""
    from test_resilience import restore_backup

    broker, clock = MemoryBroker(), Clock()
    privacy = {"mode": "local", "noise_multiplier": 1.0, "clip": 1.0}
    config = {"min_devices": 2, "backup_every": 2, "privacy": privacy}
    agg = make(tmp_path, broker, clock, **config)
    devs = {d: Device(broker, d) for d in "ab"}
    pump(agg)
    for _ in range(2):  # backed up after round 2; round 3 announced
        rnd = agg.current
        assert rnd is not None
        for d in rnd.selected:
            send(devs[d], rnd.round_id, delta(0.01), within=True)
        pump(agg)
    assert agg.current is not None and agg.current.round_id == 3
    send(devs["a"], 3, delta(0.01), within=True)
    pump(agg)
    assert agg.current.answered == {"a"}
    spent = agg.ledger.epsilon()
    restore_backup(agg, tmp_path)
    restored = make(tmp_path, broker, clock, **config)
    assert restored.ledger.rounds == 3 and restored.ledger.epsilon() >= spent
    pump(restored)
    assert restored.current is not None and restored.current.round_id == 4


@pytest.mark.parametrize("mode", ["central", "local"])
def test_rounds_abandoned_at_restarts_are_recorded_and_a_restored_backup_passes_them(
    tmp_path: Path, mode: str
) -> None:
    """A restart under [secure] (or [shards]) abandons the open round and announces another.
    Each abandoned round gets its record in rounds.jsonl (who was selected, the rate), so a
    backup restored later numbers past every one of them (not one id only) and counts each
    as it was; the round open at the loss on the safe side."""
    from test_resilience import restore_backup

    broker, clock = MemoryBroker(), Clock()
    privacy = {"mode": mode, "noise_multiplier": 1.0, "clip": 1.0}
    config = {
        "min_devices": 4,
        "devices_per_round": 3,
        "overselect": 1.0,
        "privacy": privacy,
        "secure": {"clip": 1.0, "bits": 8},
    }
    agg = make(tmp_path, broker, clock, **config)
    agg.store.backup()  # stands in for the backup after the last round done
    for i in range(4):
        Device(broker, f"d{i}")
    pump(agg)
    assert agg.current is not None
    first = agg.current.selected
    for round_id in (2, 3):  # two restarts, each abandons the open round
        agg.store.db.close()
        agg = make(tmp_path, broker, clock, **config)
        pump(agg)
        assert agg.current is not None and agg.current.round_id == round_id
    spent, selections = agg.ledger.epsilon(), agg.ledger.selections.copy()
    records = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["status"]) for r in records] == [(1, "abandoned"), (2, "abandoned")]
    assert records[0]["missing"] == first and records[0]["privacy"]["sampling_rate"] == 0.75
    restore_backup(agg, tmp_path)
    restored = make(tmp_path, broker, clock, **config)
    assert restored.ledger.rounds >= 3 and restored.ledger.epsilon() >= spent
    if mode == "central":  # rounds 1 and 2 at their rate, round 3 at 1
        assert sorted(restored.ledger.central.values()) == [1, 2]
    else:  # every device at least as often as it was selected
        counted = restored.ledger
        assert counted.anyone == 1
        assert all(counted.selections[d] + counted.anyone >= n for d, n in selections.items())
    pump(restored)
    assert restored.current is not None and restored.current.round_id == 4
