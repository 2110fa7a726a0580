"""`fedge fleet launch`: the config files it writes, and real processes over Mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.config import AgentConfig
from fedge.aggregator.config import AggregatorConfig
from fedge.fleet.launch import (
    LaunchError,
    LaunchOptions,
    RunFolder,
    agent_processes,
    agent_table,
    aggregator_table,
    fedge_command,
    launch,
    spawn,
    stop_children,
    toml_text,
    write_run,
)
from fedge.fleet.signing_keys import write_signing_pair
from helpers import DIGITS_MODEL, digits_partitions

from fedge.configfile import load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.unit
def test_toml_text_quotes_paths_and_nests_tables() -> None:
    table = {
        "name": 'odd "quoted" \\ path',
        "path": Path("/tmp/a b/c.npz"),
        "keys": [Path("k.pub")],
        "n": 3,
        "x": 0.5,
        "on": True,
        "training": {"epochs": 5, "lr": 0.1},
    }
    back = tomllib.loads(toml_text(table, "# header"))
    assert back == {
        "name": 'odd "quoted" \\ path',
        "path": "/tmp/a b/c.npz",
        "keys": ["k.pub"],
        "n": 3,
        "x": 0.5,
        "on": True,
        "training": {"epochs": 5, "lr": 0.1},
    }


@pytest.mark.unit
def test_written_configs_are_what_the_services_load(tmp_path: Path) -> None:
    (part,), test = digits_partitions(tmp_path, 1)
    key, pub = write_signing_pair(tmp_path / "keys")
    agent_file = tmp_path / "dev007.toml"
    agent_file.write_text(
        toml_text(
            agent_table(
                "dev007",
                fleet="launch-1",
                broker="mqtt://127.0.0.1:41234",
                model=DIGITS_MODEL,
                data=part,
                state_dir=tmp_path / "state" / "dev007",
                public_key=pub,
                seed=7,
            )
        )
    )
    agent = load_config(agent_file, AgentConfig)
    assert agent.device_id == "dev007" and agent.fleet == "launch-1"
    assert agent.aggregator_keys == (pub,)  # rounds must be signed by the run's key
    assert agent.data == part and agent.state_dir == tmp_path / "state" / "dev007"

    agg_file = tmp_path / "aggregator.toml"
    agg_file.write_text(
        toml_text(
            aggregator_table(
                fleet="launch-1",
                broker="mqtt://127.0.0.1:41234",
                model=DIGITS_MODEL,
                state_dir=tmp_path / "state" / "aggregator",
                signing_key=key,
                eval_data=test,
                rounds=4,
                min_devices=20,
                round_timeout=30,
                seed=1,
            )
        )
    )
    agg = load_config(agg_file, AggregatorConfig)
    assert agg.signing_key == key and agg.eval_data == test
    assert (agg.rounds, agg.min_devices, agg.round_timeout) == (4, 20, 30.0)
    assert agg.log_path == tmp_path / "state" / "aggregator" / "rounds.jsonl"
    assert (agg.training.epochs, agg.training.batch_size, agg.training.lr) == (5, 16, 0.1)


@pytest.mark.unit
def test_run_folder_has_a_partition_and_a_config_per_device(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run").fresh()
    opts = LaunchOptions(
        devices=4, hang=1, partition="dominant:0.9", out=run.out, epochs=2, batch_size=8, lr=0.2
    )
    devices = write_run(opts, run, "mqtt://127.0.0.1:41234", "launch-1")
    assert devices == ["dev000", "dev001", "dev002", "dev003"]
    agg = load_config(run.config("aggregator"), AggregatorConfig)
    assert agg.min_devices == 3  # the hung one is not waited for once it is offline
    assert (agg.training.epochs, agg.training.batch_size, agg.training.lr) == (2, 8, 0.2)
    agents = [load_config(run.config(d), AgentConfig) for d in devices]
    assert {a.aggregator_keys for a in agents} == {(run.out.resolve() / "keys" / "signing.pub",)}
    assert len({a.state_dir for a in agents} | {agg.state_dir}) == 5
    sizes = []
    for agent in agents:
        with np.load(agent.data) as data:
            sizes.append(len(data["y"]))
            dominant_share = np.bincount(data["y"]).max() / len(data["y"])
        assert dominant_share > 0.8  # dominant:0.9, as --partition asked
    assert sum(sizes) <= 1400 and len(set(sizes)) > 1


@pytest.mark.unit
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"devices": 0}, "--devices must be at least 1"),
        ({"hang": 3, "devices": 3}, "--hang must be from 0 to 2"),
        ({"broker": "mqtts://host:8883"}, "give mqtt://HOST:PORT"),
        ({"partition": "zipf"}, "unknown partition scheme"),
        ({"model": Path("/nonexistent.tflite")}, "--model /nonexistent.tflite: no such file"),
        ({"epochs": 0}, "--epochs and --batch-size must be at least 1"),
        ({"agents_per_process": 0}, "--agents-per-process must be at least 1"),
        ({"agents_per_process": 2, "hang": 1}, "--hang freezes whole processes"),
    ],
)
def test_bad_options_are_one_line_before_anything_starts(
    tmp_path: Path, change: dict, message: str
) -> None:
    opts = LaunchOptions(out=tmp_path / "run", **change)
    with pytest.raises(LaunchError, match=message):
        launch(opts)
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_stopping_says_which_child_did_not_exit_cleanly(tmp_path: Path) -> None:
    ready = "print('ready', flush=True)\nwhile True: time.sleep(0.05)"
    programs = {
        "plain": "import time\n",  # SIGTERM's default action kills it: not a clean exit
        "clean": "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n",
        "deaf": "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n",
    }
    children = [
        spawn(name, [sys.executable, "-c", code + ready], tmp_path / f"{name}.log")
        for name, code in programs.items()
    ]
    deadline = time.monotonic() + 30
    while not all(c.log.read_text() for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)  # until every handler is in place
    assert stop_children(children, timeout=2.0) == {
        "plain": "status -15",
        "clean": "ok",
        "deaf": "killed",
    }
    assert all(child.proc.poll() is not None for child in children)


def launched(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    """``fedge fleet launch ARGS --out OUT``, which must succeed, and its rounds.jsonl."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "fleet", "launch", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (out / "state" / "aggregator" / "rounds.jsonl").read_text().splitlines()
    return proc, [json.loads(line) for line in lines]


