"""The a key runs the whole demo flow from the app, with real stages and a real tritonserver, made
short: it asks first, then shows one line per phase as it goes, the stage runs appear in the runs
panel, the chat answer streams into the panel, and the summary table ends it; whatever the outcome,
what is shown matches it and the server the demo started is stopped. A second flow is stopped with
x while its SFT run trains: the run stops, the rest is skipped."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from oatui.app import messages as m
from oatui.app.app import make_app
from oatui.app.widgets.dialogs import ConfirmDialog
from oatui.demo import PHASES, DemoOptions
from oatui.serve.server import status
from oatui.stages.rundir import RunDir
from oatui.workspace import Workspace

from test_app import RECORDING, Recorder, run, screen_text, until

# The first test to need `trained` also builds it (a minute on an idle machine, more on a busy one).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SHORT = DemoOptions(overrides={"sft": ["max_steps=5"], "rm": ["max_steps=5"], "rl": ["total_steps=2"]},
                    held_out_prompts=2)


def _seeded(trained: Any, workspace: Path) -> Path:
    shutil.copytree(trained.tiny_base, workspace / "models" / "tiny-pythia")
    return workspace


def test_a_runs_the_demo_flow_and_shows_every_phase_and_the_summary(trained, workspace: Path) -> None:  # noqa: ANN001
    app = make_app(_seeded(trained, workspace), replay=RECORDING, refresh=0.5, demo_options=SHORT)
    recorder = Recorder(app)
    runs_seen_live: set[str] = set()

    def watch() -> bool:
        # A stage's run is in the runs panel while the demo still runs.
        for message in recorder.of(m.DemoReported):
            event = message.event
            if event.kind == "progress" and event.text.startswith("run ") and app.demo_running:
                if event.text[4:] in app.run_list.runs:
                    runs_seen_live.add(event.text[4:])
        return bool(recorder.of(m.DemoFinished))

    async def drive() -> None:
        async with app.run_test(size=(140, 50), message_hook=recorder.hook) as pilot:
            await pilot.press("a")
            assert isinstance(app.screen, ConfirmDialog)  # it asks first
            await pilot.press("y")
            panel = app.demo_panel
            assert app.demo_running and app.detail.active == "tab-demo" and app.focused is panel
            await until(lambda: "▶" in screen_text(app) and "sft" in screen_text(app), pilot, timeout=30,
                        what="the first phases to show")
            await until(watch, pilot, timeout=1200, what="the demo to finish")
            await pilot.pause(0.3)
            finished = recorder.of(m.DemoFinished)[0]
            assert finished.error is None
            results = {result.name: result for result in finished.results}
            assert list(results) == list(PHASES)
            text = screen_text(app)
            for phase in PHASES:  # one line per phase, with its state mark
                mark = {True: "✔", False: "✗", None: "–"}[results[phase].ok]
                assert any(re.search(rf"{mark}\s+{phase}\s", line) for line in text.splitlines()), (phase, text)
            # The streamed answer of the chat phase is in the panel.
            pieces = "".join(message.event.text for message in recorder.of(m.DemoReported)
                             if message.event.kind == "piece")
            assert pieces.strip() and panel.chat_text == pieces
            # The summary table is shown, as `oatui demo` prints it.
            assert str(panel.query_one("#demo-summary").render()) == finished.summary
            assert finished.summary.splitlines()[0].split() == ["phase", "result", "time", "key", "metric"]
            headline = str(panel.query_one("#demo-headline").render())
            assert "\n" not in headline and "Traceback" not in text
            if finished.succeeded:
                assert headline.startswith("✔ Demo finished: every phase succeeded") and "FAILED" not in finished.summary
                assert panel.has_class("-succeeded")
            else:
                failed = next(result for result in finished.results if result.ok is False)
                assert headline.startswith(f"✗ Demo failed at {failed.name}: ") and panel.has_class("-failed")
                assert failed.detail and failed.detail in headline
                assert "server stopped" in headline
            assert results["stop"].ok and results["stop"].metric == "server stopped"
            for stage in ("sft", "rm", "rl"):
                assert results[stage].ok
            assert not app.demo_running

    run(drive())
    # Every stage's run showed in the runs panel while the flow was going.
    stages = sorted(RunDir(path).read_info().stage for path in (workspace / "runs").iterdir())
    assert stages == ["rl", "rm", "sft"] and len(runs_seen_live) == 3
    assert status(Workspace.open(workspace)) is None  # the demo's server is stopped


def test_x_stops_the_demo_while_its_sft_run_trains(trained, workspace: Path) -> None:  # noqa: ANN001
    options = DemoOptions(overrides={"sft": ["max_steps=100000", "logging_steps=1"]})
    app = make_app(_seeded(trained, workspace), replay=RECORDING, refresh=0.5, demo_options=options)
    recorder = Recorder(app)

    def sft_training() -> bool:
        return any(message.event.phase == "sft" and message.event.text.startswith("step ")
                   for message in recorder.of(m.DemoReported) if message.event.kind == "progress")

    async def drive() -> None:
        async with app.run_test(size=(80, 24), message_hook=recorder.hook) as pilot:
            await pilot.press("a", "y")
            panel = app.demo_panel
            assert app.screen.maximized is panel  # 80 columns: the panel takes the screen
            await until(lambda: sft_training() or recorder.of(m.DemoFinished), pilot, timeout=180,
                        what="the SFT run to train")
            assert sft_training(), [message.summary for message in recorder.of(m.DemoFinished)]
            await pilot.press("x")
            assert isinstance(app.screen, ConfirmDialog)
            await pilot.press("y")
            await until(lambda: recorder.of(m.DemoFinished), pilot, timeout=120, what="the demo to stop")
            finished = recorder.of(m.DemoFinished)[0]
            states = {result.name: result.ok for result in finished.results}
            assert states["data"] is True and states["sft"] is False and states["stop"] is True
            assert all(states[name] is None for name in ("rm", "rl", "export", "serve", "chat", "compare"))
            sft = next(result for result in finished.results if result.name == "sft")
            assert "stopped" in sft.detail
            await pilot.pause(0.2)
            assert str(panel.query_one("#demo-headline").render()).startswith("✗ Demo failed at sft: run ")

    run(drive())
    [run_dir] = (workspace / "runs").iterdir()
    assert RunDir(run_dir).read_info().state == "stopped"
