"""Broken local data ends as one ``fedge: error:`` line and a non-zero exit, through the real
command line, at start: the agent's data file, the aggregator's eval_data (before it connects
to any broker) and the simulator's data set. Good data passes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import DIGITS_MODEL, REPO

pytestmark = pytest.mark.unit

FORECASTER = REPO / "models" / "artifacts" / "machine_forecaster.tflite"
NOBODY = "mqtt://127.0.0.1:9"  # the discard port: nothing listens; nothing may connect


def fedge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def our_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    # LiteRT itself may print an INFO line when it loads the model; ours are the rest.
    return [line for line in proc.stderr.splitlines() if not line.startswith("INFO: ")]


def digits_like(n: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 64)).astype(np.float32), rng.integers(0, 10, n)


def broken(path: Path, kind: str) -> Path:
    """A data file for the digits model with one kind of damage."""
    x, y = digits_like()
    if kind == "features":
        x = x[:, :5]
    elif kind == "nan":
        x[[3, 17], 4] = np.nan
    elif kind == "labels":
        y = y % 10 + 7
    elif kind == "empty":
        x, y = x[:0], y[:0]
    np.savez(path, x=x, y=y)
    return path


WANT = {
    "features": "5 features per sample, the model takes 64",
    "nan": "2 of 50 samples have a non-finite feature (first at row 3)",
    "labels": "labels 7-16 but the model has 10 classes (0-9)",
    "empty": "no samples",
}


@pytest.mark.parametrize("kind", sorted(WANT))
def test_agent_refuses_its_broken_data_file_in_one_line(tmp_path: Path, kind: str) -> None:
    data = broken(tmp_path / "part.npz", kind)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "pi-1"\nbroker = "{NOBODY}"\nmodel = "{DIGITS_MODEL}"\n'
        f'data = "{data}"\nstate_dir = "{tmp_path}"\n'
    )
    proc = fedge("agent", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr
    [line] = our_lines(proc)
    assert line.startswith(f"fedge: error: {data}: {WANT[kind]}"), line


def aggregator_config(tmp_path: Path, eval_data: Path, model: Path = DIGITS_MODEL) -> Path:
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text(
        f'broker = "{NOBODY}"\nmodel = "{model}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'eval_data = "{eval_data}"\nrounds = 1\n'
    )
    return cfg


@pytest.mark.parametrize("kind", sorted(WANT))
def test_aggregator_refuses_broken_eval_data_before_it_connects(tmp_path: Path, kind: str) -> None:
    data = broken(tmp_path / "eval.npz", kind)
    started = time.monotonic()
    proc = fedge("aggregator", "--config", str(aggregator_config(tmp_path, data)), timeout=60)
    assert proc.returncode == 78, proc.stderr  # EX_CONFIG: systemd does not restart for it
    [line] = our_lines(proc)
    assert line.startswith(f"fedge: error: eval_data {data}: {WANT[kind]}"), line
    # Nothing listens on the broker's port: had it tried to connect, it would have said so
    # or kept trying; it stopped at the data, at once.
    assert time.monotonic() - started < 30


def test_aggregator_eval_data_is_checked_without_a_broker(tmp_path: Path) -> None:
    from fedge.aggregator.config import AggregatorConfig
    from fedge.aggregator.service import make_evaluator
    from fedge.models.runtime import load_runtime

    from fedge.configfile import ConfigError

    good = tmp_path / "good.npz"
    np.savez(good, x=digits_like()[0], y=digits_like()[1])
    cfg = AggregatorConfig(model=DIGITS_MODEL, eval_data=good, state_dir=tmp_path)
    evaluator = make_evaluator(cfg)
    assert evaluator is not None
    loss, accuracy = evaluator(load_runtime(DIGITS_MODEL).get_weights())
    assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0
    bad = broken(tmp_path / "bad.npz", "features")
    with pytest.raises(ConfigError, match="5 features per sample, the model takes 64"):
        make_evaluator(cfg.model_copy(update={"eval_data": bad}))


def test_regression_eval_data_is_checked_against_the_targets(tmp_path: Path) -> None:
    from fedge.aggregator.config import AggregatorConfig
    from fedge.aggregator.service import make_evaluator

    from fedge.configfile import ConfigError

    good = tmp_path / "heldout.npz"
    np.savez(good, x=np.zeros((8, 80), np.float32), y=np.zeros((8, 5), np.float32))
    cfg = AggregatorConfig(model=FORECASTER, eval_data=good, state_dir=tmp_path)
    evaluator = make_evaluator(cfg)
    assert evaluator is not None and evaluator.metric_name == "mae"  # type: ignore[attr-defined]
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((8, 80), np.float32), y=np.zeros((8, 3), np.float32))
    with pytest.raises(ConfigError, match=r"3 target\(s\) per sample, the model predicts 5"):
        make_evaluator(cfg.model_copy(update={"eval_data": bad}))


def csv_file(path: Path, damage: str) -> Path:
    rows = [f"{i % 7},{i % 3},{i % 2}" for i in range(40)]
    if damage == "nan-feature":
        rows[4] = "nan,1,0"
    elif damage == "nan-label":
        rows[4] = "1,1,nan"
    elif damage == "no-rows":
        rows = []
    path.write_text("a,b,label\n" + "".join(r + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("damage", "want"),
    [
        ("nan-feature", "features contain NaN or inf in 1 rows (columns 'a'; first at line 6)"),
        ("nan-label", "line 6 has label 'nan' in 'label'"),
        ("no-rows", "has a header but no data rows"),
    ],
)
def test_sim_refuses_a_broken_data_set_in_one_line(tmp_path: Path, damage: str, want: str) -> None:
    bad = csv_file(tmp_path / "bad.csv", damage)
    proc = fedge(
        "sim",
        "--dataset",
        str(bad),
        "--label-column",
        "label",
        "--rounds",
        "1",
        "--out",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 2, proc.stderr
    assert our_lines(proc) == [f"fedge: error: {bad}: {want}"], proc.stderr


def test_a_sim_data_set_is_checked_against_a_given_model(tmp_path: Path) -> None:
    from fedge.fleet.datasets import DatasetError, check_split, load_user_dataset

    data = csv_file(tmp_path / "two.csv", "none")
    split = load_user_dataset(data, label_column="label")
    with pytest.raises(DatasetError, match=r"two.csv: 2 features per sample, the model takes 64"):
        check_split(data, split, DIGITS_MODEL)
    with pytest.raises(DatasetError, match="regression model"):
        check_split(data, split, FORECASTER)
    x, y = digits_like(200)
    wide = tmp_path / "wide.npz"
    np.savez(wide, x=x, y=y % 3)
    check_split(wide, load_user_dataset(wide), DIGITS_MODEL)  # 3 classes fit a 10-class model


def test_fedge_sim_with_a_model_that_does_not_fit_the_data_is_one_line(tmp_path: Path) -> None:
    data = csv_file(tmp_path / "two.csv", "none")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge.cli",
            "sim",
            "--dataset",
            str(data),
            "--label-column",
            "label",
            "--model",
            str(DIGITS_MODEL),
            "--rounds",
            "1",
            "--devices",
            "2",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("INFO: ")]
    assert proc.returncode == 2 and len(ours) == 1, proc.stderr
    assert "two.csv: 2 features per sample, the model takes 64" in ours[0]
