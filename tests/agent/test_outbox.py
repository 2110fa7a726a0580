"""The outbox file: what is put is taken back whole; a write a crash cuts short at any byte
leaves the answer before it; the ``.npz`` outbox of earlier versions is still read."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.outbox import Outbox, Pending
from fedge.agent.state import AgentState, load_state, note_path, note_state, save_state

pytestmark = pytest.mark.unit


def pending(round_id: int, *, seed: int = 0, parts: int = 1, state: bool = True) -> Pending:
    rng = np.random.default_rng(seed + round_id)
    return Pending(
        round_id=round_id,
        update_id=f"{round_id:016x}",
        topic="fedge/v1/f/update/d1",
        parts=[rng.bytes(int(n)) for n in rng.integers(0, 700, parts)],
        kept={
            "w": rng.standard_normal((8, 5)).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32),
            "scalar": np.array(rng.standard_normal(), np.float32),  # 0-d stays 0-d
            "empty": np.zeros((0, 4), np.float32),  # a tensor of no entries
        },
        kind="update" if round_id % 2 else "skip",
        state=AgentState(
            last_round=round_id,
            round_seen=round_id + 1,
            model_version=round_id - 1,
            consecutive_skips=round_id % 3,
            upload_budget={"window_s": 86400.0, "sent": [[1.5e9, 1200 + round_id]]},
            trusted_keys=["ab" * 8],
        )
        if state
        else None,
    )


def same(a: Pending | None, b: Pending) -> bool:
    assert a is not None
    assert a.kept is not None and b.kept is not None
    return (
        (a.round_id, a.update_id, a.topic, a.parts, a.kind, a.state)
        == (b.round_id, b.update_id, b.topic, b.parts, b.kind, b.state)
        and a.kept.keys() == b.kept.keys()
        and all(
            a.kept[k].shape == b.kept[k].shape and np.array_equal(a.kept[k], b.kept[k])
            for k in b.kept
        )
    )


def test_what_is_put_is_taken_back_whole_and_the_newest_wins(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "sub" / "d1.outbox")
    assert box.take() is None
    for round_id in range(1, 6):
        p = pending(round_id, parts=round_id)  # chunked updates too; a part may be empty
        box.put(p)
        assert same(box.take(), p)
        assert same(Outbox(box.path).take(), p)  # as a new process reads it
    assert all(slot.exists() for slot in box.slots)  # written in turn
    no_residual = Pending(6, "6" * 16, "t", [b"x"], None, state=None)
    Outbox(box.path).put(no_residual)  # a fresh object finds the slot to spare by itself
    assert Outbox(box.path).take() == no_residual
    box.clear()
    assert box.take() is None and not any(s.exists() for s in box.slots)


def test_a_write_cut_short_at_any_byte_leaves_the_answer_before_it(tmp_path: Path) -> None:
    """A crash (or power cut) during the write of round 3's outbox: whatever prefix of the
    new record reached the disk over the older record in that slot, round 2's is taken."""
    box = Outbox(tmp_path / "d1.outbox")
    box.put(pending(1))
    box.put(pending(2))
    spare = box.slots[0]  # holds round 1; round 3 goes there
    old = spare.read_bytes()
    scratch = Outbox(tmp_path / "scratch" / "d1.outbox")
    scratch.put(pending(1))
    scratch.put(pending(2))
    scratch.put(pending(3, parts=3))
    new = scratch.slots[0].read_bytes()
    assert len(new) > len(old)
    cuts = sorted({*range(0, 64), *range(64, len(new), 37), len(new) - 1})
    for cut in cuts:
        for before in (old, b""):  # over the older record, or into a new file
            spare.write_bytes(new[:cut] + before[cut:])
            assert same(Outbox(box.path).take(), pending(2)), cut
    spare.write_bytes(new)
    assert same(Outbox(box.path).take(), pending(3, parts=3))


