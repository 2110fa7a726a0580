"""`fedge sim` on a user's own data and model, several schemes in one run, and its errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import DIGITS_MODEL

pytestmark = pytest.mark.slow


def sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge.cli", "sim", "--rounds", "2", "--epochs", "1", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def digits_csv(path: Path) -> Path:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([f"px{i}" for i in range(64)] + ["digit"])
        for row, label in zip(x[:600], y[:600], strict=True):
            w.writerow([*row.tolist(), names[label]])
    return path


def test_csv_dataset_with_a_tflite_model(tmp_path: Path) -> None:
    data = digits_csv(tmp_path / "digits.csv")
    out = tmp_path / "run"
    proc = sim(
        "--devices",
        "3",
        "--dataset",
        str(data),
        "--label-column",
        "digit",
        "--model",
        str(DIGITS_MODEL),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["dataset"].endswith("digits.csv")
    assert len(np.load(out / "data" / "test.npz")["y"]) == 120  # 20% of 600 held out


@pytest.mark.build
def test_npz_dataset_with_a_spec_builds_the_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)  # two classes, learnable
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    spec = tmp_path / "tiny.json"
    spec.write_text(
        json.dumps({"name": "tiny", "input_size": 5, "layers": [{"units": 8}], "outputs": 2})
    )
    out = tmp_path / "run"
    proc = sim(
        "--devices",
        "3",
        "--dataset",
        str(tmp_path / "mine.npz"),
        "--model",
        str(spec),
        "--out",
        str(out),
        "--lr",
        "0.3",
        "--codec",
        "float32",  # 66 weights: top-k 2% would send one or two a round
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "tiny.tflite").exists()
    assert json.loads((out / "summary.json").read_text())["final_accuracy"] > 0.6


def test_several_schemes_and_strategies_in_one_run(tmp_path: Path) -> None:
    out = tmp_path / "multi"
    proc = sim(
        "--devices",
        "10",
        "--partition",
        "iid,single",
        "--strategy",
        "fedavgm",
        "--mu",
        "0.1",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    combined = json.loads((out / "summary.json").read_text())
    assert combined["runs"] == ["iid", "single"]
    for slug in ("iid", "single"):
        run = json.loads((out / slug / "summary.json").read_text())
        assert run["strategy"].startswith("fedavgm") and run["mu"] == 0.1
        lines = (out / slug / "baselines.jsonl").read_text().splitlines()
        assert len(lines) == 2
        first = json.loads(lines[0])
        assert set(first) == {"round", "centralised", "non_participant", "local"}
        assert len(first["local"]) == 10
    report = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "report", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--partition", "zipf"], "unknown partition scheme"),
        (["--partition", "dominant:1.5"], "dominant"),
        (["--dataset", "/nonexistent.csv"], "nonexistent.csv"),
        (["--partition", "single", "--devices", "3"], "single"),
        (["--eval-fraction", "0.7"], "--eval-fraction: Input should be less than or equal to 0.5"),
    ],
    ids=["unknown-scheme", "bad-parameter", "missing-dataset", "too-few-devices", "eval"],
)
def test_bad_options_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = sim("--out", str(tmp_path / "x"), *args)
    assert proc.returncode == 2
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("INFO: ")]
    assert len(ours) == 1 and ours[0].startswith("fedge: error:") and message in ours[0], (
        proc.stderr
    )


def test_chunked_uploads_reach_the_aggregator(tmp_path: Path) -> None:
    """float32 deltas of 19 KB through a broker that takes 2 KB per publish."""
    out = tmp_path / "chunks"
    proc = sim(
        "--devices",
        "3",
        "--codec",
        "float32",
        "--gate-threshold",
        "0",
        "--max-payload",
        "2048",
        "--no-baselines",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert all(len(r["participants"]) == 3 for r in rounds)
    # every update arrived as about ten chunks, each with its own 28-byte header
    assert all(b > 19240 for r in rounds for b in r["bytes_up_by_device"].values())
