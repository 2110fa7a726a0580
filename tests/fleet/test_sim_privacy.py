"""`fedge sim --dp`: epsilon in rounds.jsonl, summary.json and the report; bad flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fedge.fleet.sim import SimError, SimOptions, _privacy_table


@pytest.mark.slow
def test_a_central_dp_run_reports_epsilon_everywhere(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--devices", "6", "--rounds", "2", "--epochs", "1", "--devices-per-round", "2"]
    dp = ["--dp", "central", "--noise-multiplier", "1.2", "--clip", "0.5"]
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "sim", *args, *dp, "--no-baselines", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    spent = [r["privacy"]["epsilon"] for r in rounds]
    assert len(spent) == 2 and spent == sorted(spent) and spent[0] > 0
    assert {r["privacy"]["sampling_rate"] for r in rounds} == {0.5}  # 3 (2 x 1.3) of 6
    summary = json.loads((out / "summary.json").read_text())["privacy"]
    assert summary["epsilon"] == spent[-1] and summary["rounds_accounted"] == 2
    assert summary["mode"] == "central" and summary["target_delta"] == 1e-5
    assert f"epsilon {spent[-1]:.3f} at delta 1e-05 after 2 round(s)" in proc.stdout
    report = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "report", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert f"epsilon {spent[-1]:.2f} at delta 1e-05 (central DP)" in report.stdout
    assert f"epsilon {spent[-1]:.2f}" in (out / "report.html").read_text()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"noise_multiplier": 0.0}, "--noise-multiplier: Input should be greater than 0"),
        ({"clip": -1.0}, "--clip: Input should be greater than 0"),
        ({"adaptive_clip_quantile": 1.5}, "--adaptive-clip-quantile: Input should be less"),
        ({"target_delta": 2.0}, "--target-delta: Input should be less than 1"),
        ({"epsilon_budget": 0.0}, "--epsilon-budget: Input should be greater than 0"),
        ({"dp": "global"}, "--dp: Input should be 'central' or 'local'"),
        (
            {"dp": "local", "adaptive_clip_quantile": 0.5},
            "--adaptive-clip-quantile needs --dp central",
        ),
    ],
)
def test_bad_privacy_flags_name_the_flag(options: dict, message: str) -> None:
    opts = SimOptions(**({"dp": "central"} | options))
    with pytest.raises(SimError, match="^" + message.replace("(", r"\(")):
        _privacy_table(opts)
    assert _privacy_table(SimOptions()) is None  # off by default