@pytest.mark.broker
@pytest.mark.slow
def test_launch_runs_rounds_with_real_processes_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, rounds = launched(out, "--devices", "3", "--rounds", "2", "--round-timeout", "30")
    assert [r["round"] for r in rounds if r["status"] == "done"] == [1, 2]
    for r in rounds:  # every device answered every round: an update or a skip notice
        assert sorted(r["participants"] + r.get("skipped", [])) == ["dev000", "dev001", "dev002"]
    for name in ("aggregator", "dev000", "dev001", "dev002"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0
        assert (out / "configs" / f"{name}.toml").is_file()
    assert (out / "report.png").stat().st_size > 10_000 and (out / "report.html").is_file()
    summary = json.loads((out / "launch.json").read_text())
    assert summary["rounds_done"] == 2 and summary["agents_not_stopped_cleanly"] == {}
    assert "2 of 2 rounds done" in proc.stdout and f"report:  {out}/report.png" in proc.stdout


@pytest.mark.broker
@pytest.mark.slow
def test_a_child_that_exits_early_ends_the_launch_naming_it(tmp_path: Path) -> None:
    spawned: list[str] = []

    def command(role: str, config: Path) -> list[str]:
        spawned.append(config.stem)
        if config.stem == "dev001":  # as `fedge agent` says a bad config, and exits with 78
            return [
                sys.executable,
                "-c",
                "import sys; print('fedge: error: dev001.toml: model: file does not exist');"
                " sys.exit(78)",
            ]
        return fedge_command(role, config)

    out = tmp_path / "run"
    with pytest.raises(LaunchError) as caught:
        launch(LaunchOptions(devices=3, rounds=2, out=out, show_progress=False), command=command)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("dev001 exited with status 78 before the rounds were done")
    assert "model: file does not exist" in text and str(out / "logs" / "dev001.log") in text
    assert spawned == ["aggregator", "dev000", "dev001", "dev002"]
    # No orphans: every process started from the run's configs is gone.
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(out) in cmdline:
            assert not _alive(int(pid_dir.name)), cmdline


@pytest.mark.broker
def test_own_mosquitto_starts_in_a_relative_folder(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from fedge.fleet.mosquitto import LocalMosquitto

    monkeypatch.chdir(tmp_path)
    with LocalMosquitto(Path("runs") / "broker") as broker:  # `--out runs/x`, as people type it
        assert broker.log_path == tmp_path / "runs" / "broker" / "mosquitto.log"


@pytest.mark.unit
def test_agents_are_grouped_into_host_processes() -> None:
    devices = [f"dev{i:03d}" for i in range(5)]
    assert agent_processes(devices, 1) == [(d, [d]) for d in devices]
    assert agent_processes(devices, 2) == [
        ("host000", ["dev000", "dev001"]),
        ("host001", ["dev002", "dev003"]),
        ("host002", ["dev004"]),
    ]


@pytest.mark.broker
@pytest.mark.slow
def test_several_agents_share_a_process_each_with_its_own_connection(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _, rounds = launched(
        out, "--agents-per-process", "2", "--devices", "4", "--rounds", "2", "--epochs", "1"
    )
    devices = [f"dev{i:03d}" for i in range(4)]
    assert [r["round"] for r in rounds if r["status"] == "done"] == [1, 2]
    assert all(sorted(r["participants"] + r.get("skipped", [])) == devices for r in rounds)
    host = (out / "logs" / "host000.log").read_text()
    # One log per process, each line naming the device whose step wrote it.
    assert " dev000 fedge.agent: round 2:" in host and " dev001 fedge.agent: round 2:" in host
    assert not (out / "logs" / "dev000.log").exists()
    assert all((out / "state" / d / f"agent-{d}.json").is_file() for d in devices)
    assert json.loads((out / "launch.json").read_text())["agents_not_stopped_cleanly"] == {}
