"""A real tiny SFT run launched from the app's form: it advances in the runs panel, outlives the app,
finishes, and shows as succeeded when the app is opened again."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from oatui.app import messages as m
from oatui.app.app import make_app
from oatui.app.widgets.forms import LaunchForm
from oatui.procutil import process_alive
from oatui.stages.rundir import RunDir
from oatui.stages.runs import wait_for_end

from test_app import RECORDING, Recorder, run, until

# The first test to need `trained` also builds it (a minute on an idle machine, more on a busy one).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

# Long enough that the runs panel (refreshed every 0.5 s) sees it running at two steps and the run
# outlives the app, on a quiet machine too: a tiny SFT step takes about 40 ms there.
STEPS = 300


def _row(app: Any, run_id: str) -> dict[str, str] | None:
    table = app.run_list
    if run_id not in table.runs:
        return None
    cells = [str(cell) for cell in table.get_row(run_id)]
    return dict(zip(table.COLUMNS, cells))


def test_a_tiny_sft_run_from_the_form_advances_outlives_the_app_and_shows_succeeded(trained, workspace: Path) -> None:  # noqa: ANN001
    shutil.copytree(trained.tiny_base, workspace / "models" / "tiny-pythia")
    app = make_app(workspace, replay=RECORDING, refresh=0.5)
    recorder = Recorder(app)
    seen_steps: list[str] = []

    async def launch_and_watch() -> str:
        async with app.run_test(size=(120, 40), message_hook=recorder.hook) as pilot:
            await pilot.press("1")
            form = app.screen
            assert isinstance(form, LaunchForm)
            form.query_one("#launch-overrides").value = (
                f"max_steps={STEPS} logging_steps=1 save_steps=1000 eval_steps=1000 val_fraction=0")
            await pilot.press("ctrl+s")
            await until(lambda: recorder.of(m.RunStarted), pilot, timeout=60, what="the launch")
            run_id = recorder.of(m.RunStarted)[0].run_id
            assert not isinstance(app.screen, LaunchForm)

            def advanced() -> bool:
                row = _row(app, run_id)
                if row and row["STATE"] == "running" and row["STEP"] != "-" and row["STEP"] not in seen_steps:
                    seen_steps.append(row["STEP"])
                return len(seen_steps) >= 2

            await until(advanced, pilot, timeout=240, what=f"two steps of {run_id} in the runs panel")
            row = _row(app, run_id)
            assert row is not None and "%" in row["PROGRESS"] and row["ELAPSED"] != "-"
            assert app.run_list.selected_id == run_id  # the new run is selected, its log follows
            await until(lambda: app.run_log.line_count > 0, pilot, timeout=30, what="the log")
            await pilot.press("q")
        return run_id

    run_id = run(launch_and_watch())
    first, second = (int(step.split("/")[0]) for step in seen_steps[:2])
    assert 0 < first < second <= STEPS and seen_steps[0].endswith(f"/{STEPS}")

    # The app is gone; the run is not.
    run_dir = RunDir(workspace / "runs" / run_id)
    info = run_dir.read_info()
    assert info.state == "running" and process_alive(info.supervisor_pid, info.supervisor_started)
    final = wait_for_end(run_dir, timeout=400)
    assert final.state == "succeeded", final.error

    again = make_app(workspace, replay=RECORDING, refresh=0.5)

    async def reopen() -> None:
        async with again.run_test(size=(120, 40)) as pilot:
            await until(lambda: _row(again, run_id) is not None, pilot, what="the run after reopening")
            row = _row(again, run_id)
            assert row is not None
            assert row["STATE"] == "succeeded" and "100%" in row["PROGRESS"] and row["STEP"] == f"{STEPS}/{STEPS}"

    started = time.monotonic()
    run(reopen())
    assert time.monotonic() - started < 30
