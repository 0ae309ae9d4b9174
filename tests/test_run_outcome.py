"""How a run ends when a stop arrives: before ``final/`` it is ``stopped``, after it ``succeeded``;
which runs ended since they were last seen.

The stage is a stand-in process under the real supervisor, so the test needs no model.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from oatui.stages.launcher import spawn_supervisor
from oatui.stages.rundir import EXIT_STOPPED, RunDir, RunInfo, new_run_id
from oatui.stages.runs import RunView, ended_since, latest_final, stop_run, wait_for_end
from oatui.stages.supervisor import outcome

# Writes final/ (as save_final does: a complete folder under its own name), says so, then lingers
# with the default SIGTERM handling, as a stage tidying up after its last step would.
STAGE_AFTER_FINAL = (
    "import os, pathlib, time\n"
    "final = pathlib.Path('final.partial'); final.mkdir()\n"
    "(final / 'config.json').write_text('{}')\n"
    "os.replace(final, 'final')\n"
    "print('final written', flush=True)\n"
    "time.sleep(120)\n"
)
STAGE_BEFORE_FINAL = "import time\nprint('training', flush=True)\ntime.sleep(120)\n"


@pytest.mark.parametrize(("returncode", "stop_requested", "has_final", "state"), [
    (0, False, True, "succeeded"),
    (0, False, False, "failed"),
    (EXIT_STOPPED, True, False, "stopped"),
    (EXIT_STOPPED, True, True, "succeeded"),
    (-signal.SIGTERM, True, False, "stopped"),
    (-signal.SIGTERM, True, True, "succeeded"),
    (128 + signal.SIGKILL, True, True, "succeeded"),
    (-signal.SIGTERM, False, True, "failed"),
    (1, True, True, "failed"),
])
def test_outcome(returncode: int, stop_requested: bool, has_final: bool, state: str) -> None:
    assert outcome(returncode, stop_requested, has_final) == state


def _view(run_id: str, state: str | None) -> RunView:
    info = None if state is None else RunInfo(id=run_id, stage="sft", state=state)
    return RunView(run_id, Path("/runs") / run_id, info, problem=None if info else "run.json: broken")


def test_the_runs_that_ended_since_they_were_last_seen() -> None:
    seen = {"a": "running", "b": "queued", "c": "running", "d": "succeeded", "e": "running", "f": "queued"}
    runs = [_view("f", "running"), _view("e", None), _view("d", "succeeded"), _view("c", "running"),
            _view("b", "stopped"), _view("a", "failed"), _view("new", "succeeded")]
    # Ended: was queued or running, now is not (a run.json that broke counts); in the order listed.
    assert [(run.id, run.state) for run in ended_since(seen, runs)] == [("e", "broken"), ("b", "stopped"),
                                                                        ("a", "failed")]
    # Still going, ended before, or never seen active: not reported.
    assert ended_since({}, runs) == []
    assert ended_since(seen, []) == []
    assert [run.active for run in runs] == [True, False, False, True, False, False, False]


def _start(workspace: Path, script: str) -> RunDir:
    info = RunInfo(id=new_run_id("sft"), stage="sft", argv=[sys.executable, "-c", script])
    run = RunDir.create(workspace / "runs", info, "{}\n")
    spawn_supervisor(run)
    return run


def _wait_for_log(run: RunDir, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if run.log_path.exists() and text in run.log_path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{run.id} never logged {text!r}")


def test_a_stop_after_the_final_model_is_saved_leaves_the_run_succeeded(workspace: Path) -> None:
    run = _start(workspace, STAGE_AFTER_FINAL)
    _wait_for_log(run, "final written")
    stop_run(run)
    info = wait_for_end(run, timeout=120)
    assert info.state == "succeeded", info
    assert info.error is None
    assert latest_final(workspace / "runs", "sft") == run.final


def test_a_stop_before_the_final_model_leaves_the_run_stopped(workspace: Path) -> None:
    run = _start(workspace, STAGE_BEFORE_FINAL)
    _wait_for_log(run, "training")
    stop_run(run)
    info = wait_for_end(run, timeout=120)
    assert info.state == "stopped", info
    assert latest_final(workspace / "runs", "sft") is None
