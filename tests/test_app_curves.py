"""The Curves tab as TensorBoard's: any logged metric picked from a filterable list (/), smoothing
([ and ]) named in each chart's title, other runs kept on the same axes (m), and a legend that names
each run with its own marker. The runs' metrics.jsonl files are written by the stages' own writer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from oatui.app.app import make_app
from oatui.app.metrics import RunMetrics, format_tick, smooth, ticks
from oatui.app.widgets.curves import MARKERS, RunCurves
from oatui.app.widgets.metric_picker import MetricPicker
from oatui.app.widgets.runs_panel import RunList
from oatui.train.common import MetricsWriter

from test_app import RECORDING, SIZE, fake_run, run, screen_text, until

SFT = "sft-20250101-000000-aaaa"
RL = "rl-20250102-000000-bbbb"


def _write_metrics(run_dir: Path, stage: str, steps: int) -> None:
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    for step in range(1, steps + 1):
        metrics: dict[str, float] = {"train/loss": 4.0 / step + (0.2 if step % 2 else -0.2),
                                     "learning_rate": 1e-5 * (1 - step / steps)}
        if stage == "rl":
            metrics.update({"ppo/score_mean": 0.1 * step, "ppo/kl": 0.01 * step, "ppo/kl_coef": 0.05,
                            "ppo/clipfrac": 0.2, "perf/tokens_per_s": 12000.0 + 40 * step})
        writer.write(step, steps, metrics)


def _workspace(workspace: Path) -> None:
    _write_metrics(fake_run(workspace, SFT, stage="sft", created=1.0e9), "sft", 30)
    _write_metrics(fake_run(workspace, RL, stage="rl", created=1.0e9 + 10), "rl", 40)


def _charts_text(app) -> str:  # noqa: ANN001
    return "\n".join(line[60:] for line in screen_text(app).splitlines())


async def _rl_selected(app: Any, pilot: Any) -> tuple[RunCurves, RunList]:
    """The curves and the runs list, once the app has selected the RL run (the newest)."""
    curves, table = app.query_one(RunCurves), app.query_one(RunList)
    await until(lambda: table.selected is not None and table.selected.id == RL, pilot, what="the RL run")
    return curves, table


def test_a_metric_picked_from_the_filtered_list_is_drawn_with_its_smoothing(workspace: Path) -> None:
    _workspace(workspace)
    app = make_app(workspace, replay=RECORDING, refresh=0.2)

    async def drive() -> None:
        async with app.run_test(size=SIZE) as pilot:
            curves, table = await _rl_selected(app, pilot)
            await until(lambda: len(curves.series.get("ppo/kl", RunMetrics("", "").series).steps) == 40
                        if "ppo/kl" in curves.series else False, pilot, what="the RL run's metrics")
            await pilot.press("v")
            await pilot.pause(0.3)
            # The default charts of an RL run, unchanged.
            assert [title for title, _ in curves.charts()] == ["proxy (RM score) and gold", "KL", "KL coef"]
            assert "KL coef · smoothing 0" in _charts_text(app)
            await pilot.press("slash")
            assert isinstance(app.screen, MetricPicker)
            picker = app.screen
            assert picker.shown == sorted(["train/loss", "learning_rate", "ppo/score_mean", "ppo/kl", "ppo/kl_coef",
                                           "ppo/clipfrac", "perf/tokens_per_s"])
            await pilot.press(*"tokens")
            await pilot.pause(0.1)
            assert picker.shown == ["perf/tokens_per_s"]
            assert "[ ] perf/tokens_per_s" in screen_text(app)
            await pilot.press("space")
            await pilot.pause(0.1)
            assert picker.picked == ["perf/tokens_per_s"], (picker.picked, picker.query_one("#metric-filter").value)
            assert "[x] perf/tokens_per_s" in screen_text(app)
            await pilot.press(*("backspace",) * 6, *"clip", "space", "enter")
            await until(lambda: not isinstance(app.screen, MetricPicker), pilot, what="the picker to close")
            assert curves.picked == ("perf/tokens_per_s", "ppo/clipfrac")
            await pilot.pause(0.3)
            text = _charts_text(app)
            assert "perf/tokens_per_s · smoothing 0" in text and "ppo/clipfrac · smoothing 0" in text
            assert "KL coef" not in text
            assert "13k" in text  # y ticks short enough to read: 13k, not 13000.0
            await pilot.press("right_square_bracket", "right_square_bracket", "right_square_bracket")
            await pilot.pause(0.3)
            assert curves.smoothing == 0.6
            assert "perf/tokens_per_s · smoothing 0.6" in _charts_text(app)
            await pilot.press("left_square_bracket")
            await pilot.pause(0.3)
            assert "perf/tokens_per_s · smoothing 0.5" in _charts_text(app)
            # ctrl+d in the picker: the stage's default charts again.
            await pilot.press("slash", "ctrl+d")
            await pilot.pause(0.3)
            assert curves.picked == () and "KL coef · smoothing 0.5" in _charts_text(app)

    run(drive())


def test_a_run_kept_with_m_is_drawn_on_the_same_axes_and_named_in_the_legend(workspace: Path) -> None:
    _workspace(workspace)
    app = make_app(workspace, replay=RECORDING, refresh=0.2)

    async def drive() -> None:
        async with app.run_test(size=SIZE) as pilot:
            curves, table = await _rl_selected(app, pilot)
            table.focus()
            await pilot.press("m")  # keep the RL run on the curves
            assert "+ " + RL in [str(table.get_row_at(i)[6]) for i in range(table.row_count)]
            await pilot.press("down")  # select the SFT run: both are drawn
            await until(lambda: list(curves.runs) == [SFT, RL], pilot, what="both runs")
            await until(lambda: all(len(run.series.get("train/loss").steps) == steps  # type: ignore[union-attr]
                                    if run.series.get("train/loss") else False
                                    for run, steps in zip(curves.runs.values(), (30, 40))),
                        pilot, what="both runs' losses")
            await pilot.press("v")
            await pilot.pause(0.3)
            text = _charts_text(app)
            # The SFT run's default chart (loss), with the RL run's loss on the same axes; each run
            # named in the legend with its own marker, so it reads without colour.
            assert "loss · smoothing 0" in text
            assert f"{MARKERS[0] * 2} {SFT}" in text and f"{MARKERS[1] * 2} {RL}" in text
            assert "2 runs" in text
            # m again on the RL run takes it off.
            await pilot.press("up", "m", "down")
            await until(lambda: list(curves.runs) == [SFT], pilot, what="the SFT run alone")
            assert not any(str(table.get_row_at(i)[6]).startswith("+ ") for i in range(table.row_count))

    run(drive())


def test_smoothing_is_tensorboards_debiased_ema() -> None:
    assert smooth([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    smoothed = smooth([2.0, 2.0, 2.0], 0.9)
    assert all(math.isclose(value, 2.0) for value in smoothed)  # debiased: no pull towards zero
    assert math.isclose(smooth([0.0, 10.0], 0.5)[1], (0.5 * 10) / (1 - 0.25))


def test_ticks_are_round_and_their_labels_short() -> None:
    assert ticks(0, 1, 4) == [0.0, 0.5, 1.0] or ticks(0, 1, 4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert ticks(3, 3) == [3]
    assert [format_tick(value) for value in (0, 0.25, 12000, 2.5e6, 1.2e-5, 120)] == \
        ["0", "0.25", "12k", "2.5M", "1.2e-5", "120"]
