"""The selected run's curves, with other runs overlaid on the same axes.

By default, the charts of the selected run's stage: loss for SFT, accuracy for RM; for RL the reward
model's score (proxy) beside the gold judge's on held-out prompts, the KL to the reference, and the
KL coefficient, so the moment the proxy keeps rising while gold falls (reward over-optimisation)
shows on one chart. The metric picker (``pick``) replaces them with one chart per picked metric,
any metric the runs logged. Runs marked for comparison (``show_runs``) draw the same metrics on the
same axes. Every line of a chart has its own marker and a legend entry naming its run or metric,
so the charts read without colour; ``smoothing`` is TensorBoard's (an EMA), named in each title.

Records arrive in batches (``add``); each series keeps at most ``MAX_POINTS`` points (halving its
resolution when full, so a long run keeps its whole shape) and the charts are redrawn only when
something changed. textual-plotext is imported when the first chart is made, not at start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from oatui.app.metrics import (
    MAX_POINTS,
    SMOOTHING_LEVELS,
    RunMetrics,
    Series,
    chart_points,
    format_tick,
    metric_names,
    smooth,
    ticks,
)
from oatui.app.widgets.gpu_panel import short_run_id

__all__ = ["CHARTS", "MAX_POINTS", "MARKERS", "RunCurves", "Series", "chart_points"]

#: Charts per stage: (title, metric names drawn on it).
CHARTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "sft": (("loss", ("train/loss", "eval/loss")),),
    "rm": (("accuracy", ("rm/accuracy", "rm/train_accuracy")), ("loss", ("train/loss", "eval/loss"))),
    "rl": (("proxy (RM score) and gold", ("ppo/score_mean", "eval/proxy", "eval/gold")),
           ("KL", ("ppo/kl", "eval/kl")), ("KL coef", ("ppo/kl_coef",))),
}

#: The markers of a chart's lines, in order: no two lines of a chart look alike without colour.
MARKERS = ("•", "+", "x", "o", "*", "#", "%", "@", "=", "~")

#: Ticks on each axis (a chart is a few rows high at 120x40).
Y_TICKS = 4
X_TICKS = 5


class RunCurves(Vertical):
    """The charts of the selected run, other runs overlaid."""

    ALLOW_MAXIMIZE = True
    can_focus = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.run_id: str | None = None
        self.stage: str | None = None
        #: The runs drawn: the selected one first, then those marked for comparison.
        self.runs: dict[str, RunMetrics] = {}
        #: Metrics picked by the user; empty: the default charts of the selected run's stage.
        self.picked: tuple[str, ...] = ()
        self.smoothing = 0.0
        self._plots: list[Any] = []
        self._charts: tuple[tuple[str, tuple[str, ...]], ...] = ()
        self._dirty = False
        # Children are reached by reference: a message may arrive while the app tears them down.
        self._status = Static("", id="curves-status")
        self._empty = Static("Select a run to see its curves.", id="curves-empty", classes="placeholder")

    def compose(self) -> ComposeResult:
        yield self._status
        yield self._empty

    @property
    def series(self) -> dict[str, Series]:
        """The selected run's series, by metric name."""
        run = self.runs.get(self.run_id or "")
        return run.series if run is not None else {}

    def metric_names(self) -> list[str]:
        """Every metric the drawn runs have logged so far: what the picker offers."""
        return metric_names(self.runs.values())

    def start(self, run_id: str | None, stage: str | None) -> None:
        """Show another run, alone."""
        self.show_runs(None if run_id is None else (run_id, stage), ())

    def show_runs(self, selected: tuple[str, str | None] | None, others: Sequence[tuple[str, str | None]]) -> None:
        """Draw ``selected`` (run id, stage) with ``others`` overlaid. Runs already drawn keep their
        points; the others start empty (their records come from the start of their file)."""
        self.run_id, self.stage = selected if selected is not None else (None, None)
        wanted = [] if selected is None else [selected, *[run for run in others if run[0] != selected[0]]]
        runs = {}
        for run_id, stage in wanted:
            kept = self.runs.get(run_id)
            runs[run_id] = kept if kept is not None else RunMetrics(run_id, stage)
        self.runs = runs
        self._layout()

    def add(self, records: list[dict[str, Any]], run_id: str | None = None) -> None:
        """New records of ``run_id`` (default: the selected run)."""
        run = self.runs.get(run_id or self.run_id or "")
        if run is not None and run.add(records):
            self._dirty = True
        if self._dirty:
            self.redraw()

    def pick(self, names: Sequence[str]) -> None:
        """Draw one chart per metric of ``names``; none: the default charts again."""
        self.picked = tuple(dict.fromkeys(names))
        self._layout()

    def step_smoothing(self, direction: int) -> float:
        """One level more (1) or less (-1) smoothing; returns the new weight."""
        levels = SMOOTHING_LEVELS
        if direction > 0:
            self.smoothing = next((level for level in levels if level > self.smoothing), levels[-1])
        else:
            self.smoothing = next((level for level in reversed(levels) if level < self.smoothing), levels[0])
        self._dirty = True
        self.redraw()
        return self.smoothing

    def charts(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        if self.run_id is None:
            return ()
        if self.picked:
            return tuple((name, (name,)) for name in self.picked)
        return CHARTS.get(self.stage or "", ())

    def _layout(self) -> None:
        charts = self.charts()
        if len(charts) != len(self._plots):
            for plot in self._plots:
                plot.remove()
            self._plots = []
            if charts:
                from textual_plotext import PlotextPlot

                self._plots = [PlotextPlot(classes="curve") for _ in charts]
                self.mount_all(self._plots)
        self._charts = charts
        self._dirty = True
        self.redraw()

    def _status_text(self) -> str:
        if self.run_id is None:
            return ""
        overlaid = len(self.runs) - 1
        runs = f"{len(self.runs)} runs" if overlaid else "1 run"
        return f"{runs} · x: step · smoothing {self.smoothing:g} · / metrics  [ ] smoothing  m compare"

    def redraw(self) -> None:
        self._dirty = False
        status = self._status
        status.update(self._status_text())
        status.display = self.run_id is not None
        empty = self._empty
        if not self._charts:
            empty.update("Select a run to see its curves." if self.run_id is None else "No curves for this run.")
            empty.display = True
            return
        drawn = {name for _, names in self._charts for name in names}
        has_points = any(run.series[name].steps for run in self.runs.values() for name in drawn if name in run.series)
        empty.update("No metrics yet." if not self.picked else "No points yet for the picked metrics.")
        empty.display = not has_points
        for plot, (title, names) in zip(self._plots, self._charts):
            self._draw(plot, title, names)

    def _draw(self, plot: Any, title: str, names: tuple[str, ...]) -> None:
        lines = [(run, name, run.series[name]) for run in self.runs.values() for name in names
                 if name in run.series and run.series[name].steps]
        several_runs = len({run.run_id for run, _, _ in lines}) > 1
        several_names = len({name for _, name, _ in lines}) > 1
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(f"{title} · smoothing {self.smoothing:g}")
        low = high = first = last = None
        for position, (run, name, series) in enumerate(lines):
            if several_runs and several_names:
                label = f"{short_run_id(run.run_id)} {name}"  # the full ids would hide the lines
            elif several_runs:
                label = run.run_id
            else:
                label = name
            values = smooth(series.values, self.smoothing)
            plt.plot(series.steps, values, label=label, marker=MARKERS[position % len(MARKERS)])
            finite = [value for value in values if abs(value) < 1e300]
            if finite:
                low = min(finite) if low is None else min(low, min(finite))
                high = max(finite) if high is None else max(high, max(finite))
            first = series.steps[0] if first is None else min(first, series.steps[0])
            last = series.steps[-1] if last is None else max(last, series.steps[-1])
        if low is not None and high is not None:
            y_ticks = ticks(low, high, Y_TICKS)
            plt.yticks(y_ticks, [format_tick(value) for value in y_ticks])
        if first is not None and last is not None:
            x_ticks = [value for value in ticks(first, last, X_TICKS) if value == int(value)] or [first]
            plt.xticks(x_ticks, [format_tick(value) for value in x_ticks])
        # No frame and no "step" label (the status line says it): at 120x40 a chart is a few rows
        # high, and each of those is worth a row of data.
        plt.frame(False)
        plot.refresh()
