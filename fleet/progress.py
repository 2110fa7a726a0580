"""A progress bar and a per-round table for ``fedge sim`` (rich)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RoundDisplay:
    def __init__(
        self, rounds: int, *, enabled: bool = True, console: Console | None = None
    ) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=False)
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

    def round_done(self, summary: dict) -> None:
        if not self.enabled:
            return
        if not self._header_done:
            self.progress.console.print(
                f"{'round':>5} {'status':>7} {'devices':>7} {'accuracy':>8} {'loss':>7} "
                f"{'KB up':>8} {'seconds':>7}"
            )
            self._header_done = True
        acc = summary.get("accuracy")
        loss = summary.get("loss")
        self.progress.console.print(
            f"{summary['round']:>5} {summary['status']:>7} "
            f"{len(summary['participants']):>3}/{summary['selected']:<3} "
            f"{'' if acc is None else f'{acc:8.2%}':>8} "
            f"{'' if loss is None else f'{loss:7.4f}':>7} "
            f"{summary['bytes_received'] / 1024:8.1f} {summary['duration_s']:7.2f}"
        )
        if summary["status"] == "done":
            self.progress.update(
                self.task, advance=1, acc="" if acc is None else f"accuracy {acc:.2%}"
            )
