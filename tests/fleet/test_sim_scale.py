"""`fedge sim` with many devices on one PahoHub, against a real Mosquitto."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fedge.fleet.sim import SimError, SimOptions, run_sim
from mosquitto import MosquittoServer


@pytest.mark.broker
@pytest.mark.slow
def test_200_devices_on_one_hub_complete_rounds_with_a_sample_each(
    mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    most = threading.active_count()
    done = threading.Event()

    def count_threads() -> None:
        nonlocal most
        while not done.wait(0.05):
            most = max(most, threading.active_count())

    counter = threading.Thread(target=count_threads)
    counter.start()
    opts = SimOptions(
        devices=200,
        devices_per_round=20,
        rounds=2,
        epochs=1,
        runtime="numpy",
        broker=mosquitto.url,
        out=tmp_path / "run",
        fleet=f"scale-{tmp_path.name}"[:40],
        baselines=False,
        show_progress=False,
        eval_fraction=0.0,
    )
    try:
        summary = run_sim(opts)
    finally:
        done.set()
        counter.join()
    assert most < 60  # not 400: a thread per connection and one per agent
    assert summary["rounds_completed"] == 2
    assert summary["clients"] == "hub"
    rounds = [
        json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    ]
    for r in rounds:
        # 20 answers close a round; 26 (overselect 1.3) out of the 200 online were asked.
        assert r["selected"] == 26
        assert len(r["participants"]) + len(r.get("skipped", [])) >= 20


@pytest.mark.unit
def test_bad_fleet_options_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(SimError, match="--devices-per-round 11: want 0 \\(all\\) to 10"):
        run_sim(SimOptions(devices=10, devices_per_round=11, out=tmp_path))
    with pytest.raises(SimError, match=r"--overselect 0\.5: .* greater than or equal to 1"):
        run_sim(SimOptions(devices=10, devices_per_round=2, overselect=0.5, out=tmp_path))
    with pytest.raises(SimError, match=r"--rest-rounds 256: .* less than or equal to 255"):
        run_sim(SimOptions(devices=10, quiet=True, rest_rounds=256, out=tmp_path))
    with pytest.raises(SimError, match="--clients fibres"):
        run_sim(SimOptions(devices=10, clients="fibres", out=tmp_path))
