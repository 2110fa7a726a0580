"""A progress bar and a per-round table for ``fedge sim`` (rich)."""

from __future__ import annotations

import statistics
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _pct(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}%}"


class RoundDisplay:
    COLUMNS = (  # fits an 80-column terminal
        ("round", 5),
        ("status", 6),
        ("devices", 7),
        ("accuracy", 8),
        ("loss", 6),
        ("on-dev", 6),
        ("central", 7),
        ("alone", 7),
        ("local", 7),  # median over the device-local models
        ("KB up", 7),
        ("s", 4),
    )

    LEGEND = (
        "devices: uploaded of selected (the rest held back or missed it); accuracy, loss: the"
        " global model on held-out data; on-dev: the model the round started from, scored by the"
        " devices on data they held out of training;"
        " central: one model trained on all the data; alone: device 0's data only, never"
        " federated; local: median of each device's own model; KB up: update bytes received;"
        " s: round time"
    )

    def __init__(
        self, rounds: int, *, enabled: bool = True, console: Console | None = None
    ) -> None:
        self.enabled = enabled
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[acc]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("rounds", total=rounds, acc="")
        self._header_done = False

    def __enter__(self) -> RoundDisplay:
        self.progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def round_done(self, summary: dict[str, Any], baselines: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        if not self._header_done:
            self.progress.console.print(self.LEGEND, style="dim", highlight=False)
            self.progress.console.print(
                " ".join(f"{name:>{width}}" for name, width in self.COLUMNS)
            )
            self._header_done = True
        acc, loss = summary.get("accuracy"), summary.get("loss")
        central = alone = local = None
        if baselines:
            central = baselines["centralised"]["accuracy"]
            alone = baselines["non_participant"]["accuracy"]
            locals_ = [s["accuracy"] for s in baselines["local"].values()]
            local = statistics.median(locals_) if locals_ else None
        cells = [
            str(summary["round"]),
            summary["status"],
            f"{len(summary['participants'])}/{summary['selected']}",
            _pct(acc),
            "" if loss is None else f"{loss:.3f}",
            _pct((summary.get("fed_eval") or {}).get("accuracy"), 1),
            _pct(central, 1),
            _pct(alone, 1),
            _pct(local, 1),
            f"{summary['bytes_received'] / 1024:.1f}",
            f"{summary['duration_s']:.1f}",
        ]
        self.progress.console.print(
            " ".join(
                f"{cell:>{width}}" for cell, (_, width) in zip(cells, self.COLUMNS, strict=True)
            )
        )
        if summary["status"] == "done":
            self.progress.update(
                self.task, advance=1, acc="" if acc is None else f"accuracy {acc:.2%}"
            )

    def fed_eval_line(self, summary: dict[str, Any]) -> None:
        """How far the devices' scores were from the held-out score of the same models."""
        gap = summary.get("fed_eval_gap")
        if not self.enabled or gap is None:
            return
        self.progress.console.print(
            f"federated evaluation: the devices' accuracy was {100 * gap:.1f} points from the"
            f" held-out accuracy of the same model (median over {summary['fed_eval_compared']}"
            " rounds)",
            highlight=False,
        )
