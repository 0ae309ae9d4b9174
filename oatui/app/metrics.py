"""The curves' data: every numeric metric of a run's ``metrics.jsonl`` as (step, value) series,
TensorBoard's smoothing, and axis ticks short enough for a terminal.

Plain Python (no textual): the records come from ``MetricsFollower`` (``follow.py``) in the runs
worker; the Curves tab keeps one ``RunMetrics`` per run it draws and asks it for series and names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

MAX_POINTS = 1000

#: Keys of every record that are not metrics.
RECORD_KEYS = frozenset({"step", "total_steps", "time"})

#: The smoothing weights the keys step through (TensorBoard's slider goes from 0 to 0.999).
SMOOTHING_LEVELS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


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
    """Add the metrics of ``records`` to ``series`` (those it holds); returns the names that changed."""
    changed = set()
    for record in records:
        step = record.get("step")
        if not _number(step):
            continue
        for name, target in series.items():
            value = record.get(name)
            if _number(value):
                target.add(float(step), float(value))
                changed.add(name)
    return changed


class RunMetrics:
    """Every numeric metric one run has logged so far, in the order the run first logged them."""

    def __init__(self, run_id: str, stage: str | None, limit: int = MAX_POINTS) -> None:
        self.run_id = run_id
        self.stage = stage
        self.limit = limit
        self.series: dict[str, Series] = {}

    def add(self, records: Iterable[dict[str, Any]]) -> set[str]:
        """Add records (as ``MetricsWriter`` writes them); returns the metric names that changed."""
        changed = set()
        for record in records:
            step = record.get("step")
            if not _number(step):
                continue
            for name, value in record.items():
                if name in RECORD_KEYS or not _number(value):
                    continue
                target = self.series.get(name)
                if target is None:
                    target = self.series[name] = Series(self.limit)
                target.add(float(step), float(value))
                changed.add(name)
        return changed

    def names(self) -> list[str]:
        return list(self.series)


def metric_names(runs: Iterable[RunMetrics]) -> list[str]:
    """The metric names of ``runs``, sorted, each once (``eval/gold`` before ``ppo/kl``)."""
    return sorted({name for run in runs for name in run.series})


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with ``weight`` (0: the raw values),
    debiased so that the first points are not pulled towards zero."""
    if weight <= 0 or not values:
        return list(values)
    smoothed = []
    last = 0.0
    count = 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)  # shown as it is, and kept out of the average
            continue
        last = last * weight + (1 - weight) * value
        count += 1
        smoothed.append(last / (1 - weight ** count))
    return smoothed


def format_tick(value: float) -> str:
    """A tick label of at most about six characters: 0.25, 1.2e-05, 3.4k, 120."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e4:
        for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if magnitude >= size:
                return f"{value / size:.3g}{suffix}"
    if magnitude < 1e-3:
        return f"{value:.1e}".replace("e-0", "e-")
    return f"{value:.3g}"


def ticks(low: float, high: float, count: int = 4) -> list[float]:
    """About ``count`` round values (1, 2 or 5 times a power of ten apart) covering ``low``..``high``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(factor * power for factor in (1, 2, 2.5, 5, 10) if factor * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    values = []
    value = first
    while value <= high + step * 1e-9:
        values.append(0.0 if abs(value) < step * 1e-9 else value)
        value = first + step * len(values)
    return values
