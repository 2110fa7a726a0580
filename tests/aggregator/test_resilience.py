"""The aggregator through crashes, lost models and bad state: nothing lost, nothing twice."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fedge.aggregator.coordinator import Aggregator
from fedge.aggregator.store import Store, StoreCorrupt, StoreError
from fedge.protocol import GlobalModelHeader, MemoryBroker, RoundAnnouncement, Status, encode
from test_coordinator import (  # noqa: F401
    FLEET,
    STORES,
    Clock,
    Device,
    T,
    close_stores,
    delta,
    make,
    pump,
    weights,
)

pytestmark = pytest.mark.link


def restart(
    agg: Aggregator, tmp_path: Path, broker: MemoryBroker, clock: Clock, **cfg: object
) -> Aggregator:
    """Kill ``agg`` (no clean shutdown: its store is simply dropped) and start another."""
    agg.store.db.close()
    return make(tmp_path, broker, clock, **({"min_devices": 3, "rounds": 1} | cfg))


def test_a_killed_aggregator_resumes_its_round_with_what_it_accepted(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=3, rounds=1)
    a, b, c = Device(broker, "a"), Device(broker, "b"), Device(broker, "c")
    pump(agg)
    a.send(1, delta(1.0), 10)
    b.send(1, delta(2.0), 30)
    pump(agg)
    assert agg.current is not None and len(agg.current.uploaded) == 2
    agg = restart(agg, tmp_path, broker, clock)
    assert agg.current is not None and agg.current.round_id == 1
    assert sorted(agg.current.uploaded) == ["a", "b"]
    b.send(1, delta(2.0), 30, update_id="b-1")  # the same update again (a lost PUBACK)
    c.send(1, delta(4.0), 60)
    pump(agg)
    assert agg.done and agg.version == 1 and agg.rejected["duplicate"] == 1
    # Exactly the three accepted updates, each once: (10*1 + 30*2 + 60*4) / 100.
    np.testing.assert_allclose(agg.weights["w"], 3.1, rtol=1e-6)
    ann = c.last(RoundAnnouncement)
    assert ann is not None and ann.msg.round_id == 1  # type: ignore[union-attr]


def test_update_ids_are_per_device(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=2, rounds=1)
    a, b = Device(broker, "a"), Device(broker, "b")
    pump(agg)
    a.send(1, delta(1.0), 10, update_id="same")
    b.send(1, delta(3.0), 10, update_id="same")
    pump(agg)
    assert agg.done and not agg.rejected
    np.testing.assert_allclose(agg.weights["w"], 2.0)


def test_what_a_device_that_was_not_selected_sends_is_not_stored(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    Device(broker, "a")
    pump(agg)
    stranger = Device(broker, "zz")  # online after the selection
    for i in range(200):
        stranger.send(1, delta(1.0), 5, update_id=f"u{i}")
    pump(agg)
    assert agg.rejected["not_selected"] == 200
    assert agg.store.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 0


def test_a_device_without_the_current_model_gets_it_again(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1, republish_interval=5.0)
    a = Device(broker, "a")
    pump(agg)
    a.send(1, delta(1.0), 10)
    pump(agg)
    assert agg.version == 1
    a.link.publish(T.global_model, b"", retain=True)  # the retained copy is lost
    late = Device(broker, "late")
    assert late.last(GlobalModelHeader) is None
    behind = Status(device_id="late", state="idle", timestamp=1.0, model_version=-1)
    late.link.publish(T.status("late"), encode(behind), retain=True)
    pump(agg)
    got = late.last(GlobalModelHeader)
    assert got is not None and got.msg.model_version == 1  # type: ignore[union-attr]
    late.link.publish(T.status("late"), encode(behind), retain=True)  # asks again at once
    pump(agg)
    assert late.last(GlobalModelHeader) is None and agg.republished == 1  # rate-limited
    clock.now += 6
    late.link.publish(T.status("late"), encode(behind), retain=True)
    pump(agg)
    assert late.last(GlobalModelHeader) is not None and agg.republished == 2


def test_a_newer_model_is_sent_again_right_after_an_older_one_was(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1, republish_interval=5.0)
    a = Device(broker, "a")
    for version in (1, 2):
        pump(agg)
        a.send(version, delta(1.0), 10, base=version - 1)
        pump(agg)
        assert agg.version == version
        a.last(GlobalModelHeader)  # read the round's own publish
        behind = Status(device_id="a", state="idle", timestamp=1.0, model_version=version - 1)
        a.link.publish(T.status("a"), encode(behind), retain=True)
        pump(agg)
        got = a.last(GlobalModelHeader)
        assert got is not None and got.msg.model_version == version  # type: ignore[union-attr]
    assert agg.republished == 2  # at the same clock: v1's republish did not hold back v2's


def test_a_failed_round_sends_the_global_again(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=2, quorum=1.0)
    a, _b = Device(broker, "a"), Device(broker, "b")
    pump(agg)
    a.last(GlobalModelHeader)
    clock.now += 11
    pump(agg)
    assert agg.republished == 1 and a.last(GlobalModelHeader) is not None


def test_a_round_that_cannot_start_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=3, wait_log_interval=60.0)
    Device(broker, "a")
    with caplog.at_level(logging.WARNING, logger="fedge.aggregator"):
        pump(agg)  # not at once: statuses are still coming in after a start
        clock.now += 61
        pump(agg)
        pump(agg)  # not again within the interval
        clock.now += 61
        pump(agg)
    waits = [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()]
    assert waits == ["round 1 cannot start: 1 of the 3 device(s) it needs are online (a)"] * 2


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(b"\0" * 8192), "not a readable SQLite database"),
        (lambda p: p.write_bytes(p.read_bytes()[:2048]), "SQLite"),
    ],
    ids=["empty", "zeroed", "truncated"],
)
def test_a_damaged_state_file_is_refused_with_what_to_do(
    tmp_path: Path,
    damage,
    says: str,  # type: ignore[no-untyped-def]
) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    Device(broker, "a").send(1, delta(1.0), 10)
    pump(agg)
    agg.store.backup()
    agg.store.close()
    STORES.remove(agg.store)
    db = tmp_path / "agg.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    damage(db)
    with pytest.raises(StoreCorrupt) as err:
        Store(db)
    message = str(err.value)
    assert says in message and f"restore the backup {db}.bak (move agg.sqlite-wal" in message
    assert "--reset-state" in message and "\n" not in message


def test_the_backup_is_a_working_copy_and_rotates(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    a = Device(broker, "a")
    pump(agg)
    a.send(1, delta(1.0), 10)
    pump(agg)
    first = agg.store.backup()
    a.send(2, delta(1.0), 10, base=1)
    pump(agg)
    agg.store.backup()
    older = Path(f"{first}.1")
    assert older.is_file()
    copy = Store(first)
    STORES.append(copy)
    version, _, restored = copy.latest_model()  # type: ignore[misc]
    assert version == 2 and np.allclose(restored["w"], agg.weights["w"])
    assert sqlite3.connect(older).execute("SELECT MAX(version) FROM models").fetchone()[0] == 1


def test_a_state_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(StoreError, match=r"state_dir .* is a file, not a folder"):
        Store(tmp_path / "state" / "aggregator.sqlite")


def test_reset_state_numbers_on_from_the_round_log(tmp_path: Path) -> None:
    from fedge.aggregator.service import build_aggregator, history, reset_state
    from fedge.protocol import MemoryLink

    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    a = Device(broker, "a")
    pump(agg)
    a.send(1, delta(1.0), 10)
    pump(agg)
    a.send(2, delta(1.0), 10, base=1)
    pump(agg)
    assert agg.version == 2
    agg.store.close()
    STORES.remove(agg.store)
    cfg = agg.cfg.model_copy(update={"log": tmp_path / "rounds.jsonl"})
    (tmp_path / "aggregator.sqlite").write_bytes(b"")  # what a full disk left behind
    with open(cfg.log_path, "a") as fh:
        fh.write('{"round": 3, "model_ver')  # the crash cut the last line short
    floor = reset_state(cfg, now=0.0)
    assert floor == (2, 2)
    assert (tmp_path / "aggregator.sqlite.reset-19700101T000000").is_file()
    fresh = build_aggregator(cfg, link=MemoryLink(broker, "agg-fresh"), floor=floor)
    STORES.append(fresh.store)
    # Round 3 (its record cut short) may have sent v3: both are passed over, and recorded
    # on a line of their own, so that a later start numbers past them too.
    assert fresh.version == 4 and fresh.next_round_id == 4
    assert history(cfg) == (3, 4)
    fresh.store.close()
    STORES.remove(fresh.store)
    again = build_aggregator(cfg, link=MemoryLink(broker, "agg-again"), floor=reset_state(cfg))
    STORES.append(again.store)
    assert again.version == 6 and again.next_round_id == 5


@pytest.mark.parametrize("damage", ["empty", "garbage", "state_dir_is_a_file"])
def test_fedge_aggregator_on_damaged_state_is_one_line_and_exit_78(
    tmp_path: Path, damage: str
) -> None:
    import subprocess
    import sys

    from helpers import DIGITS_MODEL

    state = tmp_path / "state"
    if damage == "state_dir_is_a_file":
        state.write_text("")
    else:
        state.mkdir()
        (state / "aggregator.sqlite").write_bytes(b"" if damage == "empty" else b"junk" * 999)
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text(f'model = "{DIGITS_MODEL}"\nstate_dir = "{state}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "aggregator", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("INFO: ")]
    assert len(ours) == 1 and ours[0].startswith("fedge: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 78
    if damage == "state_dir_is_a_file":
        assert f"state_dir: Value error, {state} is a file, not a folder" in ours[0]
    else:
        assert "--reset-state" in ours[0]


def test_of_two_open_rounds_the_newest_resumes_and_the_older_is_abandoned(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    Device(broker, "a")
    pump(agg)
    assert agg.current is not None and agg.current.round_id == 1
    agg.store.open_round(2, 0, clock.now, clock.now + 10, ["a"])  # what a bug could leave
    agg = restart(agg, tmp_path, broker, clock)
    assert agg.current is not None and agg.current.round_id == 2
    status = dict(agg.store.db.execute("SELECT round_id, status FROM rounds").fetchall())
    assert status == {1: "abandoned", 2: "open"}


def test_an_average_that_is_not_finite_fails_the_round_and_changes_nothing(
    tmp_path: Path,
) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=2, rounds=2)
    a, b = Device(broker, "a"), Device(broker, "b")
    pump(agg)
    a.send(1, delta(3e38), 10)  # finite, and so is the model it makes...
    b.send(1, delta(3e38), 10)
    pump(agg)
    assert agg.version == 1
    a.send(2, delta(3e38), 10, base=1)  # ...but not the next one (6e38 is past float32)
    b.send(2, delta(3e38), 10, base=1)
    pump(agg)
    assert agg.version == 1 and np.all(agg.weights["w"] == np.float32(3e38))
    lines = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert '"status": "failed"' in lines[1] and "not finite" in lines[1]
    assert agg.store.latest_model()[0] == 1  # type: ignore[index]


def test_the_state_does_not_grow_with_every_round(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    a = Device(broker, "a")
    pump(agg)
    for r in range(1, 7):
        a.send(r, delta(0.1), 10, base=r - 1)
        pump(agg)
    db = agg.store.db
    assert agg.version == 6
    assert [v for (v,) in db.execute("SELECT version FROM models ORDER BY version")] == [4, 5, 6]
    assert db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 0


def test_a_missing_state_with_history_is_refused_not_restarted_at_v0(tmp_path: Path) -> None:
    from fedge.aggregator.service import build_aggregator
    from fedge.protocol import MemoryLink

    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    a = Device(broker, "a")
    pump(agg)
    a.send(1, delta(1.0), 10)
    pump(agg)
    cfg = agg.cfg.model_copy(update={"log": tmp_path / "rounds.jsonl"})
    agg.store.close()
    STORES.remove(agg.store)
    with pytest.raises(StoreCorrupt, match=r"is missing, but rounds.jsonl .* round 1 and model v1"):
        build_aggregator(cfg, link=MemoryLink(broker, "agg-2"))


def test_a_state_for_another_model_is_refused(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    agg.store.close()
    STORES.remove(agg.store)
    store = Store(tmp_path / "agg.sqlite")
    STORES.append(store)
    with pytest.raises(StoreError, match=r"does not fit the configured model \(tensor b"):
        Aggregator(
            agg.cfg,
            link=agg.link,
            store=store,
            initial_weights={"w": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)},
            clock=clock,
        )


def test_chunks_of_an_update_survive_a_crash_before_it_is_whole(tmp_path: Path) -> None:
    from fedge.protocol import UpdateHeader, split

    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1, rounds=1)
    a = Device(broker, "a")
    pump(agg)
    header = UpdateHeader(device_id="a", round_id=1, update_id="big", base_version=0, num_samples=7)
    parts = split(encode(header, delta(2.0)), 64, b"12345678")
    assert len(parts) > 2
    for part in parts[:-1]:
        a.link.publish(T.update("a"), part)
    pump(agg)  # received, kept, acknowledged: the broker holds them no more
    agg = restart(agg, tmp_path, broker, clock)
    a.link.publish(T.update("a"), parts[-1])
    pump(agg)
    assert agg.done and agg.version == 1
    np.testing.assert_allclose(agg.weights["w"], 2.0)
    assert agg.store.chunks() == []


def test_rounds_stop_waiting_for_a_device_that_keeps_missing_them(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=3, quorum=0.5)
    a, b, hung = Device(broker, "a"), Device(broker, "b"), Device(broker, "hung")
    pump(agg)
    waits = []
    for r in range(1, 6):
        rnd = agg.current
        assert rnd is not None and rnd.round_id == r
        started = clock.now
        a.send(r, delta(0.1), 10, base=agg.version)
        b.send(r, delta(0.1), 10, base=agg.version)
        pump(agg)
        if agg.current is rnd:  # still waiting for the hung device: its deadline passes
            clock.now += 11
            pump(agg)
        waits.append((sorted(rnd.selected), clock.now - started))
        clock.now += 1
    assert waits[0] == waits[1] == (["a", "b", "hung"], 11)  # one miss may be bad luck
    assert waits[2:] == [(["a", "b", "hung"], 0)] * 3  # two in a row: not waited for
    hung.send(6, delta(0.1), 10, base=agg.version)  # it comes back: it counts again
    a.send(6, delta(0.1), 10, base=agg.version)
    pump(agg)
    assert agg.current is not None and agg.current.round_id == 6  # now it waits for b
    b.send(6, delta(0.1), 10, base=agg.version)
    pump(agg)
    assert agg.misses_in_a_row("hung") == 0


def test_over_selection_closes_the_round_once_the_target_answered(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=4, devices_per_round=3, overselect=1.3)
    devices = [Device(broker, d) for d in "abcd"]
    pump(agg)
    rnd = agg.current
    assert rnd is not None and len(rnd.selected) == 4  # ceil(3 * 1.3)
    for d in devices[:3]:
        if d.id in rnd.selected:
            d.send(1, delta(0.1), 10)
    pump(agg)
    assert agg.version == 1 and agg.current is not rnd  # 3 answered: done without the 4th


def test_models_kept_by_an_older_aggregator_are_still_read(tmp_path: Path) -> None:
    """Tensors were kept as np.savez blobs before; a state file of then resumes as it was."""
    import io

    store = Store(tmp_path / "agg.sqlite")
    old = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(0.5) * np.ones(())}
    buf = io.BytesIO()
    np.savez(buf, **old)
    store.db.execute(
        "INSERT INTO models(version, round_id, created, weights) VALUES (1, 1, 0, ?)",
        (buf.getvalue(),),
    )
    new = {k: v + 1 for k, v in old.items()}
    store.save_model(2, 2, new)
    store.save_strategy_state(2, {"m": np.zeros((0, 4), np.float64)})
    version, _, got = store.latest_model()  # type: ignore[misc]
    assert version == 2 and all(np.array_equal(got[k], new[k]) for k in new)
    assert got["b"].shape == () and got["w"].dtype == np.float32
    [m] = store.strategy_state(2).values()
    assert m.shape == (0, 4) and m.dtype == np.float64
    store.db.execute("DELETE FROM models WHERE version=2")
    _, _, back = store.latest_model()  # type: ignore[misc]
    assert all(np.array_equal(back[k], old[k]) and back[k].shape == old[k].shape for k in old)
    store.close()


def restore_backup(agg: Aggregator, tmp_path: Path) -> None:
    """Kill ``agg`` and restore its backup as StoreCorrupt says: move the -wal and -shm files
    aside and copy the .bak over the state file."""
    import shutil

    agg.store.db.close()
    db = tmp_path / "agg.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "agg.sqlite.bak", db)


class RealFleet:
    """A real aggregator and real agents (numpy runtime) on one in-memory broker."""

    def __init__(self, tmp_path: Path, backup_every: int) -> None:
        self.tmp_path, self.backup_every = tmp_path, backup_every
        self.broker = MemoryBroker()

    def aggregator(self, rounds: int) -> Aggregator:
        from fedge.aggregator.config import AggregatorConfig
        from fedge.aggregator.strategies.config import StrategyConfig
        from fedge.models.runtime import load_runtime
        from fedge.protocol import MemoryLink, TrainingConfig
        from helpers import DIGITS_MODEL

        config = AggregatorConfig(
            fleet=FLEET,
            model=DIGITS_MODEL,
            state_dir=self.tmp_path,
            min_devices=2,
            rounds=rounds,
            backup_every=self.backup_every,
            training=TrainingConfig(batch_size=8, lr=0.1, codec="float32", eval_fraction=0),
            strategy=StrategyConfig(name="fedavg"),
        )
        store = Store(self.tmp_path / "agg.sqlite")
        STORES.append(store)
        agg = Aggregator(
            config,
            link=MemoryLink(self.broker, "aggregator"),
            store=store,
            initial_weights=load_runtime(DIGITS_MODEL).get_weights(),
        )
        agg.start()
        return agg

    def agent(self, device: str, seed: int):  # type: ignore[no-untyped-def]
        from fedge.agent.daemon import Agent
        from fedge.agent.dataset import Dataset
        from fedge.models.runtime import load_runtime
        from fedge.protocol import MemoryLink
        from helpers import DIGITS_MODEL

        rng = np.random.default_rng(seed)
        x, y = rng.random((40, 64), np.float32), rng.integers(0, 10, 40).astype(np.int32)
        a = Agent(
            device_id=device,
            fleet=FLEET,
            link=MemoryLink(self.broker, device),
            runtime=load_runtime(DIGITS_MODEL, prefer=("numpy",)),
            data=Dataset(x, y),
            rng=rng,
        )
        a.start()
        return a


def test_a_restored_backup_numbers_on_and_the_fleet_takes_its_model(tmp_path: Path) -> None:
    """The backup is rounds older than what the fleet has: real agents refuse the rounds and
    models they have seen, so the restored aggregator goes on above rounds.jsonl (passing
    over the round that was open when the state was lost, and the model version it may
    have made) and sends its model as a new version, which they take; no round id or model
    version is used twice."""
    from helpers import serve_rounds

    fleet = RealFleet(tmp_path, backup_every=2)
    agg = fleet.aggregator(rounds=3)
    agents = [fleet.agent("a", 1), fleet.agent("b", 2)]
    serve_rounds(agg, agents, 3)  # backed up after round 2 (v2); round 3 made v3
    assert agg.version == 3 and all(a.global_version == 3 for a in agents)
    restore_backup(agg, tmp_path)
    with contextlib.closing(Store(tmp_path / "agg.sqlite")) as restored:
        version, _, backed_up = restored.latest_model()  # type: ignore[misc]
    assert version == 2
    agg = fleet.aggregator(rounds=5)  # the backup has 2 done: three more
    # Round 4 may have been announced, and closed with v4 before its record was written.
    assert agg.version == 5 and agg.next_round_id == 5
    assert all(np.array_equal(agg.weights[k], w) for k, w in backed_up.items())
    serve_rounds(agg, agents, 5)
    records = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["model_version"] for r in records] == [1, 2, 3, 5, 6, 7, 8]
    assert [r["status"] for r in records] == ["done"] * 3 + ["abandoned"] + ["done"] * 3
    assert all(r["participants"] == ["a", "b"] for r in records if r["status"] == "done")
    assert all(a.global_version == 8 and a.stats.rejected == {} for a in agents)


@pytest.mark.parametrize("lost", ["answered", "published"])
def test_a_backup_restored_mid_round_passes_over_that_round_and_its_model(
    tmp_path: Path, lost: str
) -> None:
    """Backups are taken between rounds, so rounds.jsonl often ends where the restored
    backup does, while the fleet has seen the next round (``answered``: the devices
    answered it, then the state was lost) or even its model (``published``: the round
    closed and sent v3, and the crash came before its record). The restored aggregator
    passes over that round id and that version: the agents refuse nothing and take its
    model, and no round id or model version is used twice."""
    from helpers import serve_rounds

    fleet = RealFleet(tmp_path, backup_every=2)
    agg = fleet.aggregator(rounds=3)
    agents = [fleet.agent("a", 1), fleet.agent("b", 2)]
    serve_rounds(agg, agents, 2)  # backed up after round 2 (v2); round 3 announced ...
    if lost == "answered":  # ... and answered
        assert agg.current is not None and agg.current.round_id == 3
        assert agg.current.answered == {"a", "b"}
    else:
        serve_rounds(agg, agents, 3)  # round 3 made v3, which the agents took ...
        log = tmp_path / "rounds.jsonl"  # ... and the crash came before its record
        log.write_text("".join(log.read_text().splitlines(keepends=True)[:-1]))
        assert all(a.global_version == 3 for a in agents)
    restore_backup(agg, tmp_path)
    agg = fleet.aggregator(rounds=4)  # the backup has 2 done: two more
    assert agg.next_round_id == 4 and agg.version == 4  # round 3 and v3 passed over
    serve_rounds(agg, agents, 4)
    records = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["status"] for r in records] == ["done", "done", "abandoned", "done", "done"]
    assert [r["model_version"] for r in records] == [1, 2, 4, 5, 6]
    assert all(a.global_version == 6 and a.stats.rejected == {} for a in agents)
    for a in agents:  # the model the aggregator holds
        assert all(np.array_equal(a.global_weights[k], w) for k, w in agg.weights.items())


def test_only_a_backup_copy_is_marked_and_a_restart_after_the_catch_up_passes_over_nothing(
    tmp_path: Path,
) -> None:
    """The backup carries the mark that tells a restored state, the live state never; once
    the restored state has caught up, the mark is gone and a restart is a plain restart."""
    from fedge.aggregator.store import BACKUP_MARK

    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1, backup_every=1)
    a = Device(broker, "a")
    pump(agg)
    a.send(1, delta(1.0), 10)
    pump(agg)  # round 1 done and backed up; round 2 open
    assert agg.store.meta(BACKUP_MARK) is None
    with contextlib.closing(sqlite3.connect(tmp_path / "agg.sqlite.bak")) as db:
        assert db.execute("SELECT value FROM meta WHERE key=?", (BACKUP_MARK,)).fetchone()
    restore_backup(agg, tmp_path)
    agg = make(tmp_path, broker, clock, min_devices=1, backup_every=1)
    assert (agg.next_round_id, agg.version) == (3, 3)  # round 2 and v2 passed over
    assert agg.store.meta(BACKUP_MARK) is None
    agg = restart(agg, tmp_path, broker, clock, min_devices=1, backup_every=1)
    assert (agg.next_round_id, agg.version) == (3, 3)


def test_a_resumed_round_records_the_upload_bytes_kept_and_says_they_are_partial(
    tmp_path: Path,
) -> None:
    """The MQTT bytes of an accepted answer (chunk headers and topic included) and of the
    device's refused messages of the round are kept with it; a resumed round records them
    as before the restart, and says that its upload figures leave out what else was refused
    before it (not kept)."""
    from fedge.protocol import UpdateHeader, split

    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=3, rounds=1)
    a, b, c = (Device(broker, d) for d in "abc")
    pump(agg)
    uid = "aabbccddeeff0011"
    header = UpdateHeader(device_id="a", round_id=1, update_id=uid, base_version=0, num_samples=10)
    for part in split(encode(header, delta(0.1)), 80, bytes.fromhex(uid)):
        a.link.publish(T.update("a"), part)
    b.send(1, delta(0.1), 10)
    b.send(1, delta(0.1), 10, update_id="b-again")  # refused (already answered): counted
    pump(agg)
    assert agg.rejected["already_answered"] == 1
    before = dict(agg.current.wire_up)  # type: ignore[union-attr]
    agg = restart(agg, tmp_path, broker, clock)
    assert dict(agg.current.wire_up) == before  # type: ignore[union-attr]
    c.send(1, delta(0.1), 10)
    pump(agg)
    [record] = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    up = record["bytes_up_by_device"]
    assert {d: up[d] for d in before} == before and up["c"] > 0
    assert record["bytes_received"] == sum(record["bytes_up_by_device"].values())
    assert record["partial"] == ["bytes_received", "bytes_up_by_device", "bytes_down_per_device"]


def test_an_answer_delivered_again_after_a_restart_counts_apart_whole_or_in_chunks(
    tmp_path: Path,
) -> None:
    """kill -9 after an answer's commit and before its ack: the broker delivers the message
    again to the restarted aggregator. The device sent it once: its bytes are the round's
    once (kept with its answer), the copy's count apart (stray bytes), whether it came
    whole or as the last chunk of a chunked one."""
    from fedge.protocol import UpdateHeader, split
    from fedge.protocol.wire import publish_size

    broker, clock = MemoryBroker(), Clock()
    config = {"min_devices": 3, "rounds": 1, "chunk_timeout": 1.0}
    agg = make(tmp_path, broker, clock, **config)
    a, b, c = (Device(broker, d) for d in "abc")
    pump(agg)
    uid = "aabbccddeeff0011"
    header = UpdateHeader(device_id="a", round_id=1, update_id=uid, base_version=0, num_samples=10)
    parts = split(encode(header, delta(0.1)), 80, bytes.fromhex(uid))
    for part in parts:
        a.link.publish(T.update("a"), part)
    b.send(1, delta(0.1), 10)
    pump(agg)
    once = dict(agg.current.wire_up)  # type: ignore[union-attr]
    agg = restart(agg, tmp_path, broker, clock, **config)
    b.send(1, delta(0.1), 10)  # the broker's copies of what was not acknowledged
    a.link.publish(T.update("a"), parts[-1])
    pump(agg)
    clock.now += 2  # a's chunk waits for the rest of its message in vain
    pump(agg)
    assert agg.rejected["duplicate"] == 1 and agg.rejected["chunk_timeout"] == 1
    assert dict(agg.current.wire_up) == once  # type: ignore[union-attr]
    assert agg.stray_bytes == once["b"] + publish_size(T.update("a"), len(parts[-1]), 1)
    kept = agg.store.db.execute("SELECT device_id, wire FROM answers").fetchall()
    assert dict(kept) == once
    c.send(1, delta(0.1), 10)
    pump(agg)
    [record] = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert {d: record["bytes_up_by_device"][d] for d in once} == once


def test_a_resumed_round_records_who_was_online_and_its_inboxes_as_announced(
    tmp_path: Path,
) -> None:
    """Who was online but not selected (listening, asleep) is kept when the round is
    announced: after a restart no status is known yet. What the devices got before the
    restart adds to what they get after it (the round again): the announcement and model
    every one hears, the round in the selected quiet devices' inboxes."""
    broker, clock = MemoryBroker(), Clock()
    config = {"min_devices": 5, "devices_per_round": 2, "overselect": 1.0, "rounds": 1}
    agg = make(tmp_path, broker, clock, **config)
    devices = {d: Device(broker, d) for d in "abcde"}
    for d in "de":  # quiet: rounds and models come to their inboxes alone
        quiet = Status(device_id=d, state="online", timestamp=0.0, quiet=True)
        devices[d].link.publish(T.status(d), encode(quiet), retain=True)
    pump(agg)
    rnd = agg.current
    assert rnd is not None
    idle = set(devices) - set(rnd.selected)
    counts = {"listening": len(idle - {"d", "e"}), "sleeping": len(idle & {"d", "e"})}
    assert (rnd.listening, rnd.sleeping) == (counts["listening"], counts["sleeping"])
    inbox, down = dict(rnd.wire_down_by_device), rnd.wire_down
    assert counts == {"listening": 2, "sleeping": 1} and len(inbox) == 1  # one of each
    agg = restart(agg, tmp_path, broker, clock, **config)
    pump(agg)  # the retained statuses: quiet ones selected get the round again
    resent = dict(agg.current.wire_down_by_device)  # type: ignore[union-attr]
    again = agg.current.wire_down  # type: ignore[union-attr]
    assert again > 1.9 * down  # the announcement and the model, once more
    assert resent.keys() == inbox.keys()
    for d in agg.current.selected:  # type: ignore[union-attr]
        devices[d].send(1, delta(0.1), 10)
    pump(agg)
    [record] = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert {k: record[k] for k in counts} == counts
    assert record.get("bytes_down_by_device", {}) == {d: inbox[d] + resent[d] for d in inbox}
    assert record["bytes_down_per_device"] == again
    assert "listening" not in record["partial"]


def test_the_history_read_at_every_start_leaves_the_backup_alone(tmp_path: Path) -> None:
    """build_aggregator reads the backup's last round and version at every start: it leaves
    no -wal or -shm file beside it (a later backup would inherit them)."""
    from fedge.aggregator.service import history

    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    a = Device(broker, "a")
    pump(agg)
    a.send(1, delta(1.0), 10)
    pump(agg)
    agg.store.backup()
    (tmp_path / "agg.sqlite.bak").rename(tmp_path / "aggregator.sqlite.bak")
    cfg = agg.cfg.model_copy(update={"log": tmp_path / "elsewhere.jsonl"})
    assert history(cfg) == (2, 1)  # round 2 was open
    assert [p.name for p in tmp_path.glob("aggregator.sqlite*")] == ["aggregator.sqlite.bak"]
