"""The per-device view of ``fedge report``: what each device did in each round.

``device_grid`` turns the aggregator's round lines into a device x round grid of cells (pure);
``draw_device_view`` draws it into a matplotlib (sub)figure and ``device_table_html`` writes it
as an HTML table. A cell is one of:

    trained        the device's update went into the round's average (with its sample weight)
    skipped        the device answered with a skip notice (its reason, when the line says)
    missing        selected, but nothing arrived before the deadline
    resting        a quiet device sitting out the rounds it declared (docs/bandwidth.md)
    not selected   the aggregator did not ask the device this round

A failed round (no new model) keeps its cells and is marked as a whole. Bytes down: every
selected device has to receive ``bytes_down_per_device`` for each round it is selected in.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from matplotlib.figure import FigureBase
    from matplotlib.patches import Rectangle

TRAINED = "trained"
SKIPPED = "skipped"
MISSING = "missing"
NOT_SELECTED = "not selected"
RESTING = "resting"

# Light to dark they stay apart in grey too (luminance about 0.27, 0.60, 0.82, 1.0), and
# missing and skipped cells carry a mark as well.
CELL_COLOURS = {
    TRAINED: "#1f4e79",
    MISSING: "#e07b7b",
    SKIPPED: "#f6d55c",
    NOT_SELECTED: "#ffffff",
    RESTING: "#d9e6f2",
}
CELL_EXPLAINED = {
    TRAINED: "trained: its update is in the average (number: its sample weight)",
    SKIPPED: "skipped: sent a skip notice (letter: the reason, below)",
    MISSING: "missing: selected, nothing arrived in time (x)",
    NOT_SELECTED: "not selected this round",
    RESTING: "resting: a quiet device sitting out the rounds it declared",
}
FAILED_COLOUR = "#d62728"
UP_COLOUR = "#6f9fcf"
DOWN_COLOUR = "0.3"
MAX_ANNOTATED_CELLS = 1200  # more cells than this: no numbers or letters in them


class RoundLine(Protocol):
    """What the grid needs of one ``rounds.jsonl`` line (``fedge.fleet.report.Round``)."""

    @property
    def round(self) -> int: ...
    @property
    def done(self) -> bool: ...
    @property
    def participants(self) -> tuple[str, ...]: ...
    @property
    def skipped(self) -> tuple[str, ...]: ...
    @property
    def skip_reasons(self) -> dict[str, int]: ...
    @property
    def skip_reason_by_device(self) -> dict[str, str]: ...
    @property
    def missing(self) -> tuple[str, ...]: ...
    @property
    def weights(self) -> dict[str, int]: ...
    @property
    def bytes_up_by_device(self) -> dict[str, int]: ...
    @property
    def bytes_down_per_device(self) -> int | None: ...
    @property
    def bytes_down_by_device(self) -> dict[str, int]: ...
    @property
    def resting(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Cell:
    kind: str
    reason: str | None = None  # skipped: why; "a or b" when the round had several reasons
    weight: int | None = None  # the device's sample weight in the round's average
    bytes_up: int | None = None  # MQTT bytes the aggregator received from it this round


@dataclass(frozen=True)
class DeviceGrid:
    devices: tuple[str, ...]
    rounds: tuple[int, ...]
    failed: tuple[int, ...]
    cells: dict[tuple[str, int], Cell]
    bytes_up: dict[str, int]  # per device, over the run
    bytes_down: dict[str, int]  # per device, over the rounds it was selected in

    def cell(self, device: str, round_id: int) -> Cell:
        return self.cells.get((device, round_id), Cell(NOT_SELECTED))

    @property
    def reasons(self) -> tuple[str, ...]:
        """The skip reasons known per device (not the "a or b" of a round with several)."""
        return tuple(sorted({c.reason for c in self.cells.values() if c.reason} - {None}))


def device_grid(rounds: Sequence[RoundLine]) -> DeviceGrid:
    """The device x round grid of ``rounds`` (every device any line names, sorted)."""
    cells: dict[tuple[str, int], Cell] = {}
    bytes_up: dict[str, int] = {}
    bytes_down: dict[str, int] = {}
    devices: set[str] = set()
    for r in rounds:
        # The line counts skips per reason; with one reason it is every skipped device's.
        reason_all = " or ".join(sorted(r.skip_reasons)) or None
        selected = set(r.participants) | set(r.skipped) | set(r.missing)
        devices |= selected | set(r.bytes_up_by_device) | set(r.weights)
        for device in sorted(selected):
            if device in r.participants:
                kind, reason = TRAINED, None
            elif device in r.skipped:
                kind, reason = SKIPPED, r.skip_reason_by_device.get(device, reason_all)
            else:
                kind, reason = MISSING, None
            up = r.bytes_up_by_device.get(device)
            cells[(device, r.round)] = Cell(kind, reason, r.weights.get(device), up)
            bytes_up[device] = bytes_up.get(device, 0) + (up or 0)
            down = r.bytes_down_by_device.get(device, r.bytes_down_per_device or 0)
            bytes_down[device] = bytes_down.get(device, 0) + down
        for device in r.resting:
            devices.add(device)
            cells[(device, r.round)] = Cell(RESTING)
    return DeviceGrid(
        devices=tuple(sorted(devices)),
        rounds=tuple(r.round for r in rounds),
        failed=tuple(r.round for r in rounds if not r.done),
        cells=cells,
        bytes_up={d: bytes_up.get(d, 0) for d in sorted(devices)},
        bytes_down={d: bytes_down.get(d, 0) for d in sorted(devices)},
    )


def reason_codes(grid: DeviceGrid) -> dict[str, str]:
    """A short letter per skip reason (a, b, ...), for the cells; "?" when not known."""
    known = [reason for reason in grid.reasons if " or " not in reason]
    return {reason: chr(ord("a") + i) if i < 26 else "?" for i, reason in enumerate(known)}


def view_height(grid: DeviceGrid) -> float:
    """Inches the view needs: a row per device, plus the legend."""
    return 2.3 + max(2.0, 0.2 * len(grid.devices)) + 0.09 * len(grid.reasons)


def draw_device_view(fig: FigureBase, grid: DeviceGrid) -> None:
    """The grid (left) and each device's bytes up and down over the run (right)."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    kinds = [NOT_SELECTED, TRAINED, SKIPPED, MISSING, RESTING]
    index = {kind: i for i, kind in enumerate(kinds)}
    values = np.array(
        [[index[grid.cell(d, r).kind] for r in grid.rounds] for d in grid.devices], dtype=float
    )
    ax, bars = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3.2, 1.0]})
    cmap = ListedColormap([CELL_COLOURS[k] for k in kinds])
    x_edges = np.arange(len(grid.rounds) + 1) - 0.5
    y_edges = np.arange(len(grid.devices) + 1) - 0.5
    ax.pcolormesh(
        x_edges, y_edges, values, cmap=cmap, vmin=-0.5, vmax=len(kinds) - 0.5,
        edgecolors="0.8", linewidth=0.5,
    )  # fmt: skip
    codes = reason_codes(grid)
    if len(grid.devices) * len(grid.rounds) <= MAX_ANNOTATED_CELLS:
        size = 7 if len(grid.rounds) <= 20 else 5.5
        for y, device in enumerate(grid.devices):
            for x, round_id in enumerate(grid.rounds):
                cell = grid.cell(device, round_id)
                if cell.kind == TRAINED and cell.weight is not None:
                    text, colour = str(cell.weight), "white"
                elif cell.kind == SKIPPED:
                    text, colour = codes.get(cell.reason or "", "?"), "black"
                elif cell.kind == MISSING:
                    text, colour = "x", "black"
                else:
                    continue
                ax.text(x, y, text, ha="center", va="center", fontsize=size, color=colour)
    for x, round_id in enumerate(grid.rounds):
        if round_id in grid.failed:
            ax.add_patch(_failed_patch(x, len(grid.devices)))
    ax.set_xlim(-0.5, len(grid.rounds) - 0.5)
    ax.set_ylim(len(grid.devices) - 0.5, -0.5)  # first device on top
    step = max(1, len(grid.rounds) // 25)
    ax.set_xticks(range(0, len(grid.rounds), step))
    ax.set_xticklabels([str(grid.rounds[i]) for i in range(0, len(grid.rounds), step)])
    for label, i in zip(ax.get_xticklabels(), range(0, len(grid.rounds), step), strict=True):
        if grid.rounds[i] in grid.failed:
            label.set_color(FAILED_COLOUR)
            label.set_fontweight("bold")
    ystep = max(1, len(grid.devices) // 40)
    ax.set_yticks(range(0, len(grid.devices), ystep))
    ax.set_yticklabels([grid.devices[i] for i in range(0, len(grid.devices), ystep)], fontsize=7)
    ax.set_xlabel("round")
    ax.set_title("what each device did, per round", fontsize=11)

    ys = np.arange(len(grid.devices))
    up = [grid.bytes_up[d] / 1000 for d in grid.devices]
    down = [grid.bytes_down[d] / 1000 for d in grid.devices]
    bars.barh(ys - 0.2, up, height=0.4, color=UP_COLOUR)
    bars.barh(ys + 0.2, down, height=0.4, color=DOWN_COLOUR)
    bars.set_xlabel("MQTT kB over the run")
    bars.set_title("bytes per device", fontsize=11)
    bars.grid(True, axis="x", color="0.9")
    bars.set_axisbelow(True)
    bars.tick_params(axis="y", left=False)

    rests = any(c.kind == RESTING for c in grid.cells.values())
    handles = [
        Patch(facecolor=CELL_COLOURS[k], edgecolor="0.5", label=CELL_EXPLAINED[k])
        for k in kinds
        if k != RESTING or rests
    ]
    if grid.failed:
        handles.append(_failed_patch(0, 1, label="failed round: no new model (red round number)"))
    handles += [
        Patch(facecolor=UP_COLOUR, label="bytes per device, up: updates and skip notices sent"),
        Patch(facecolor=DOWN_COLOUR, label="down: models + announcements it had to receive"),
    ]
    labels = [str(h.get_label()) for h in handles]
    notes = [f"{code} = skipped: {reason}" for reason, code in codes.items()]
    if any(c.kind == SKIPPED and c.reason not in codes for c in grid.cells.values()):
        notes.append("? = skipped; the round had several reasons (or none), not said whose")
    labels += notes
    handles += [Patch(visible=False) for _ in notes]
    fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False, fontsize=8)


def _failed_patch(x: float, height: int, label: str = "_nolegend_") -> Rectangle:
    from matplotlib.patches import Rectangle

    return Rectangle(
        (x - 0.5, -0.5), 1.0, height, fill=False, hatch="///", edgecolor=FAILED_COLOUR,
        linewidth=1.2, label=label,
    )  # fmt: skip


def device_table_html(grid: DeviceGrid, why: dict[int, str]) -> str:
    """The grid as an HTML table: one row per device, one column per round, then totals."""
    head = ["<th>device</th>"]
    for round_id in grid.rounds:
        if round_id in grid.failed:
            title = html.escape(f"failed: {why.get(round_id, 'no new model')}", quote=True)
            head.append(f'<th class="failed" title="{title}">{round_id}<br>failed</th>')
        else:
            head.append(f"<th>{round_id}</th>")
    head += ["<th>kB up</th>", "<th>kB down</th>"]
    body = []
    for device in grid.devices:
        cells = [f"<td>{html.escape(device)}</td>"]
        for round_id in grid.rounds:
            cell = grid.cell(device, round_id)
            cells.append(f'<td class="{cell.kind.replace(" ", "-")}">{_cell_text(cell)}</td>')
        cells.append(f"<td>{grid.bytes_up[device] / 1000:.1f}</td>")
        cells.append(f"<td>{grid.bytes_down[device] / 1000:.1f}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = (
        "Per device and round: trained (sample weight, kB sent), skipped (reason), "
        "missing (selected, nothing arrived in time), blank: not selected. "
        "kB down: the global model and announcements each selected device receives."
    )
    return "\n".join(
        [
            '<table class="devices">',
            f"<caption>{html.escape(caption)}</caption>",
            "<thead><tr>" + "".join(head) + "</tr></thead>",
            "<tbody>",
            *body,
            "</tbody>",
            "</table>",
        ]
    )


DEVICE_CSS = "".join(
    f"table.devices td.{kind.replace(' ', '-')} {{ background: {colour}; }}\n"
    for kind, colour in CELL_COLOURS.items()
) + (
    "table.devices td { font-size: 0.8em; text-align: center; }\n"
    "table.devices td.trained { color: white; }\n"
    f"table.devices th.failed {{ color: {FAILED_COLOUR}; }}\n"
)


def _cell_text(cell: Cell) -> str:
    if cell.kind == TRAINED:
        parts = [f"w {cell.weight}" if cell.weight is not None else "trained"]
        if cell.bytes_up:
            parts.append(f"{cell.bytes_up / 1000:.1f} kB")
        return html.escape(" · ".join(parts))
    if cell.kind == SKIPPED:
        return html.escape(f"skip: {cell.reason}" if cell.reason else "skipped")
    if cell.kind == MISSING:
        return "missing"
    if cell.kind == RESTING:
        return "resting"
    return ""
