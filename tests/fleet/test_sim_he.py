"""``fedge sim --he``: a small encrypted run end to end over the embedded broker; the sim
scores the models it decrypts outside the aggregator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedge.fleet.sim import SimError, SimOptions, run_sim
from fedge.protocol import he

pytestmark = pytest.mark.slow


def test_sim_he_trains_and_reports_the_decrypted_accuracy(tmp_path: Path) -> None:
    pytest.importorskip("tenseal", reason=he.INSTALL_HINT)
    opts = SimOptions(
        devices=3,
        rounds=2,
        he=True,
        strategy="fedavg",
        baselines=False,
        show_progress=False,
        out=tmp_path,
        round_timeout=30.0,
    )
    summary = run_sim(opts)
    assert summary["rounds_completed"] == 2
    assert summary["final_accuracy"] is not None and summary["final_accuracy"] > 0.5
    scored = [json.loads(line) for line in (tmp_path / "decrypted.jsonl").read_text().splitlines()]
    assert [s["round"] for s in scored] == [1, 2]
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert all(r["he"]["encrypted"] and "accuracy" not in r for r in rounds)
    assert summary["bytes_received_by_aggregator"] > 2 * 3 * 400_000  # ciphertexts went up
    from fedge.fleet.report import load_run

    run = load_run(tmp_path)  # fedge report plots the decrypted scores
    assert [r.accuracy for r in run.rounds] == [s["accuracy"] for s in scored]
    assert run.summary["codec"] == "ckks"
    with pytest.raises(SimError, match="FedAvg only"):
        run_sim(SimOptions(devices=3, rounds=1, he=True, out=tmp_path / "x", show_progress=False))
