"""``fedge report RUN_DIR``: a PNG and a self-contained HTML page from a run of fedge.

A run directory is one of:

- a field run: an aggregator's state directory (``rounds.jsonl``, ``aggregator.sqlite``; no
  ``summary.json``), with accuracy (or MAE) and loss only when the aggregator had held-out data,
  and the devices' own scores (federated evaluation, ``fed_eval``) when they sent them;
- a single ``fedge sim`` run (``summary.json``, ``rounds.jsonl``, optionally ``baselines.jsonl``);
- a set of sim runs, one per partition scheme: ``summary.json`` with ``"runs": [folder, ...]``
  and one sub-folder per scheme, each a single run.

Every single run is one panel (a column) of the picture; the rows are listed in ``_ROWS`` and
drawn only when a run has their data. A report on one run whose lines name devices adds the
per-device view of ``fedge.fleet.report_devices`` below the curves.

Errors::

    ReportError (ValueError)   the run directory is missing, holds no run, or a file in it is
                               malformed (the message names the file and line)

Loading and the summary numbers are plain functions over dataclasses; matplotlib is imported
only when a picture is drawn, and never through pyplot (no global state).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import statistics
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.fleet.fed_eval import aligned, median_gap
from fedge.fleet.he_report import merge as merge_decrypted
from fedge.fleet.report_devices import (
    DEVICE_CSS,
    device_grid,
    device_table_html,
    draw_device_view,
    view_height,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, FigureBase

log = logging.getLogger("fedge.fleet")

SUMMARY = "summary.json"
ROUNDS = "rounds.jsonl"
BASELINES = "baselines.jsonl"
AGGREGATOR_STATE = "aggregator.sqlite"  # marks an aggregator's state directory
LAST_N = 5  # summary_table averages this many last values of each curve
DPI = 120

# One colour per kind of line, the same in every panel.
FEDERATED = "#1f77b4"
ON_DEVICES = "#2ca02c"
NON_PARTICIPANT = "#ff7f0e"
CENTRALISED = "black"
LOCAL = "0.35"
FAILED = "#d62728"
BYTES = "#6f9fcf"
BYTES_DOWN = "0.3"
BYTES_UP_LABEL = "uploaded: updates the aggregator received"
BYTES_DOWN_LABEL = "downloaded: model + announcement, times devices selected"

# What each kind of line means, for a reader new to federated learning (picture and page).
EXPLAINED = {
    "federated global model": "the model the fleet trains together (FedAvg of device updates)",
    # Drawn at the round that made the model the devices scored (the one before theirs).
    "federated evaluation (on devices)": "the same models, scored by the devices on data they"
    " held out",
    "centralised baseline": "one model trained on all the devices' data pooled (the ceiling)",
    "non-participant": "device 0's data only, never federated (\"alone\" in the sim's table)",
    "device-local models": 'each device\'s own model, trained on its data only ("local")',
    "failed round (no new model)": "the round ended without a new global model",
}


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message is one line."""


@dataclass(frozen=True)
class Metric:
    accuracy: float | None
    loss: float | None
    mae: float | None = None


@dataclass(frozen=True)
class Round:
    """One line of ``rounds.jsonl``: what the aggregator did in one round."""

    round: int
    status: str  # "done" (a new global model) or "failed"
    accuracy: float | None
    loss: float | None
    participants: tuple[str, ...]
    bytes_received: int | None
    duration_s: float | None
    mae: float | None = None  # a forecaster's held-out mean absolute error, instead of accuracy
    why: str | None = None  # a failed round: what went wrong
    selected: int | None = None
    skipped: tuple[str, ...] = ()
    skip_reasons: dict[str, int] = field(default_factory=dict)  # reason -> how many devices
    skip_reason_by_device: dict[str, str] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    weights: dict[str, int] = field(default_factory=dict)  # device -> its weight in the average
    bytes_up_by_device: dict[str, int] = field(default_factory=dict)
    bytes_down_per_device: int | None = None  # what each selected device had to receive
    # ...but a quiet device: what its inbox got (its catch-up and the announcement).
    bytes_down_by_device: dict[str, int] = field(default_factory=dict)
    listening: int = 0  # online devices not selected that heard the round all the same
    resting: tuple[str, ...] = ()  # quiet devices sitting out the rounds they declared
    model_version: int | None = None  # the global model after the round
    # The devices' scores of the model the round started from (absent in older lines).
    fed_eval: dict[str, float] = field(default_factory=dict)
    fleet: str | None = None  # absent in older lines
    # Differential privacy: epsilon spent up to this round, at delta (absent without DP).
    epsilon: float | None = None
    delta: float | None = None

    @property
    def bytes_down(self) -> int | None:
        """MQTT bytes the round's devices had to receive: each selected one (a quiet one
        what its inbox got), and those listening to every round though not selected."""
        if self.bytes_down_per_device is None:
            return None
        count = self.selected
        if count is None:
            count = len(set(self.participants) | set(self.skipped) | set(self.missing))
        inboxes = self.bytes_down_by_device
        return self.bytes_down_per_device * (count - len(inboxes) + self.listening) + sum(
            inboxes.values()
        )

    @property
    def done(self) -> bool:
        return self.status == "done"


