"""The agent's state file: a missing one starts fresh, a damaged one is refused with what to
do, the save before is kept as a backup, and --reset-state moves it aside."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.state import (
    AgentState,
    StateCorrupt,
    load_state,
    note_state,
    reset_state,
    save_state,
)
from helpers import DIGITS_MODEL

pytestmark = pytest.mark.unit


def test_missing_starts_fresh_and_each_save_keeps_a_backup(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    backup = Path(f"{path}.bak")
    assert load_state(path) == AgentState()
    first = AgentState(last_round=4, round_seen=5, model_version=3)
    save_state(path, first)
    assert load_state(backup) == load_state(path) == first
    save_state(path, AgentState(last_round=5, round_seen=5, model_version=4))
    assert load_state(path).last_round == 5
    # The backup is the save before, in a file of its own: damage to one spares the other.
    assert load_state(backup) == first
    assert path.stat().st_ino != backup.stat().st_ino
    path.write_text("garbage")
    assert load_state(backup) == first


@pytest.mark.parametrize(
    ("body", "says"),
    [("", "is empty"), ('{"last_round": 3', "not a fedge agent state"), ("[]", "not a fedge")],
    ids=["empty", "truncated", "wrong-shape"],
)
def test_a_damaged_file_is_refused_naming_the_backup(tmp_path: Path, body: str, says: str) -> None:
    path = tmp_path / "agent.json"
    save_state(path, AgentState(last_round=2))
    path.write_text(body)
    with pytest.raises(StateCorrupt) as err:
        load_state(path)
    assert says in str(err.value) and f"restore {path}.bak" in str(err.value)
    assert reset_state(path, "now") == tmp_path / "agent.json.reset-now"
    assert load_state(path) == AgentState()


def test_fedge_agent_with_a_damaged_state_exits_78_then_reset_state_starts(tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int32))
    # Its broker: a socket that takes the connection and never answers. The agent that gets
    # past its state connects at once (and would wait on for an answer: it is stopped).
    broker = socket.create_server(("127.0.0.1", 0))
    broker.settimeout(60)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "pi-1"\nmodel = "{DIGITS_MODEL}"\ndata = "{data}"\n'
        f'state_dir = "{tmp_path}"\nbroker = "mqtt://127.0.0.1:{broker.getsockname()[1]}"\n'
    )
    (tmp_path / "agent-pi-1.json").write_text("")
    with broker:
        proc = subprocess.run(
            [sys.executable, "-m", "fedge.cli", "agent", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        ours = [line for line in proc.stderr.splitlines() if not line.startswith("INFO: ")]
        assert proc.returncode == 78 and len(ours) == 1, proc.stderr
        assert ours[0].startswith("fedge: error: agent state ") and "--reset-state" in ours[0]
        broker.setblocking(False)
        with pytest.raises(BlockingIOError):  # it stopped at its state, before connecting
            broker.accept()
        broker.settimeout(60)
        # With --reset-state it gets past the state, to its broker.
        child = subprocess.Popen(
            [sys.executable, "-m", "fedge.cli", "agent", "--config", str(cfg), "--reset-state"],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            try:
                conn, _ = broker.accept()
            except TimeoutError:
                pytest.fail("the agent did not get to its broker")
            conn.close()
        finally:
            child.terminate()
            _, err = child.communicate(timeout=30)
    assert "--reset-state: moved" in err, err
    assert list(tmp_path.glob("agent-pi-1.json.reset-*"))


def test_a_noted_model_version_counts_unless_torn_or_under_other_keys(tmp_path: Path) -> None:
    """The version of a model applied between durable saves is noted beside the state file;
    the state file itself and its backup stay as saved."""
    path = tmp_path / "agent.json"
    save_state(path, AgentState(last_round=1, model_version=1))
    save_state(path, AgentState(last_round=2, model_version=2))
    before = path.read_bytes()
    note_state(path, AgentState(last_round=2, model_version=3))
    assert path.read_bytes() == before
    assert load_state(path) == AgentState(last_round=2, model_version=3)
    assert load_state(Path(f"{path}.bak")).model_version == 1
    note_state(path, AgentState(last_round=2, model_version=4, trusted_keys=["ab" * 8] * 3))
    assert load_state(path).model_version == 2  # noted under other keys: not these
    note_state(path, AgentState(last_round=2, model_version=5))  # shorter: padded
    assert load_state(path).model_version == 5
    save_state(path, AgentState(last_round=3, model_version=6))
    assert load_state(path).model_version == 6  # an older note does not lower it
    note = Path(f"{path}.model")
    note.write_bytes(note.read_bytes()[:9])  # torn by a power cut
    assert load_state(path) == AgentState(last_round=3, model_version=6)
    assert reset_state(path, "now") is not None
    assert load_state(path) == AgentState() and not note.exists()
