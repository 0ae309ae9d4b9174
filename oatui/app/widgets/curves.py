"""The selected run's curves: loss for SFT, accuracy for RM; for RL the reward model's score (proxy)
beside the gold judge's on held-out prompts, the KL to the reference, and the KL coefficient, so the
moment the proxy keeps rising while gold falls (reward over-optimisation) shows on one chart.

Records arrive in batches (``add``); each chart keeps at most ``MAX_POINTS`` points per series
(halving its resolution when full, so a long run keeps its whole shape) and is redrawn only when
one of its series changed. textual-plotext is imported when the first chart is made, not at start.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

MAX_POINTS = 1000

#: Charts per stage: (title, metric names drawn on it).
CHARTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "sft": (("loss", ("train/loss", "eval/loss")),),
    "rm": (("accuracy", ("rm/accuracy", "rm/train_accuracy")), ("loss", ("train/loss", "eval/loss"))),
    "rl": (("proxy (RM score) and gold", ("ppo/score_mean", "eval/proxy", "eval/gold")),
           ("KL", ("ppo/kl", "eval/kl")), ("KL coef", ("ppo/kl_coef",))),
}


class Series:
    """(step, value) points of one metric, thinned to at most ``limit`` points."""

    def __init__(self, limit: int = MAX_POINTS) -> None:
        self.limit = limit
        self.steps: list[float] = []
        self.values: list[float] = []
        self._stride = 1
        self._seen = 0

    def add(self, step: float, value: float) -> None:
        self._seen += 1
        if (self._seen - 1) % self._stride:
            return
        self.steps.append(step)
        self.values.append(value)
        if len(self.steps) > self.limit:
            self.steps = self.steps[::2]
            self.values = self.values[::2]
            self._stride *= 2


def chart_points(records: list[dict[str, Any]], series: dict[str, Series]) -> set[str]:
    """Add the metrics of ``records`` to ``series``; returns the metric names that changed."""
    changed = set()
    for record in records:
        step = record.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        for name, target in series.items():
            value = record.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                target.add(float(step), float(value))
                changed.add(name)
    return changed


class RunCurves(Vertical):
    """The charts of one run's stage."""

    ALLOW_MAXIMIZE = True
    can_focus = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.run_id: str | None = None
        self.stage: str | None = None
        self.series: dict[str, Series] = {}
        self._plots: list[tuple[Any, str, tuple[str, ...]]] = []
        self._dirty = False
        # Children are reached by reference: a message may arrive while the app tears them down.
        self._empty = Static("Select a run to see its curves.", id="curves-empty", classes="placeholder")

    def compose(self) -> ComposeResult:
        yield self._empty

    def start(self, run_id: str | None, stage: str | None) -> None:
        """Show another run: its stage decides the charts."""
        self.run_id, self.stage = run_id, stage
        charts = CHARTS.get(stage or "", ())
        self.series = {name: Series() for _, names in charts for name in names}
        for plot, _, _ in self._plots:
            plot.remove()
        self._plots = []
        empty = self._empty
        if not charts:
            empty.update("Select a run to see its curves." if run_id is None else "No curves for this run.")
            empty.display = True
            return
        empty.update("No metrics yet.")
        empty.display = True
        from textual_plotext import PlotextPlot

        for title, names in charts:
            plot = PlotextPlot(classes="curve")
            self._plots.append((plot, title, names))
            self.mount(plot)
        self._dirty = True

    def add(self, records: list[dict[str, Any]]) -> None:
        if chart_points(records, self.series):
            self._dirty = True
        if self._dirty:
            self.redraw()

    def redraw(self) -> None:
        self._dirty = False
        has_points = any(series.steps for series in self.series.values())
        self._empty.display = not has_points
        for plot, title, names in self._plots:
            plt = plot.plt
            plt.clear_data()
            plt.clear_figure()
            plt.title(title)
            for name in names:
                series = self.series[name]
                if series.steps:
                    plt.plot(series.steps, series.values, label=name, marker="braille")
            plt.xlabel("step")
            plot.refresh()