@dataclass(frozen=True)
class Baseline:
    """One line of ``baselines.jsonl``: the reference models the sim evaluated in one round."""

    round: int
    centralised: Metric | None
    non_participant: Metric | None
    local: dict[str, Metric]  # device id -> its model after local training this round


@dataclass(frozen=True)
class Run:
    """One single run: one partition scheme, one panel of the report."""

    path: Path
    summary: dict[str, Any]
    rounds: tuple[Round, ...]
    baselines: tuple[Baseline, ...]

    @property
    def is_field(self) -> bool:
        """An aggregator's state directory rather than a ``fedge sim`` output folder."""
        return not self.summary

    @property
    def has_devices(self) -> bool:
        """Whether the lines say what each device did (the aggregator's lines do)."""
        return any(r.skipped or r.missing or r.bytes_up_by_device or r.weights for r in self.rounds)

    @property
    def scheme(self) -> str:
        partition = self.summary.get("partition")
        return str(partition) if partition is not None else self.path.name

    @property
    def final_accuracy(self) -> float | None:
        value = self.summary.get("final_accuracy")
        if isinstance(value, (int, float)):
            return float(value)
        done = [r.accuracy for r in self.rounds if r.done and r.accuracy is not None]
        return done[-1] if done else None


# --- loading -------------------------------------------------------------------------------


def load_run(run_dir: Path) -> Run:
    """Load one single run (a folder holding ``rounds.jsonl``)."""
    run_dir = Path(run_dir)
    _check_dir(run_dir)
    rounds_path = run_dir / ROUNDS
    if not rounds_path.is_file():
        hint = " (it holds several runs: use load_runs)" if _sub_runs(run_dir) else ""
        raise ReportError(f"no {ROUNDS} in {run_dir}{hint}")
    baselines_path = run_dir / BASELINES
    rows = list(_read_jsonl(rounds_path))
    merge_decrypted(run_dir, [obj for obj, _ in rows])  # fedge sim --he: what the sim scored
    return Run(
        path=run_dir,
        summary=_read_summary(run_dir / SUMMARY),
        rounds=tuple(_parse_round(obj, at) for obj, at in rows),
        baselines=tuple(_parse_baseline(obj, at) for obj, at in _read_jsonl(baselines_path))
        if baselines_path.is_file()
        else (),
    )


