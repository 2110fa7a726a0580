"""`fedge sim` end to end on the embedded broker, and the iid partitioner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedge.fleet.partition import iid, partition


@pytest.mark.unit
def test_iid_covers_every_sample_once_with_even_label_shares() -> None:
    y = np.repeat(np.arange(10), 100)
    parts = iid(y, 10, np.random.default_rng(0))
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(1000))
    assert {len(p) for p in parts} == {100}
    for p in parts:  # each device sees every class, roughly 10% each
        shares = np.bincount(y[p], minlength=10) / len(p)
        assert shares.min() > 0.0 and shares.max() < 0.25


@pytest.mark.unit
def test_unknown_scheme_and_too_many_devices() -> None:
    with pytest.raises(ValueError, match="unknown partition"):
        partition("zipf", np.arange(10), 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="cannot split"):
        iid(np.arange(3), 4, np.random.default_rng(0))


@pytest.mark.slow
def test_sim_cli_on_embedded_broker(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge.cli",
            "sim",
            "--devices",
            "4",
            "--rounds",
            "3",
            "--epochs",
            "1",
            "--seed",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_accuracy", "rounds_completed", "bytes_up", "bytes_down", "devices"):
        assert key in summary
    assert summary["rounds_completed"] == 3 and summary["devices"] == 4
    # The default codec sends about 2% of the entries as int8: far less than float32
    # (4 devices x 3 rounds x 19,240 bytes), but more than the 22-byte skip notices.
    assert 4 * 3 * 22 < summary["bytes_up"] < 4 * 3 * 4 * 4810 / 5
    assert summary["bytes_down"] > 4 * 3 * 4 * 4810  # every device receives float32 globals
    assert summary["codec"] == "topk:0.02+int8" and summary["energy_j_per_device_round"]["lte"] > 0
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(len(r["participants"]) == 4 for r in rounds)
    assert rounds[-1]["accuracy"] > 0.5  # three rounds of FedAvg on digits beat chance by far
    assert "round" in proc.stdout and "accuracy" in proc.stdout  # the per-round table
    # Federated evaluation: every device scored the round's starting model on its newest
    # examples; rounds 2 and 3 scored models that the aggregator's held-out set scored too.
    assert all(r["fed_eval"]["devices"] == 4 for r in rounds)
    assert [r["fed_eval"]["model_version"] for r in rounds] == [0, 1, 2]
    assert summary["fed_eval_compared"] == 2 and 0 <= summary["fed_eval_gap"] < 0.5
    assert "federated evaluation: the devices' accuracy was" in proc.stdout
