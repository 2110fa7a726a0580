"""`fedge report`: loading run directories, the summary numbers, the PNG and the HTML page."""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fedge.fleet.report import (
    ReportError,
    fed_eval_gap,
    fed_eval_series,
    figure_title,
    load_run,
    load_runs,
    render_report,
    summary_table,
)
from fedge.fleet.report_devices import (
    MISSING,
    NOT_SELECTED,
    RESTING,
    SKIPPED,
    TRAINED,
    device_grid,
)

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _summary(partition: str = "iid", **extra: object) -> dict[str, object]:
    return {
        "devices": 3,
        "epochs": 1,
        "rounds_requested": 4,
        "rounds_completed": 4,
        "partition": partition,
        "strategy": "fedavg",
        "seed": 0,
        "final_accuracy": 0.8,
        "bytes_up": 123_456,
        "bytes_down": 2_345_678,
        **extra,
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_run(
    path: Path,
    summary: dict[str, object],
    rounds: list[dict],
    baselines: list[dict] | None = None,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(summary))
    _write_jsonl(path / "rounds.jsonl", rounds)
    if baselines is not None:
        _write_jsonl(path / "baselines.jsonl", baselines)
    return path


def _round(n: int, acc: float | None, loss: float | None, status: str = "done") -> dict:
    row: dict[str, object] = {
        "round": n,
        "status": status,
        "participants": ["dev000", "dev001", "dev002"],
        "bytes_received": 30_000,
        "duration_s": 0.1,
    }
    if acc is not None:
        row["accuracy"] = acc
    if loss is not None:
        row["loss"] = loss
    return row


def small_run(path: Path, partition: str = "iid", *, baselines: bool = True) -> Path:
    """Seven rounds, round 5 failed; device dev002 sits out rounds 6 and 7."""
    accs = [0.3, 0.5, 0.6, 0.7, None, 0.8, 0.9]
    rounds = [
        _round(n, acc, None if acc is None else 2.0 - 2 * acc, "failed" if acc is None else "done")
        for n, acc in enumerate(accs, start=1)
    ]
    base = [
        {
            "round": n,
            "centralised": {"accuracy": 0.9 + n / 100, "loss": 0.2},
            "non_participant": {"accuracy": 0.5 + n / 100, "loss": 1.0},
            "local": {
                "dev000": {"accuracy": 0.1 * n, "loss": 1.0},
                "dev001": {"accuracy": 0.05 * n, "loss": 1.5},
                **({"dev002": {"accuracy": 0.02 * n, "loss": 2.0}} if n <= 5 else {}),
            },
        }
        for n in range(1, 8)
    ]
    return write_run(
        path,
        _summary(partition, rounds_requested=7, rounds_completed=6, final_accuracy=0.9),
        rounds,
        base if baselines else None,
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _embedded_png(page: str) -> bytes:
    start = page.index("data:image/png;base64,") + len("data:image/png;base64,")
    return base64.b64decode(page[start : page.index('"', start)])


# --- loading ---------------------------------------------------------------------------------


def test_single_run_loads_rounds_and_baselines(tmp_path: Path) -> None:
    run = load_run(small_run(tmp_path / "r", "dominant:0.9"))
    assert run.scheme == "dominant:0.9"
    assert [r.round for r in run.rounds] == list(range(1, 8))
    assert [r.done for r in run.rounds].count(False) == 1
    assert run.rounds[4].accuracy is None
    assert set(run.baselines[0].local) == {"dev000", "dev001", "dev002"}
    assert set(run.baselines[6].local) == {"dev000", "dev001"}


def test_multi_scheme_panels_follow_summary_order_then_name(tmp_path: Path) -> None:
    small_run(tmp_path / "single", "single")
    small_run(tmp_path / "iid", "iid")
    small_run(tmp_path / "zz-extra", "dominant:0.5")
    small_run(tmp_path / "a-extra", "dominant:0.7")
    (tmp_path / "data").mkdir()  # a folder without rounds.jsonl is not a run
    (tmp_path / "summary.json").write_text(json.dumps({"runs": ["single", "gone", "iid"]}))
    runs = load_runs(tmp_path)
    assert [r.path.name for r in runs] == ["single", "iid", "a-extra", "zz-extra"]
    with pytest.raises(ReportError, match="several runs"):
        load_run(tmp_path)


# --- summary numbers -------------------------------------------------------------------------


def test_summary_table_means_the_last_five_values(tmp_path: Path) -> None:
    table = summary_table(load_run(small_run(tmp_path / "r")))
    # Failed round 5 made no model: the last five federated values are rounds 2, 3, 4, 6, 7.
    assert table["federated"] == pytest.approx((0.5 + 0.6 + 0.7 + 0.8 + 0.9) / 5)
    assert table["centralised"] == pytest.approx(0.9 + 0.05)  # rounds 3..7
    assert table["non_participant"] == pytest.approx(0.5 + 0.05)
    # dev000: rounds 3..7 -> 0.5; dev001 -> 0.25; dev002 only trained in 1..5 -> 0.06.
    assert table["device_local_median"] == pytest.approx(0.25)


def test_summary_table_without_baselines_or_accuracy(tmp_path: Path) -> None:
    table = summary_table(load_run(small_run(tmp_path / "r", baselines=False)))
    assert table["federated"] == pytest.approx(0.7)
    assert table["centralised"] is None
    assert table["non_participant"] is None
    assert table["device_local_median"] is None
    bare = write_run(tmp_path / "bare", _summary(), [_round(1, None, None)])
    assert summary_table(load_run(bare))["federated"] is None


# --- rendering -------------------------------------------------------------------------------


def test_single_run_report_is_a_png_and_a_self_contained_page(tmp_path: Path) -> None:
    run_dir = small_run(tmp_path / "r", "iid", baselines=False)
    png, page_path = render_report(run_dir)
    assert (png, page_path) == (run_dir / "report.png", run_dir / "report.html")
    width, height = png_size(png)
    assert 700 <= width <= 1400 and 600 <= height <= 1400
    page = page_path.read_text()
    assert _embedded_png(page) == png.read_bytes()
    assert (
        "<title>fedge sim: 3 devices, E=1 local epochs, 7 rounds, strategy fedavg</title>" in page
    )
    assert "70.0%" in page  # federated, mean of the last five rounds
    assert "0.12 MB" not in page and "123.5 kB" in page and "2.35 MB" in page
    assert "http" not in page.replace("data:image", "")  # nothing to fetch
    assert "<script" not in page and "<link" not in page


def test_multi_scheme_report_has_one_column_per_scheme(tmp_path: Path) -> None:
    one = render_report(small_run(tmp_path / "one"), png=tmp_path / "one.png", html=tmp_path / "1")
    for name in ("iid", "dominant-0.9", "single"):
        small_run(tmp_path / "multi" / name, name.replace("-", ":"))
    (tmp_path / "multi" / "summary.json").write_text(
        json.dumps({"runs": ["iid", "dominant-0.9", "single"]})
    )
    png, page_path = render_report(tmp_path / "multi")
    (w1, h1), (w3, h3) = png_size(one[0]), png_size(png)
    assert w3 > 1.5 * w1 and h3 == h1  # wider with more panels, same rows
    page = page_path.read_text()
    assert page.index("<td>iid</td>") < page.index("<td>dominant:0.9</td>")
    assert page.index("<td>dominant:0.9</td>") < page.index("<td>single</td>")
    for value in ("70.0%", "95.0%", "55.0%", "25.0%"):  # federated, centralised, non-part., local
        assert value in page


def test_png_reads_back_as_an_image(tmp_path: Path) -> None:
    import matplotlib.image

    png, _ = render_report(small_run(tmp_path / "r"))
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] == png_size(png)[1] and pixels.shape[1] == png_size(png)[0]
    assert pixels.std() > 0.05  # not a blank canvas


def test_text_from_the_run_is_escaped(tmp_path: Path) -> None:
    _, page_path = render_report(small_run(tmp_path / "r", "<b>iid</b>"))
    page = page_path.read_text()
    assert "<b>iid</b>" not in page and "&lt;b&gt;iid&lt;/b&gt;" in page


def test_importing_the_module_does_not_import_matplotlib() -> None:
    code = "import sys, fedge.fleet.report; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- errors ----------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo[ReportError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_dir_and_empty_dir_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError) as exc:
        render_report(tmp_path / "nope")
    assert "run directory not found" in _one_line(exc)
    with pytest.raises(ReportError) as exc:
        render_report(tmp_path)
    assert "no runs in" in _one_line(exc)
    assert not (tmp_path / "report.png").exists()


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    run_dir = small_run(tmp_path / "r")
    lines = (run_dir / "rounds.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]  # a truncated write
    (run_dir / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError) as exc:
        render_report(tmp_path)
    assert f"{run_dir / 'rounds.jsonl'}:3: malformed JSON" in _one_line(exc)
    (run_dir / "rounds.jsonl").write_text('{"round": "one", "status": "done"}\n')
    with pytest.raises(ReportError) as exc:
        load_run(run_dir)
    assert "rounds.jsonl:1: 'round' must be an integer" in _one_line(exc)


def test_malformed_baselines_and_summary(tmp_path: Path) -> None:
    run_dir = small_run(tmp_path / "r")
    (run_dir / "baselines.jsonl").write_text('{"round": 1}\n[1, 2]\n')
    with pytest.raises(ReportError) as exc:
        load_run(run_dir)
    assert "baselines.jsonl:2: expected a JSON object" in _one_line(exc)
    (run_dir / "baselines.jsonl").unlink()
    (run_dir / "summary.json").write_text('{"devices": 3,\n "epochs": }')
    with pytest.raises(ReportError) as exc:
        load_run(run_dir)
    assert "summary.json:2: malformed JSON" in _one_line(exc)


# --- a realistic run, for looking at -------------------------------------------------------


def write_realistic_run(out: Path, *, devices: int = 10, rounds: int = 50, seed: int = 0) -> Path:
    """Three partition schemes shaped like real digits training (used to eyeball the PNG)."""
    rng = np.random.default_rng(seed)
    schemes = {  # folder: (partition, federated ceiling, speed, local accuracy, noise)
        "iid": ("iid", 0.955, 4.0, 0.90, 0.004),
        "dominant-0.9": ("dominant:0.9", 0.90, 9.0, 0.42, 0.012),
        "single": ("single", 0.80, 16.0, 0.11, 0.025),
    }
    ids = [f"dev{i:03d}" for i in range(devices)]
    for folder, (partition, ceiling, speed, local_acc, noise) in schemes.items():
        rows, base = [], []
        for n in range(1, rounds + 1):
            progress = 1 - math.exp(-n / speed)
            participants = sorted(
                rng.choice(ids, size=int(rng.integers(7, devices + 1)), replace=False)
            )
            acc = 0.1 + (ceiling - 0.1) * progress + rng.normal(0, noise)
            loss = 0.12 + 2.2 * (1 - progress) ** 1.5 + (1 - ceiling) + rng.normal(0, noise)
            failed = folder == "dominant-0.9" and n in (23, 24)
            rows.append(
                {
                    "round": n,
                    "status": "failed" if failed else "done",
                    "participants": list(participants),
                    "bytes_received": int(19_700 * len(participants) * (0.5 if failed else 1)),
                    "duration_s": 0.1,
                    **({} if failed else {"accuracy": acc, "loss": loss}),
                }
            )
            local = {}
            for dev in participants:
                la = local_acc * (0.3 + 0.7 * progress) + rng.normal(0, 0.03 + noise)
                ll = 0.2 + (2.5 - 2.0 * local_acc) * (1.2 - 0.5 * progress) + rng.normal(0, 0.1)
                local[dev] = {"accuracy": float(np.clip(la, 0, 1)), "loss": max(ll, 0.05)}
            central = 0.1 + 0.875 * (1 - math.exp(-n / 2.5))
            base.append(
                {
                    "round": n,
                    "centralised": {"accuracy": central, "loss": 0.07 + 2.2 * math.exp(-n / 2.5)},
                    "non_participant": {"accuracy": acc - 0.03, "loss": loss * 1.15},
                    "local": local,
                }
            )
        done = [r for r in rows if r["status"] == "done"]
        summary = {
            "devices": devices,
            "epochs": 1,
            "rounds_requested": rounds,
            "rounds_completed": len(done),
            "partition": partition,
            "strategy": "fedavg",
            "seed": seed,
            "final_accuracy": done[-1]["accuracy"],
            "bytes_up": sum(r["bytes_received"] for r in rows) + 5_000,
            "bytes_down": 21_000 * devices * rounds,
        }
        write_run(out / folder, summary, rows, base)
    (out / "summary.json").write_text(json.dumps({"runs": list(schemes)}))
    return out


def test_realistic_run_renders(tmp_path: Path) -> None:
    png, page_path = render_report(write_realistic_run(tmp_path / "run"))
    width, height = png_size(png)
    assert width > 1500 and height > 800
    assert page_path.stat().st_size > png.stat().st_size


# --- field runs: an aggregator's state directory ----------------------------------------------

REASONS = ("battery_low", "budget_exhausted", "busy")


def write_field_run(
    path: Path,
    *,
    devices: int = 20,
    rounds: int = 10,
    accuracy: bool = True,
    seed: int = 0,
    fleet: str | None = None,
    fed_eval: bool = False,
) -> Path:
    """Lines as ``aggregator.coordinator`` writes them: skips with reasons, a device that is
    always missing (the last), round 4 failed; no summary.json, an aggregator.sqlite. With
    ``fed_eval`` the devices score the round's starting model at 0.02 below its held-out
    accuracy."""
    rng = np.random.default_rng(seed)
    ids = [f"pi-{i:02d}" for i in range(devices)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "aggregator.sqlite").write_bytes(b"")
    rows = []
    for n in range(1, rounds + 1):
        selected = sorted(rng.choice(ids[:-1], size=int(devices * 0.7), replace=False))
        selected = sorted([*selected, ids[-1]])
        skipped = sorted(d for d in selected[:-1] if rng.random() < 0.15)
        reasons = {d: REASONS[int(rng.integers(len(REASONS)))] for d in skipped}
        missing = [ids[-1]] + ([selected[0]] if n == 6 and selected[0] not in skipped else [])
        participants = [d for d in selected if d not in skipped and d not in missing]
        up = {d: 19_700 for d in participants} | {d: 60 for d in skipped}
        row: dict[str, object] = {
            "round": n,
            "status": "failed" if n == 4 else "done",
            "model_version": n - (n >= 4),  # failed round 4 made none
            "selected": len(selected),
            "participants": participants,
            "skipped": skipped,
            "missing": sorted(missing),
            "bytes_received": sum(up.values()),
            "bytes_up_by_device": dict(sorted(up.items())),
            "bytes_down_per_device": 196_000,
            "duration_s": 30.0,
        }
        if fleet is not None:
            row["fleet"] = fleet
        if n == 4:
            row["why"] = "only 2 of 14 devices answered (quorum 8)"
        else:
            weights = {d: int(rng.integers(80, 400)) for d in participants}
            row |= {
                "skip_reasons": dict(Counter(reasons.values())),
                "num_samples": sum(weights.values()),
                "weights": dict(sorted(weights.items())),
                "samples_clipped": {},
                "train_loss": 1.5 / n,
            }
            if accuracy:
                row |= {"accuracy": 0.3 + 0.06 * n, "loss": 2.0 / n}
            if fed_eval:
                version = n - 1 - (n >= 5)  # the model the round was announced with
                row["fed_eval"] = {
                    "model_version": version,
                    "devices": len(participants),
                    "count": 10 * len(participants),
                    "loss": 2.2 / n,
                    "accuracy": 0.28 + 0.06 * (n - 1 if n != 5 else 3),
                }
        rows.append(row)
    _write_jsonl(path / "rounds.jsonl", rows)
    return path


def test_grid_cells_are_what_the_lines_say(tmp_path: Path) -> None:
    run_dir = tmp_path / "field"
    run_dir.mkdir()
    lines = [
        {"round": 1, "status": "done", "selected": 4, "participants": ["a", "b"],
         "skipped": ["c"], "skip_reasons": {"battery_low": 1}, "missing": ["d"],
         "weights": {"a": 100, "b": 50}, "bytes_up_by_device": {"a": 900, "b": 800, "c": 40},
         "bytes_down_per_device": 5000},
        {"round": 2, "status": "failed", "why": "no quorum", "selected": 3,
         "participants": ["a"], "skipped": ["b", "e"], "missing": ["c"],
         "bytes_up_by_device": {"a": 700}, "bytes_down_per_device": 5000},
        {"round": 3, "status": "done", "selected": 2, "participants": [], "skipped": ["a", "b"],
         "skip_reasons": {"busy": 1, "battery_low": 1}, "missing": [],
         "bytes_down_per_device": 6000},
    ]  # fmt: skip
    _write_jsonl(run_dir / "rounds.jsonl", lines)
    grid = device_grid(load_run(run_dir).rounds)
    assert grid.devices == ("a", "b", "c", "d", "e")
    assert grid.rounds == (1, 2, 3) and grid.failed == (2,)
    assert grid.cell("a", 1).kind == TRAINED and grid.cell("a", 1).weight == 100
    assert grid.cell("a", 1).bytes_up == 900
    assert (grid.cell("c", 1).kind, grid.cell("c", 1).reason) == (SKIPPED, "battery_low")
    assert grid.cell("d", 1).kind == MISSING
    assert grid.cell("e", 1).kind == NOT_SELECTED and grid.cell("d", 2).kind == NOT_SELECTED
    assert grid.cell("a", 2).kind == TRAINED and grid.cell("a", 2).weight is None
    assert (grid.cell("b", 2).kind, grid.cell("b", 2).reason) == (SKIPPED, None)
    assert grid.cell("c", 2).kind == MISSING
    # Two reasons among two skips: the line does not say whose is whose.
    assert grid.cell("a", 3).reason == "battery_low or busy"
    assert grid.bytes_up == {"a": 1600, "b": 800, "c": 40, "d": 0, "e": 0}
    # Every selected device receives the model, missing ones included.
    assert grid.bytes_down == {"a": 16000, "b": 16000, "c": 10000, "d": 5000, "e": 5000}


def test_quiet_devices_cells_and_bytes(tmp_path: Path) -> None:
    """A quiet device's bytes down are its inbox's; a resting one has a cell of its own, and
    a device listening to every round pays the round's download though not selected."""
    run_dir = tmp_path / "quiet"
    run_dir.mkdir()
    lines = [
        {"round": 1, "status": "done", "selected": 2, "participants": ["a"],
         "skipped": ["b"], "skip_reasons": {"small_update": 1}, "missing": [],
         "bytes_down_per_device": 5000, "bytes_down_by_device": {"a": 700, "b": 300},
         "listening": 1, "sleeping": 0},
        {"round": 2, "status": "done", "selected": 1, "participants": ["a"], "skipped": [],
         "missing": [], "bytes_down_per_device": 5000, "bytes_down_by_device": {"a": 400},
         "listening": 1, "sleeping": 1, "resting": ["b"]},
    ]  # fmt: skip
    _write_jsonl(run_dir / "rounds.jsonl", lines)
    rounds = load_run(run_dir).rounds
    assert [r.bytes_down for r in rounds] == [700 + 300 + 5000, 400 + 5000]
    grid = device_grid(rounds)
    assert grid.cell("b", 2).kind == RESTING
    assert grid.bytes_down == {"a": 1100, "b": 300}


def test_field_run_with_accuracy(tmp_path: Path) -> None:
    run_dir = write_field_run(tmp_path / "state")
    runs = load_runs(run_dir)
    assert len(runs) == 1 and runs[0].is_field and runs[0].has_devices
    assert figure_title(runs) == "field run, state: 20 devices, 10 rounds (1 failed)"
    png, page_path = render_report(run_dir)
    width, height = png_size(png)
    assert width >= 1000 and height > 1400  # the curves and the per-device view below
    page = page_path.read_text()
    assert _embedded_png(page) == png.read_bytes()
    assert "<title>field run, state: 20 devices, 10 rounds (1 failed)</title>" in page
    assert "fedge sim" not in page
    assert page.count("<tr><td>pi-") == 20  # the per-device table
    assert "skip: " in page and ">missing<" in page and "4<br>failed" in page
    assert "one model trained on all the devices" in page  # the columns are explained


def test_field_run_without_held_out_data(tmp_path: Path) -> None:
    run_dir = write_field_run(tmp_path / "state", accuracy=False, fleet="plant")
    run = load_run(run_dir)
    assert summary_table(run)["federated"] is None
    assert figure_title([run]) == "field run, fleet plant: 20 devices, 10 rounds (1 failed)"
    png, page_path = render_report(run_dir)
    _, height = png_size(png)
    with_acc, _ = render_report(
        write_field_run(tmp_path / "acc"), png=tmp_path / "a.png", html=tmp_path / "a.html"
    )
    assert height < png_size(with_acc)[1]  # no accuracy or loss rows
    assert "<tr><td>pi-00</td>" in page_path.read_text()


def test_sim_run_has_no_device_view_without_device_lines(tmp_path: Path) -> None:
    run = load_run(small_run(tmp_path / "r"))
    assert not run.is_field and not run.has_devices
    assert "fedge sim" in figure_title([run])
    _, page_path = render_report(tmp_path / "r")
    assert 'class="devices"' not in page_path.read_text()


def _fedge(*args: object) -> subprocess.CompletedProcess[str]:
    code = "import sys; from fedge.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=False
    )


def test_cli_report_exit_codes(tmp_path: Path) -> None:
    for accuracy in (True, False):
        run_dir = write_field_run(tmp_path / f"acc-{accuracy}", accuracy=accuracy)
        done = _fedge("report", run_dir)
        assert done.returncode == 0, done.stderr
        assert (run_dir / "report.png").is_file() and (run_dir / "report.html").is_file()
    small_run(tmp_path / "sim")
    assert _fedge("report", tmp_path / "sim").returncode == 0
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "nope"):
        done = _fedge("report", bad)
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_federated_evaluation_is_drawn_at_the_round_that_made_its_model(tmp_path: Path) -> None:
    run = load_run(write_field_run(tmp_path / "state", fed_eval=True))
    xs, ys = fed_eval_series(run, "accuracy")
    # round n scores the model of round n-1; round 4 failed, so round 5 scores round 3's
    assert xs == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert ys[1:] == pytest.approx([0.3 + 0.06 * x - 0.02 for x in xs[1:]])
    assert fed_eval_gap(run) == pytest.approx(0.02)  # round 1's model has no held-out score
    table = summary_table(run)
    assert table["on_devices"] == pytest.approx(np.mean([0.3 + 0.06 * x - 0.02 for x in xs[-5:]]))
    page = render_report(run.path)[1].read_text()
    assert "<dt>on devices</dt><dd>federated evaluation: " in page and "<td>2.0 pts</td>" in page


def test_federated_evaluation_without_central_held_out_data(tmp_path: Path) -> None:
    bare = write_field_run(tmp_path / "bare", accuracy=False)
    scored = write_field_run(tmp_path / "scored", accuracy=False, fed_eval=True)
    run = load_run(scored)
    table = summary_table(run)
    assert table["federated"] is None and table["on_devices"] is not None
    assert fed_eval_gap(run) is None
    png, page_path = render_report(scored)
    bare_png, _ = render_report(bare, png=tmp_path / "b.png", html=tmp_path / "b.html")
    assert png_size(png)[1] > png_size(bare_png)[1]  # the accuracy and loss rows are back
    page = page_path.read_text()
    # no held-out accuracy, so no gap; the devices' own score stands alone
    assert f"<td>{table['on_devices']:.1%}</td><td>n/a</td>" in page