def load_runs(run_dir: Path) -> list[Run]:
    """Every run in ``run_dir``: itself if it is a single run, else one per sub-folder.

    Sub-folders come in the order of ``summary.json`` ``"runs"``, then any others by name.
    """
    run_dir = Path(run_dir)
    _check_dir(run_dir)
    if (run_dir / ROUNDS).is_file():
        return [load_run(run_dir)]
    # A set of runs lists them in its summary; without one (an empty folder) say only that.
    summary = _read_summary(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else {}
    listed = summary.get("runs", [])
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise ReportError(f"{run_dir / SUMMARY}: 'runs' must be a list of folder names")
    found = _sub_runs(run_dir)
    for name in listed:
        if name not in found:
            log.warning("run %s listed in %s has no %s; left out", name, run_dir / SUMMARY, ROUNDS)
    names = [n for n in dict.fromkeys(listed) if n in found]
    names += sorted(n for n in found if n not in names)
    if not names:
        raise ReportError(f"no runs in {run_dir}: no {ROUNDS} there or in any sub-folder")
    return [load_run(run_dir / name) for name in names]


def _check_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise ReportError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise ReportError(f"not a directory: {run_dir}")


def _sub_runs(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.is_dir() and (p / ROUNDS).is_file()}


def _read_summary(path: Path) -> dict[str, Any]:
    """``summary.json``, or ``{}`` when it is missing (a sim that stopped early)."""
    if not path.is_file():
        if not (path.parent / AGGREGATOR_STATE).exists():
            log.warning("%s is missing; the report will lack the run's settings", path)
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from exc
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return obj


def _read_jsonl(path: Path) -> Iterable[tuple[dict[str, Any], str]]:
    """Each non-blank line of ``path`` as a JSON object, with ``"file:line"`` for errors."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            at = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReportError(f"{at}: malformed JSON: {exc.msg}") from exc
            if not isinstance(obj, dict):
                raise ReportError(f"{at}: expected a JSON object")
            yield obj, at


def _parse_round(obj: dict[str, Any], at: str) -> Round:
    status = obj.get("status")
    if not isinstance(status, str):
        raise ReportError(f"{at}: 'status' must be a string")
    participants = obj.get("participants") or []
    if not isinstance(participants, list):
        raise ReportError(f"{at}: 'participants' must be a list")
    why = obj.get("why")
    dp = _mapping(obj, "privacy", at)
    return Round(
        round=_round_number(obj, at),
        status=status,
        accuracy=_number(obj, "accuracy", at),
        loss=_number(obj, "loss", at),
        participants=tuple(str(p) for p in participants),
        bytes_received=_int(obj, "bytes_received", at),
        duration_s=_number(obj, "duration_s", at),
        mae=_number(obj, "mae", at),
        why=str(why) if why is not None else None,
        selected=_int(obj, "selected", at),
        skipped=_names(obj, "skipped", at),
        skip_reasons=_ints(obj, "skip_reasons", at),
        skip_reason_by_device={
            str(k): str(v) for k, v in _mapping(obj, "skip_reason_by_device", at).items()
        },
        missing=_names(obj, "missing", at),
        weights=_ints(obj, "weights", at),
        bytes_up_by_device=_ints(obj, "bytes_up_by_device", at),
        bytes_down_per_device=_int(obj, "bytes_down_per_device", at),
        bytes_down_by_device=_ints(obj, "bytes_down_by_device", at),
        listening=_int(obj, "listening", at) or 0,
        resting=_names(obj, "resting", at),
        model_version=_int(obj, "model_version", at),
        fed_eval=_fed_eval(obj, at),
        fleet=str(obj["fleet"]) if obj.get("fleet") is not None else None,
        epsilon=_number(dp, "epsilon", f"{at} privacy"),
        delta=_number(dp, "delta", f"{at} privacy"),
    )


def _fed_eval(obj: dict[str, Any], at: str) -> dict[str, float]:
    value = _mapping(obj, "fed_eval", at)
    where = f"{at}: 'fed_eval'"
    out: dict[str, float] = {}
    for key in ("model_version", "devices", "count"):
        if (count := _int(value, key, where)) is not None:
            out[key] = count
    for key in ("loss", "accuracy", "mae"):
        if (number := _number(value, key, where)) is not None:
            out[key] = number
    return out


def _names(obj: dict[str, Any], key: str, at: str) -> tuple[str, ...]:
    value = obj.get(key) or []
    if not isinstance(value, list):
        raise ReportError(f"{at}: {key!r} must be a list")
    return tuple(str(v) for v in value)


def _mapping(obj: dict[str, Any], key: str, at: str) -> dict[str, Any]:
    value = obj.get(key) or {}
    if not isinstance(value, dict):
        raise ReportError(f"{at}: {key!r} must be an object")
    return value


def _ints(obj: dict[str, Any], key: str, at: str) -> dict[str, int]:
    value = _mapping(obj, key, at)
    where = f"{at}: {key!r}"
    return {str(k): n for k, v in value.items() if (n := _int({k: v}, k, where)) is not None}


def _parse_baseline(obj: dict[str, Any], at: str) -> Baseline:
    local = obj.get("local") or {}
    if not isinstance(local, dict):
        raise ReportError(f"{at}: 'local' must be an object of device id -> metrics")
    return Baseline(
        round=_round_number(obj, at),
        centralised=_metric(obj.get("centralised"), f"{at}: 'centralised'"),
        non_participant=_metric(obj.get("non_participant"), f"{at}: 'non_participant'"),
        local={
            str(device): metric
            for device, value in sorted(local.items())
            if (metric := _metric(value, f"{at}: local {device!r}")) is not None
        },
    )


def _metric(value: object, where: str) -> Metric | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ReportError(f"{where} must be an object with accuracy and loss")
    return Metric(
        accuracy=_number(value, "accuracy", where),
        loss=_number(value, "loss", where),
        mae=_number(value, "mae", where),
    )


def _round_number(obj: dict[str, Any], at: str) -> int:
    value = obj.get("round")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ReportError(f"{at}: 'round' must be an integer")
    return value


def _number(obj: dict[str, Any], key: str, at: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ReportError(f"{at}: {key!r} must be a number")
    return float(value) if math.isfinite(value) else None


def _int(obj: dict[str, Any], key: str, at: str) -> int | None:
    value = _number(obj, key, at)
    return None if value is None else int(value)


# --- the curves and the summary numbers (pure) ---------------------------------------------

Series = tuple[list[int], list[float]]


def federated_series(run: Run, key: str) -> Series:
    """``key`` ("accuracy" or "loss") of the global model, for each round that made one."""
    points = [(r.round, getattr(r, key)) for r in run.rounds if r.done]
    return _unzip((x, y) for x, y in points if y is not None)


def fed_eval_series(run: Run, key: str) -> Series:
    """``key`` of the devices' scores (federated evaluation), each at the round that made the
    model they scored (``fedge.fleet.fed_eval``), like the global model's held-out score."""
    points = aligned(_lines(run), key)
    return _unzip((p.made_by, p.federated) for p in points)


def fed_eval_gap(run: Run, key: str = "accuracy") -> float | None:
    """Median |devices' score - held-out score| of the same model versions; None without both."""
    return median_gap(aligned(_lines(run), key))


def _lines(run: Run) -> list[dict[str, Any]]:
    """The fields of ``fedge.fleet.fed_eval.aligned`` as rounds.jsonl names them."""
    return [
        {
            "round": r.round,
            "status": r.status,
            "model_version": r.model_version,
            "accuracy": r.accuracy,
            "loss": r.loss,
            "mae": r.mae,
            "fed_eval": r.fed_eval,
        }
        for r in run.rounds
    ]


def baseline_series(run: Run, which: str, key: str) -> Series:
    """``key`` of the ``which`` ("centralised" or "non_participant") baseline per round."""
    metrics = ((b.round, getattr(b, which)) for b in run.baselines)
    return _unzip((x, getattr(m, key)) for x, m in metrics if m and getattr(m, key) is not None)


def local_series(run: Run, key: str) -> dict[str, Series]:
    """``key`` of each device's model after its local training, over the rounds it trained."""
    devices = sorted({d for b in run.baselines for d in b.local})
    return {
        device: _unzip(
            (b.round, getattr(b.local[device], key))
            for b in run.baselines
            if device in b.local and getattr(b.local[device], key) is not None
        )
        for device in devices
    }


def failed_rounds(run: Run) -> list[int]:
    return [r.round for r in run.rounds if not r.done]


def summary_table(run: Run) -> dict[str, float | None]:
    """Accuracy (0..1) at the end of the run: the mean of the last ``LAST_N`` values of each curve.

    Keys: ``federated``, ``centralised``, ``non_participant``, ``device_local_median`` (the
    median over devices of each device's own last-``LAST_N`` mean), ``on_devices`` (federated
    evaluation) and ``on_devices_gap`` (its median gap to ``federated`` over the same model
    versions, all rounds). None where there is no data.
    """
    locals_ = [_tail_mean(ys) for _, ys in local_series(run, "accuracy").values()]
    local_means = [m for m in locals_ if m is not None]
    return {
        "federated": _tail_mean(federated_series(run, "accuracy")[1]),
        "centralised": _tail_mean(baseline_series(run, "centralised", "accuracy")[1]),
        "non_participant": _tail_mean(baseline_series(run, "non_participant", "accuracy")[1]),
        "device_local_median": statistics.median(local_means) if local_means else None,
        "on_devices": _tail_mean(fed_eval_series(run, "accuracy")[1]),
        "on_devices_gap": fed_eval_gap(run),
    }


def _tail_mean(values: Sequence[float]) -> float | None:
    tail = values[-LAST_N:]
    return sum(tail) / len(tail) if tail else None


def _unzip(points: Iterable[tuple[int, float]]) -> Series:
    xs: list[int] = []
    ys: list[float] = []
    for x, y in points:
        xs.append(x)
        ys.append(y)
    return xs, ys


# --- the picture -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    """One row of the picture: drawn once per panel, then finished once for the whole row."""

    ylabel: str
    height: float  # relative height of the row
    has_data: Callable[[Run], bool]
    draw: Callable[[Axes, Run], None]
    finish: Callable[[Sequence[Axes]], None]


def _draw_metric(ax: Axes, run: Run, key: str, scale: float) -> None:
    for i, (xs, ys) in enumerate(local_series(run, key).values()):
        ax.plot(
            xs,
            [y * scale for y in ys],
            color=LOCAL,
            lw=0.8,
            alpha=0.3,
            label="device-local models" if i == 0 else "_nolegend_",
            zorder=1,
        )
    xs, ys = baseline_series(run, "non_participant", key)
    if xs:
        ax.plot(xs, [y * scale for y in ys], color=NON_PARTICIPANT, lw=1.6, ls="--", zorder=2)
        ax.lines[-1].set_label("non-participant")
    xs, ys = baseline_series(run, "centralised", key)
    if xs:
        ax.plot(xs, [y * scale for y in ys], color=CENTRALISED, lw=1.6, ls=":", zorder=3)
        ax.lines[-1].set_label("centralised baseline")
    xs, ys = fed_eval_series(run, key)
    if xs:
        marker = "s" if len(xs) <= 25 else None
        ax.plot(xs, [y * scale for y in ys], color=ON_DEVICES, lw=1.6, marker=marker, ms=3)
        ax.lines[-1].set_label("federated evaluation (on devices)")
        ax.lines[-1].set_zorder(3.5)
    xs, ys = federated_series(run, key)
    if xs:
        marker = "o" if len(xs) <= 25 else None
        ax.plot(xs, [y * scale for y in ys], color=FEDERATED, lw=2.4, marker=marker, ms=3.5)
        ax.lines[-1].set_label("federated global model")
        ax.lines[-1].set_zorder(4)
    failed = failed_rounds(run)
    if failed:
        # On the x axis whatever the y scale: x in data units, y in axes units.
        ax.plot(
            failed,
            [0.0] * len(failed),
            ls="none",
            marker="x",
            ms=8,
            mew=2,
            color=FAILED,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            label="failed round (no new model)",
            zorder=5,
        )
    if not ax.lines:
        ax.text(0.5, 0.5, f"no {key} recorded", transform=ax.transAxes, ha="center", color="0.4")


def _has_metric(key: str) -> Callable[[Run], bool]:
    def has(run: Run) -> bool:
        return bool(
            federated_series(run, key)[0]
            or fed_eval_series(run, key)[0]
            or baseline_series(run, "centralised", key)[0]
            or baseline_series(run, "non_participant", key)[0]
            or any(xs for xs, _ in local_series(run, key).values())
        )

    return has


def _finish_accuracy(axes: Sequence[Axes]) -> None:
    from matplotlib.ticker import PercentFormatter

    for ax in axes:
        ax.set_ylim(0, 100)
        ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))


