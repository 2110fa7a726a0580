"""`fedge sim` with faults: each kind happens, is counted, and the rounds go on (or not).

The runs are in this process (a subprocess each would cost its imports again) on the sim's
own Mosquitto: amqtt, the embedded broker, sometimes leaves a transport unclosed at shutdown,
a ResourceWarning that would surface in whichever test the garbage collector runs in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fedge.fleet.sim import SimOptions, run_sim

from fedge.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.broker]

FAST = {
    "broker": "mosquitto",
    "epochs": 1,
    "baselines": False,
    "show_progress": False,
    "gate_threshold": 0.0,
}


def sim(out: Path, **options: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary = run_sim(SimOptions(out=out, **{**FAST, **options}))
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return summary, rounds


# Seed 7 draws, over rounds 1-3 of five devices: four dropouts, one straggler past the 3 s
# deadline, never more than two of five missing (the quorum is three), and a poisoned device
# that answers in two rounds. (Delays and deadline scale together: with a 1 s deadline and a
# mean delay of 0.3 s the same draws fell the same way, but a loaded test machine then made
# every device late now and then.)
DROPS = {
    "devices": 5,
    "rounds": 3,
    "seed": 7,
    "round_timeout": 3.0,
    "drop_rate": 0.3,
    "stragglers": "lognormal:0.9:1.5",
    "poison": "1:sign-flip",
}


@pytest.fixture(scope="module")
def dropped_runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[dict, list[dict]]]:
    return [sim(tmp_path_factory.mktemp(f"drops{i}"), **DROPS) for i in range(2)]


def test_dropouts_stragglers_and_poison_are_counted_and_rounds_complete(
    dropped_runs: list[tuple[dict, list[dict]]],
) -> None:
    summary, rounds = dropped_runs[0]
    faults = summary["faults"]
    assert summary["rounds_completed"] == 3 and summary["rounds_failed"] == 0
    assert faults["dropped"] == 4 and faults["stragglers_late"] == 1
    by_round = {r["round"]: r for r in rounds}
    for kind in ("dropped_by_round", "late_by_round"):
        for round_id, devices in faults[kind].items():
            assert set(devices) <= set(by_round[int(round_id)]["missing"])  # never answered
    missing = sum(len(r["missing"]) for r in rounds)
    assert missing == faults["dropped"] + faults["stragglers_late"]  # nobody else missed one
    (poisoned,) = faults["poisoned_devices"]
    sent = [int(r) for r, devices in faults["poisoned_by_round"].items() if poisoned in devices]
    assert faults["poisoned_sent"] == len(sent) == 2
    assert faults["poisoned_accepted"] == sum(poisoned in by_round[r]["participants"] for r in sent)
    assert faults["training_delay_s"]["max"] > 3.0  # the straggler's draw


def test_the_same_seed_injects_the_same_faults(
    dropped_runs: list[tuple[dict, list[dict]]],
) -> None:
    (first, _), (second, _) = dropped_runs
    keys = ("dropped_by_round", "late_by_round", "poisoned_devices", "poisoned_by_round")
    assert {k: first["faults"][k] for k in keys} == {k: second["faults"][k] for k in keys}


@pytest.fixture(scope="module")
def flapped(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    return sim(
        tmp_path_factory.mktemp("flaps"), devices=3, rounds=3, round_timeout=2.0, link_flaps=1.0
    )


def test_link_flaps_are_counted(flapped: tuple[dict, list[dict]]) -> None:
    summary, rounds = flapped
    faults = summary["faults"]
    assert faults["link_flaps"] >= 1 and rounds and rounds[0]["status"] == "done"
    assert faults["link_flaps"] == sum(len(d) for d in faults["link_flaps_by_round"].values())


def test_rounds_complete_through_link_flaps(flapped: tuple[dict, list[dict]]) -> None:
    summary, _ = flapped
    assert "stalled" not in summary, summary.get("stalled")
    assert summary["rounds_completed"] == 3


def test_broker_restarts_against_mosquitto(tmp_path: Path) -> None:
    summary, rounds = sim(
        tmp_path / "run",
        devices=3,
        rounds=3,
        round_timeout=10.0,
        broker_restarts=2,
        robust="trimmed_mean",
        trim_fraction=0.3,
    )
    assert summary["faults"]["broker_restarts"] == 2
    assert summary["rounds_completed"] == 3 and [r["status"] for r in rounds] == ["done"] * 3
    assert "trimmed_mean(trim_fraction=0.3)" in summary["strategy"]
    log = (tmp_path / "run" / "broker" / "mosquitto.log").read_text()
    assert log.count("terminating") >= 2 and "listener 1883" not in log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker-restarts", "1", "--broker", "mqtt://127.0.0.1:9"], "needs --broker mosquitto"),
        (["--stragglers", "weibull:1"], "--stragglers 'weibull:1'"),
        (["--poison", "4:sign-flip", "--devices", "3"], "K must be between 1 and 3"),
        (["--poison", "1:sign-flip", "--max-payload", "2048"], "--poison cannot be combined"),
        (["--drop-rate", "2"], "--drop-rate must be between 0 and 1"),
        (["--robust", "median", "--trim-fraction", "0.7"], "--trim-fraction:"),
    ],
)
def test_bad_fault_options_are_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["sim", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedge: error:") and message in err[0], err