def test_a_damaged_record_is_passed_over_and_no_whole_record_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(tmp_path / "d1.outbox")
    box.put(pending(1))
    box.put(pending(2))
    newest = bytearray(box.slots[1].read_bytes())
    newest[len(newest) // 2] ^= 0x01  # one bit of the residual flipped
    box.slots[1].write_bytes(bytes(newest))
    assert same(Outbox(box.path).take(), pending(1))
    box.slots[0].write_bytes(b"\0" * 100)
    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        assert Outbox(box.path).take() is None
    assert "unreadable" in caplog.text
    assert not any(s.exists() for s in box.slots)  # dropped, said once


def write_npz_outbox(path: Path, p: Pending) -> None:
    """The layout of earlier versions, as they wrote it."""
    meta = {
        "round_id": p.round_id,
        "update_id": p.update_id,
        "topic": p.topic,
        "parts": len(p.parts),
        "kept": p.kept is not None,
        "kind": p.kind,
    }
    arrays = {"__outbox__": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    for i, part in enumerate(p.parts):
        arrays[f"part/{i}"] = np.frombuffer(part, np.uint8)
    for name, value in (p.kept or {}).items():
        arrays[f"kept/{name}"] = value
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def test_an_outbox_of_the_npz_layout_is_still_read_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "agent-d1.outbox")
    old = pending(4, parts=2, state=False)
    write_npz_outbox(tmp_path / "agent-d1.outbox.npz", old)  # the earlier file name
    assert same(box.take(), old)
    box.clear()
    assert box.take() is None and not box.legacy.exists()
    (tmp_path / "agent-d1.outbox.npz").write_bytes(b"PK\3\4 not a zip")
    assert box.take() is None and not box.legacy.exists()


def test_the_state_comes_from_the_outbox_only_when_it_is_newer(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    answered = AgentState(last_round=7, round_seen=7, model_version=6, consecutive_skips=2)
    assert load_state(path, answered=answered) == answered  # no state file yet
    note_state(path, AgentState(model_version=8))  # a model applied after the answer
    assert load_state(path, answered=answered).model_version == 8
    note_path(path).unlink()
    save_state(path, AgentState(last_round=5, round_seen=6, model_version=5))
    assert load_state(path, answered=answered) == answered
    later = AgentState(last_round=7, round_seen=9, model_version=8)  # saved after the answer
    save_state(path, later)
    assert load_state(path, answered=answered) == later
    # Under other pinned keys (a new trust root forgot the rounds): not taken back.
    save_state(path, AgentState(trusted_keys=["cd" * 8]))
    assert load_state(path, answered=answered) == AgentState(trusted_keys=["cd" * 8])


def test_the_write_is_in_place_with_one_data_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = Outbox(tmp_path / "d1.outbox")
    box.put(pending(1))
    box.put(pending(2))
    inodes = [s.stat().st_ino for s in box.slots]
    calls: list[str] = []
    for name in ("fsync", "fdatasync", "replace", "rename"):
        if hasattr(os, name):
            real = getattr(os, name)
            monkeypatch.setattr(
                os, name, lambda *a, _n=name, _r=real: (calls.append(_n), _r(*a))[1]
            )
    box.put(pending(3))
    assert calls == ["fdatasync" if hasattr(os, "fdatasync") else "fsync"]
    assert [s.stat().st_ino for s in box.slots] == inodes


def test_a_record_is_read_once_and_a_put_before_a_take_leaves_no_older_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d1.outbox"
    box = Outbox(path)
    box.put(pending(1))
    box.put(pending(2))
    reads = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: reads.append(p) or read_bytes(p))
    again = Outbox(path)  # the agent's start: the state first, then the resend
    assert same(again.take(), pending(2)) and same(again.take(), pending(2))
    assert len(reads) == 2  # the two slots, once
    # Put without a take, and the slots cannot be read: they are cleared, not guessed at
    # (a guess could leave record 2 outranking the new record 1 in the other slot).
    blind = Outbox(path)

    def unreadable() -> None:
        raise OSError("I/O error")

    monkeypatch.setattr(blind, "_newest_record", unreadable)
    blind.put(pending(3))
    assert same(Outbox(path).take(), pending(3))