def _finish_loss(axes: Sequence[Axes]) -> None:
    import numpy as np
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    ys = [np.asarray(line.get_ydata(), dtype=float) for ax in axes for line in ax.lines]
    positive = [float(y) for y in np.concatenate(ys) if y > 0] if ys else []
    # Log scale when the curves span more than a decade: early and late loss both stay legible.
    if positive and max(positive) / min(positive) > 10:
        for ax in axes:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())


def _draw_bytes(ax: Axes, run: Run) -> None:
    points = [(r.round, r.bytes_received / 1000, r.done) for r in run.rounds if r.bytes_received]
    down = [(r.round, r.bytes_down / 1000) for r in run.rounds if r.bytes_down]
    if not points and not down:
        ax.text(0.5, 0.5, "no bytes recorded", transform=ax.transAxes, ha="center", color="0.4")
        return
    width, shift = (0.4, 0.2) if down else (0.8, 0.0)
    if points:
        xs, kb, done = zip(*points, strict=True)
        colours = [BYTES if d else FAILED for d in done]
        ax.bar([x - shift for x in xs], kb, width=width, color=colours, label=BYTES_UP_LABEL)
    if down:
        xs, kb = zip(*down, strict=True)
        ax.bar([x + shift for x in xs], kb, width=width, color=BYTES_DOWN, label=BYTES_DOWN_LABEL)


