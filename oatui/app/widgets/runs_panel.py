"""The runs of the workspace: stage, state, progress bar with ETA, step, elapsed time.

A run directory whose ``run.json`` cannot be read is a row of its own, state ``broken``, with the
reason in the NOTE column. Runs kept on the curves for comparison (key m) read ``+ RUN``. Cells are updated in place when the list of runs is unchanged, so the
cursor (the selected run) stays where it is.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from oatui.app.choices import STAGE_NAMES
from oatui.stages.runs import RunView
from oatui.stages.runs import format_clock as clock

BAR_WIDTH = 10
STATE_STYLES = {
    "queued": "dim",
    "running": "bold",
    "succeeded": "green",
    "failed": "bold red",
    "stopped": "yellow",
    "broken": "bold red",
}


def progress_bar(fraction: float | None, width: int = BAR_WIDTH) -> str:
    if fraction is None:
        return "·" * width + "   -"
    fraction = min(1.0, max(0.0, fraction))
    filled = int(round(fraction * width * 2))
    bar = "█" * (filled // 2) + ("▌" if filled % 2 else "")
    return f"{bar:░<{width}} {fraction * 100:3.0f}%"


#: Before the id of a run kept on the curves (key m).
COMPARED_MARK = "+ "


def run_cells(run: RunView, compared: bool = False) -> tuple[Text, ...]:
    state_style = STATE_STYLES.get(run.state, "")
    name = Text(COMPARED_MARK + run.id, style="bold") if compared else Text(run.id)
    if run.info is None:
        return (
            Text("?"),
            Text("broken", style=state_style),
            Text(""),
            Text("-"),
            Text("-"),
            Text("-"),
            name,
            Text(run.problem or "run.json cannot be read", style="red"),
        )
    steps = f"{run.step}/{run.total_steps}" if run.total_steps else "-"
    note = run.info.error or ""
    if not note and run.state == "running" and run.info.stop_requested:
        note = "stopping…"
    return (
        Text(STAGE_NAMES.get(run.stage, run.stage)),
        Text(run.state, style=state_style),
        Text(progress_bar(run.progress)),
        Text(steps, justify="right"),
        Text(clock(run.eta) if run.eta is not None else "-", justify="right"),
        Text(clock(run.elapsed), justify="right"),
        name,
        Text(note, style="red" if run.state == "failed" else ""),
    )


class RunList(DataTable):
    """One row per run, newest first; the highlighted row is the selected run."""

    COLUMNS = ("STAGE", "STATE", "PROGRESS", "STEP", "ETA", "ELAPSED", "RUN", "NOTE")
    ALLOW_MAXIMIZE = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self.runs: dict[str, RunView] = {}
        self._order: tuple[str, ...] = ()
        self._cells: dict[str, tuple[Text, ...]] = {}
        #: Runs kept on the curves (key m).
        self.compared: frozenset[str] = frozenset()

    def on_mount(self) -> None:
        for name in self.COLUMNS:
            self.add_column(name, key=name)

    @property
    def selected_id(self) -> str | None:
        if not self._order or self.row_count == 0:
            return None
        row = self.cursor_row
        return self._order[row] if 0 <= row < len(self._order) else None

    @property
    def selected(self) -> RunView | None:
        run_id = self.selected_id
        return None if run_id is None else self.runs.get(run_id)

    def show(self, runs: list[RunView]) -> None:
        self.runs = {run.id: run for run in runs}
        order = tuple(run.id for run in runs)
        cells = {run.id: run_cells(run, run.id in self.compared) for run in runs}
        if order == self._order:
            for run_id in order:
                old, new = self._cells.get(run_id), cells[run_id]
                if old == new:
                    continue
                for column, (before, after) in enumerate(zip(old or (), new)):
                    if before != after:
                        self.update_cell(run_id, self.COLUMNS[column], after,
                                         update_width=len(after) > len(before))
            self._cells = cells
            return
        selected = self.selected_id
        self.clear()
        for run_id in order:
            self.add_row(*cells[run_id], key=run_id)
        self._order = order
        self._cells = cells
        if selected in order:
            self.move_cursor(row=order.index(selected), animate=False)

    def mark(self, compared: list[str]) -> None:
        """Mark the runs kept on the curves."""
        self.compared = frozenset(compared)
        self.show(list(self.runs.values()))

    def select_run(self, run_id: str) -> bool:
        if run_id not in self._order:
            return False
        self.move_cursor(row=self._order.index(run_id), animate=False)
        return True
