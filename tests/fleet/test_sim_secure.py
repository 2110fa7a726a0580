"""`fedge sim --secure`: real agents run secure aggregation over the embedded broker (signed
messages, the update envelope, the residual), rounds complete when devices drop out after
masking, and bad flags get one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedge.fleet.sim import SimError, SimOptions, _secure_table, run_sim


@pytest.mark.slow
def test_secure_rounds_learn_and_survive_dropouts(tmp_path: Path) -> None:
    opts = SimOptions(
        devices=6,
        rounds=3,
        out=tmp_path / "run",
        codec="float32",
        strategy="fedavg",
        baselines=False,
        show_progress=False,
        drop_rate=0.2,  # a dropped device trained, masked and never got its update through
        secure=True,
        round_timeout=5.0,  # a round with a dropout waits for its deadline
    )
    summary = run_sim(opts)
    rounds = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert summary["rounds_completed"] == 3  # (the 4th loses 3 of 6: too few, it fails)
    for r in rounds:
        secure = r["secure"]
        assert secure["stage"] == "done" and secure["advertised"] == 6
        assert secure["survivors"] == len(r["participants"]) >= secure["threshold"]
        assert r["weights"] == dict.fromkeys(r["participants"], 1)
    assert all(r["secure"]["dropped_after_sharing"] == 1 for r in rounds)  # the faults' drops
    dropped = summary["faults"]["dropped_by_round"]
    for r in rounds:  # the dropped device is the one missing; the others were unmasked
        assert r["missing"] == dropped[str(r["round"])]
    accuracy = [r["accuracy"] for r in rounds]
    assert accuracy[-1] > 0.8 and accuracy[-1] > accuracy[0]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"devices": 2}, "--secure needs at least 3 devices"),
        ({"robust": "median"}, "--secure needs --robust mean"),
        ({"poison": "1:sign-flip"}, "--secure cannot be combined with --poison"),
        ({"secure_degree": 3}, "--secure-degree: Value error, the graph's degree must be even"),
        ({"secure_bits": 40}, "--secure-bits: Input should be less than or equal to 24"),
        ({"secure_clip": 0.0}, "--secure-clip: Input should be greater than 0"),
    ],
)
def test_bad_secure_flags_get_one_clear_line(options: dict, message: str) -> None:
    with pytest.raises(SimError, match=message.replace("(", r"\(")):
        _secure_table(SimOptions(**({"secure": True, "devices": 5} | options)))