def _finish_bytes(axes: Sequence[Axes]) -> None:
    for ax in axes:
        ax.set_ylim(bottom=0)


_ROWS: tuple[_Row, ...] = (
    _Row(
        ylabel="accuracy",
        height=3.0,
        has_data=_has_metric("accuracy"),
        draw=lambda ax, run: _draw_metric(ax, run, "accuracy", 100.0),
        finish=_finish_accuracy,
    ),
    _Row(
        ylabel="loss",
        height=2.6,
        has_data=_has_metric("loss"),
        draw=lambda ax, run: _draw_metric(ax, run, "loss", 1.0),
        finish=_finish_loss,
    ),
    _Row(
        ylabel="mean abs. error",
        height=2.6,
        has_data=_has_metric("mae"),
        draw=lambda ax, run: _draw_metric(ax, run, "mae", 1.0),
        finish=_finish_bytes,
    ),
    _Row(
        ylabel="MQTT traffic\n(kB, all devices)",
        height=1.5,
        has_data=lambda run: any(r.bytes_received or r.bytes_down for r in run.rounds),
        draw=_draw_bytes,
        finish=_finish_bytes,
    ),
)


def figure_title(runs: Sequence[Run]) -> str:
    """E.g. ``fedge sim: 10 devices, E=1 local epochs, 50 rounds, strategy fedavg``.

    A field run: ``field run, fleet F: 20 devices, 10 rounds (1 failed)`` (or the folder's
    name when rounds.jsonl does not say the fleet).
    """
    if len(runs) == 1 and runs[0].is_field:
        run = runs[0]
        name = run.path.resolve().name or str(run.path)
        failed = len(failed_rounds(run))
        seen = len(device_grid(run.rounds).devices)
        made = f"{len(run.rounds)} rounds" + (f" ({failed} failed)" if failed else "")
        fleet = next((r.fleet for r in run.rounds if r.fleet), None)
        where = f"fleet {fleet}" if fleet else name  # lines from before the fleet was kept
        return f"field run, {where}: {seen} devices, {made}"

    def values(key: str) -> str | None:
        found = [str(run.summary[key]) for run in runs if run.summary.get(key) is not None]
        return "/".join(dict.fromkeys(found)) or None

    parts = []
    if devices := values("devices"):
        parts.append(f"{devices} devices")
    if epochs := values("epochs"):
        parts.append(f"E={epochs} local epochs")
    rounds = values("rounds_requested") or values("rounds_completed")
    if rounds:
        parts.append(f"{rounds} rounds")
    if strategy := values("strategy"):
        parts.append(f"strategy {strategy}")
    if codec := values("codec"):
        gate = values("gate_threshold")
        parts.append(
            f"codec {codec}" + (f", gate {gate}" if gate and float(gate.split("/")[0]) else "")
        )
    spent = [text for run in runs if (text := privacy_spent(run))]
    if spent:
        parts.append(" / ".join(dict.fromkeys(spent)))
    return "fedge sim: " + ", ".join(parts) if parts else "fedge sim"


def privacy_spent(run: Run) -> str | None:
    """E.g. ``epsilon 7.21 at delta 1e-05 (central DP)``: after the run's last round."""
    spent = [r for r in run.rounds if r.epsilon is not None]
    if not spent:
        return None
    mode = (run.summary.get("privacy") or {}).get("mode")
    how = f" ({mode} DP)" if mode else ""
    return f"epsilon {spent[-1].epsilon:.2f} at delta {spent[-1].delta:g}{how}"


def _panel_title(run: Run) -> str:
    final = run.final_accuracy
    if final is not None:
        return f"{run.scheme}  ·  final federated accuracy {final:.1%}"
    maes = federated_series(run, "mae")[1]
    if maes:
        return f"{run.scheme}  ·  final federated MAE {maes[-1]:.4g}"
    on_devices = fed_eval_series(run, "accuracy")[1] or fed_eval_series(run, "mae")[1]
    if on_devices:
        label = "accuracy" if fed_eval_series(run, "accuracy")[1] else "MAE"
        value = f"{on_devices[-1]:.1%}" if label == "accuracy" else f"{on_devices[-1]:.4g}"
        return f"{run.scheme}  ·  {label} on devices {value}"
    if run.is_field:
        return "no held-out data: no accuracy"
    return f"{run.scheme}  ·  final federated accuracy n/a"


def draw_figure(runs: Sequence[Run]) -> Figure:
    """The report's picture: one column per run, one row per entry of ``_ROWS`` with data.

    One run whose lines name devices gets the per-device view below.
    """
    from matplotlib.figure import Figure

    rows = [row for row in _ROWS if any(row.has_data(run) for run in runs)] or list(_ROWS[:1])
    explained = _explained(runs)
    width = max(8.0, 1.2 + 4.6 * len(runs))
    curves = 1.5 + sum(row.height for row in rows) + 0.2 * len(explained)
    devices = device_grid(runs[0].rounds) if len(runs) == 1 and runs[0].has_devices else None
    if devices is None:
        fig = Figure(figsize=(width, curves), dpi=DPI, layout="constrained")
        _draw_curves(fig, runs, rows, width)
    else:
        width = max(10.0, width, 3.5 + 0.45 * len(devices.rounds))
        below = view_height(devices)
        fig = Figure(figsize=(width, curves + below), dpi=DPI, layout="constrained")
        spec = fig.add_gridspec(2, 1, height_ratios=[curves, below])
        _draw_curves(fig.add_subfigure(spec[0]), runs, rows, width)
        draw_device_view(fig.add_subfigure(spec[1]), devices)
    # About 9 bold characters per inch at 13 pt: wrap a long title instead of clipping it.
    width_chars = max(40, int(fig.get_figwidth() * 9))
    fig.suptitle(textwrap.fill(figure_title(runs), width_chars), fontsize=13, fontweight="bold")
    return fig


def _explained(runs: Sequence[Run]) -> list[str]:
    """The kinds of line the runs have, in legend order."""
    has = {
        "federated global model": any(
            federated_series(run, key)[0] for run in runs for key in ("accuracy", "loss", "mae")
        ),
        "federated evaluation (on devices)": any(
            fed_eval_series(run, key)[0] for run in runs for key in ("accuracy", "loss", "mae")
        ),
        "centralised baseline": any(
            run.baselines and any(b.centralised for b in run.baselines) for run in runs
        ),
        "non-participant": any(any(b.non_participant for b in run.baselines) for run in runs),
        "device-local models": any(any(b.local for b in run.baselines) for run in runs),
        "failed round (no new model)": any(failed_rounds(run) for run in runs),
    }
    return [label for label in EXPLAINED if has[label]]


def _draw_curves(fig: FigureBase, runs: Sequence[Run], rows: Sequence[_Row], width: float) -> None:
    from matplotlib.ticker import MaxNLocator

    grid = fig.subplots(
        len(rows),
        len(runs),
        sharex="col",
        sharey="row",
        squeeze=False,
        gridspec_kw={"height_ratios": [row.height for row in rows]},
    )
    for r, row in enumerate(rows):
        for c, run in enumerate(runs):
            ax = grid[r][c]
            row.draw(ax, run)
            ax.grid(True, color="0.9", lw=0.8)
            ax.set_axisbelow(True)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
            if c == 0:
                ax.set_ylabel(row.ylabel)
            if r == 0:
                ax.set_title(_panel_title(run), fontsize=11)
            if r == len(rows) - 1:
                ax.set_xlabel("round")
        row.finish(list(grid[r]))
    for c in range(len(runs)):  # the x axis starts at round 1, or 0 if a baseline is drawn there
        grid[0][c].set_xlim(left=min(0.5, grid[0][c].get_xlim()[0]))

    handles: dict[str, Any] = {}
    for ax in grid.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = handle
    # A label with its explanation; the bytes bars explain themselves.
    labels = [label for label in EXPLAINED if label in handles]
    texts = [f"{label}: {EXPLAINED[label]}" for label in labels]
    labels += [label for label in (BYTES_UP_LABEL, BYTES_DOWN_LABEL) if label in handles]
    texts += [label for label in (BYTES_UP_LABEL, BYTES_DOWN_LABEL) if label in handles]
    if not labels:  # nothing drawn at all (an empty run): no key to show
        return
    legend = fig.legend(
        [handles[label] for label in labels],
        texts,
        loc="outside lower center",
        ncol=1 if width < 13 else 2,
        frameon=False,
        fontsize=9,
    )
    for line in legend.get_lines():  # the grey device lines are faint; make the key readable
        line.set_alpha(1.0)


def render_png(runs: Sequence[Run]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = draw_figure(runs)
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


# --- the page ---------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: 0.3em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
caption { text-align: left; color: #555; padding-bottom: 0.4em; }
img { max-width: 100%; height: auto; }
dl.explained { color: #444; font-size: 0.9em; }
dl.explained dt { font-weight: bold; float: left; clear: left; margin-right: 0.5em; }
dl.explained dd { margin: 0 0 0.2em 0; }
"""


def render_html(runs: Sequence[Run], png: bytes) -> str:
    title = figure_title(runs)
    header = (
        "scheme",
        "devices",
        "E",
        "rounds done",
        "strategy",
        "federated",
        "centralised",
        "non-participant",
        "device-local (median)",
        "on devices",
        "gap",
        "bytes up",
        "bytes down",
        "privacy",
    )
    body = []
    for run in runs:
        s, table = dict(run.summary), summary_table(run)
        if run.is_field:  # what the aggregator's lines say instead of the sim's summary
            s["devices"] = len(device_grid(run.rounds).devices)
            s["rounds_completed"] = sum(r.done for r in run.rounds)
            s["rounds_requested"] = len(run.rounds)
            s["bytes_up"] = sum(r.bytes_received or 0 for r in run.rounds)
            s["bytes_down"] = sum(r.bytes_down or 0 for r in run.rounds)
        requested = s.get("rounds_requested")
        rounds = _text(s.get("rounds_completed")) + (f" / {requested}" if requested else "")
        cells = (
            run.scheme,
            _text(s.get("devices")),
            _text(s.get("epochs")),
            rounds,
            _text(s.get("strategy")),
            _percent(table["federated"]),
            _percent(table["centralised"]),
            _percent(table["non_participant"]),
            _percent(table["device_local_median"]),
            _percent(table["on_devices"]),
            _points(table["on_devices_gap"]),
            _bytes(s.get("bytes_up")),
            _bytes(s.get("bytes_down")),
            privacy_spent(run) or "off",
        )
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    caption = f"Accuracy: mean of the last {LAST_N} rounds of each curve."
    image = base64.b64encode(png).decode("ascii")
    columns = {
        "federated": EXPLAINED["federated global model"],
        "centralised": EXPLAINED["centralised baseline"],
        "non-participant": EXPLAINED["non-participant"],
        "device-local (median)": "the median over devices of "
        + EXPLAINED["device-local models"].replace(' ("local")', ""),
        "on devices": "federated evaluation: the global model scored by the selected devices on"
        " the newest examples they held out of training, weighted by how many each scored (a"
        " round's devices score the model the round before made; the picture draws each score at"
        " the round that made its model)",
        "gap": "the median, over rounds, of how far the devices' accuracy is from the held-out"
        " accuracy of the same model version (percentage points)",
        "bytes up / down": "MQTT bytes of the updates received / of what the selected devices "
        "had to download (the global model and the round's announcement)",
        "privacy": "differential privacy: epsilon spent by the end of the run at the configured"
        " delta, by dp-accounting (docs/privacy.md); off: no differential privacy",
    }
    legend = "\n".join(
        f"<dt>{html.escape(name)}</dt><dd>{html.escape(text)}</dd>"
        for name, text in columns.items()
    )
    devices = ""
    if len(runs) == 1 and runs[0].has_devices:
        why = {r.round: r.why for r in runs[0].rounds if r.why}
        devices = device_table_html(device_grid(runs[0].rounds), why)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_CSS}{DEVICE_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{html.escape(title)}</h1>",
            f"<table>\n<caption>{html.escape(caption)}</caption>",
            f"<thead>{head}</thead>",
            "<tbody>",
            *body,
            "</tbody>\n</table>",
            f'<dl class="explained">\n{legend}\n</dl>',
            f'<img src="data:image/png;base64,{image}" alt="{html.escape(title)}: accuracy, '
            'loss and bytes per round">',
            devices,
            "</body>",
            "</html>",
            "",
        ]
    )


def _text(value: object) -> str:
    return "n/a" if value is None else str(value)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} pts"


def _bytes(value: object) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    return f"{value / 1e6:.2f} MB" if value >= 1e6 else f"{value / 1e3:.1f} kB"


def render_report(
    run_dir: Path, *, png: Path | None = None, html: Path | None = None
) -> tuple[Path, Path]:
    """Write the report of ``run_dir``; defaults ``RUN_DIR/report.png`` and ``report.html``."""
    run_dir = Path(run_dir)
    runs = load_runs(run_dir)
    png_path = Path(png) if png is not None else run_dir / "report.png"
    html_path = Path(html) if html is not None else run_dir / "report.html"
    image = render_png(runs)
    png_path.write_bytes(image)
    html_path.write_text(render_html(runs, image), encoding="utf-8")
    return png_path, html_path
