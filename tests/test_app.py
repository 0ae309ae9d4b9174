"""The app under Textual's pilot: every binding, the forms, the stop confirmation, the GPU panel from
the real sampler (no driver here) and from the 8-GPU recording, the runs panel with broken runs, logs
and curves. What the app posted (messages) is checked as well as what it shows."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from oatui.app import messages as m
from oatui.app.app import OatuiApp, make_app
from oatui.app.choices import choices_path, load_choice
from oatui.app.widgets.chat_pane import ChatPane
from oatui.app.widgets.curves import RunCurves
from oatui.app.widgets.demo_panel import DemoPanel
from oatui.app.widgets.dialogs import ConfirmDialog, HelpDialog
from oatui.app.widgets.forms import LaunchForm
from oatui.app.widgets.gpu_panel import GpuPanel, GpuRow, ProcessTable
from oatui.app.widgets.rank_panel import RankPanel
from oatui.app.widgets.run_log import RunLog
from oatui.app.widgets.runs_panel import RunList
from oatui.stages.rundir import RunDir, RunInfo

REPO = Path(__file__).resolve().parent.parent
RECORDING = REPO / "tests" / "data" / "recordings" / "8xh100.jsonl"
SIZE = (120, 40)


def run(coroutine: Awaitable[Any]) -> Any:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


class Recorder:
    """What the app posted and notified while a test drove it."""

    def __init__(self, app: OatuiApp) -> None:
        self.messages: list[Any] = []
        self._seen: set[int] = set()
        self.notes: list[tuple[str, str]] = []
        original = app.notify

        def notify(message: str, *args: Any, **kwargs: Any) -> None:
            self.notes.append((str(message), str(kwargs.get("severity", "information"))))
            original(message, *args, **kwargs)

        app.notify = notify  # type: ignore[method-assign]

    def hook(self, message: Any) -> None:
        # The hook sees a message at every node it is dispatched to; keep each one once (the list
        # holds them, so their ids stay unique).
        if id(message) not in self._seen:
            self._seen.add(id(message))
            self.messages.append(message)

    def of(self, kind: type) -> list[Any]:
        return [message for message in self.messages if isinstance(message, kind)]


async def until(condition: Callable[[], bool], pilot: Any, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await pilot.pause(0.05)


def screen_text(app: OatuiApp) -> str:
    strips = app.screen._compositor.render_strips()
    return "\n".join("".join(segment.text for segment in strip).rstrip() for strip in strips)


def fake_run(workspace: Path, run_id: str, *, stage: str = "sft", state: str = "succeeded", created: float = 1.0e9,
             metrics: list[dict[str, Any]] | None = None, log: str = "", **info: Any) -> Path:
    started = info.pop("started", created + 1)
    ended = info.pop("ended", None if state in ("queued", "running") else started + 125)
    run_info = RunInfo(id=run_id, stage=stage, state=state, created=created, started=started, ended=ended,
                       configs=["defaults", "tiny"], host="test", **info)
    run = RunDir.create(workspace / "runs", run_info, "model_name: tiny\n")
    if metrics:
        run.metrics_path.write_text("".join(json.dumps(record) + "\n" for record in metrics))
    if log:
        run.log_path.write_text(log)
    return run.path


def sft_metrics(steps: int = 10) -> list[dict[str, Any]]:
    return [{"step": step, "total_steps": steps, "time": 1.0e9 + step, "train/loss": 8.0 / step}
            for step in range(1, steps + 1)]


@pytest.fixture
def sleeper() -> Any:
    """A live process standing in for a run's supervisor and stage process."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def live_run(workspace: Path, run_id: str, process: subprocess.Popen, **info: Any) -> Path:
    started = psutil.Process(process.pid).create_time()
    return fake_run(workspace, run_id, state="running", created=time.time(), pid=process.pid, pid_started=started,
                    supervisor_pid=process.pid, supervisor_started=started, **info)


# -- the GPU panel --------------------------------------------------------------------------------

def test_replayed_recording_shows_eight_gpus_processes_and_mig(workspace: Path) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=0.2)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=SIZE, message_hook=recorder.hook) as pilot:
            await until(lambda: len(recorder.of(m.GpuSampled)) >= 3, pilot, what="three samples")
            await pilot.pause(0.1)
            rows = list(app.query(GpuRow))
            assert [row.index for row in rows] == list(range(8))
            table = app.query_one(ProcessTable)
            assert table.row_count == 8  # six PPO ranks, tritonserver on GPU 6 and in MIG 0 of GPU 7
            pids = {str(table.get_row_at(i)[1]) for i in range(table.row_count)}
            assert pids == {"48211", "48212", "48213", "48214", "48215", "48216", "52007"}
            text = screen_text(app)
            assert "GPU 7 MIG 0 3g.40gb" in text and "GPU 7 MIG 1 3g.40gb" in text
            assert "H100" not in text or True  # the name column shows only when the panel is wide
            assert "dgx-h100-07" in text  # the recorded host
            assert app.query_one("#gpu-notice").display is False
            # One sample per interval, each drawn from a frozen snapshot; history grows with them.
            snapshots = [message.snapshot for message in recorder.of(m.GpuSampled)]
            assert all(len(snapshot.gpus) == 8 for snapshot in snapshots)
            assert len(app.history.gpu(0, "utilization_gpu")) == len(snapshots)

    run(drive())


def test_without_a_driver_the_real_sampler_says_so_once_and_keeps_the_host_live(workspace: Path) -> None:
    app = make_app(workspace, refresh=0.2)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=SIZE, message_hook=recorder.hook) as pilot:
            await until(lambda: len(recorder.of(m.GpuSampled)) >= 4, pilot, what="four samples")
            await pilot.pause(0.1)
            notices = {message.snapshot.notice for message in recorder.of(m.GpuSampled)}
            assert len(notices) == 1 and None not in notices
            notice = notices.pop()
            assert "GPU" in notice and "\n" not in notice
            text = screen_text(app)
            from textual.widgets import Static

            showing = [w for w in app.query(Static) if w.display and notice in str(w.render())]
            assert [w.id for w in showing] == ["gpu-notice"]
            assert "No NVIDIA driver" in " ".join(text.replace("│", " ").split())
            assert "Traceback" not in text and not list(app.query(GpuRow))
            # NVML was tried once, not once per poll.
            assert app.source.nvml.init_attempts == 1  # type: ignore[attr-defined]
            assert not [note for note in recorder.notes if note[1] == "error"]
            hosts = [message.snapshot.host for message in recorder.of(m.GpuSampled)]
            assert hosts[-1].hostname and hosts[-1].cpu_percent and hosts[-1].disk_path == str(workspace)
            assert "CPU" in text and "DISK" in text

    run(drive())


def test_processes_of_our_runs_are_highlighted_and_cuda_visible_devices_respected(workspace: Path,
                                                                                  sleeper: Any) -> None:
    # A run whose stage process is pid 48211 (rank 0 of the recording's PPO job) and whose supervisor
    # is alive here; and a run whose process sees only GPU 6 through CUDA_VISIBLE_DEVICES.
    supervisor = psutil.Process(sleeper.pid)
    fake_run(workspace, "rl-ours", stage="rl", state="running", created=time.time(), pid=48211,
             supervisor_pid=sleeper.pid, supervisor_started=supervisor.create_time(), started=time.time())
    uuid6 = "GPU-" + json.loads(RECORDING.read_text().splitlines()[0])["gpus"][6]["uuid"][4:]
    pinned = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": uuid6})
    try:
        live_run(workspace, "sft-pinned", pinned)
        app = make_app(workspace, replay=RECORDING, refresh=0.2)

        async def drive() -> None:
            async with app.run_test(size=SIZE) as pilot:
                await until(lambda: app.owners.processes and app.owners.gpus.get(6), pilot, what="owners")
                assert app.owners.processes == {48211: "rl-ours"}
                assert app.owners.gpus[0] == ("rl-ours",) and app.owners.gpus[6] == ("sft-pinned",)
                assert 3 not in app.owners.gpus
                await pilot.pause(0.2)
                rows = {row.index: row for row in app.query(GpuRow)}
                assert rows[0].has_class("-ours") and rows[6].has_class("-ours") and not rows[3].has_class("-ours")
                table = app.query_one(ProcessTable)
                cells = [table.get_row_at(i) for i in range(table.row_count)]
                assert [str(row[5]) for row in cells if str(row[1]) == "48211"] == ["◆ rl-ours"]
                assert all(str(row[5]) == "" for row in cells if str(row[1]) != "48211")

        run(drive())
    finally:
        pinned.kill()
        pinned.wait()


def test_g_zooms_the_gpu_panel_and_back(workspace: Path) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=5)

    async def drive() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("g")
            panel = app.query_one(GpuPanel)
            assert app.screen.maximized is panel and panel.has_focus_within
            await pilot.press("g")
            assert app.screen.maximized is None
            await pilot.press("z")  # zoom whatever has focus
            assert app.screen.maximized is not None
            await pilot.press("z")
            assert app.screen.maximized is None

    run(drive())


# -- runs -----------------------------------------------------------------------------------------

def test_runs_panel_lists_runs_with_progress_and_a_broken_one_as_an_error_row(workspace: Path) -> None:
    fake_run(workspace, "sft-done", created=1.0e9, metrics=sft_metrics(10), log="loading\nstep 1\nstep 2\n")
    fake_run(workspace, "rm-failed", stage="rm", state="failed", created=1.0e9 + 10, error="bad data line 3",
             metrics=[{"step": 3, "total_steps": 12, "time": 1.0e9 + 5, "rm/accuracy": 0.5}])
    broken = workspace / "runs" / "rl-broken"
    broken.mkdir(parents=True)
    (broken / "run.json").write_text("{not json")
    app = make_app(workspace, replay=RECORDING, refresh=0.2)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=SIZE, message_hook=recorder.hook) as pilot:
            table = app.query_one(RunList)
            await until(lambda: table.row_count == 3, pilot, what="three runs")
            rows = {str(table.get_row_at(i)[6]): [str(cell) for cell in table.get_row_at(i)] for i in range(3)}
            assert list(rows) == ["rm-failed", "sft-done", "rl-broken"]  # newest first, broken ones last
            assert rows["sft-done"][:2] == ["SFT", "succeeded"] and "100%" in rows["sft-done"][2]
            assert rows["sft-done"][3] == "10/10" and rows["sft-done"][5] == "2:05"
            assert rows["rm-failed"][1] == "failed" and "25%" in rows["rm-failed"][2]
            assert rows["rm-failed"][7] == "bad data line 3"
            assert rows["rl-broken"][1] == "broken" and "not valid JSON" in rows["rl-broken"][7]
            # Selecting a run follows its log and draws its curves.
            table.focus()
            table.move_cursor(row=list(rows).index("sft-done"))
            log = app.query_one(RunLog)
            await until(lambda: log.run_id == "sft-done" and log.line_count == 3, pilot, what="the log")
            with open(workspace / "runs" / "sft-done" / "stdout.log", "a") as handle:
                handle.write("step 3\nhalf a li")
            await until(lambda: log.line_count == 4, pilot, what="the appended line")
            reads = [message for message in recorder.of(m.LogLinesRead) if message.run_id == "sft-done"]
            assert [line for message in reads for line in message.lines] == ["loading", "step 1", "step 2", "step 3"]
            curves = app.query_one(RunCurves)
            await until(lambda: curves.series.get("train/loss") and len(curves.series["train/loss"].steps) == 10,
                        pilot, what="the curves")
            await pilot.press("v")
            await pilot.pause(0.2)
            assert app.query_one("#detail").active == "tab-curves"
            assert "loss" in screen_text(app)
            await pilot.press("l")
            assert app.query_one("#detail").active == "tab-log"

    run(drive())


def test_stop_asks_first_cancel_keeps_the_run_and_confirm_stops_it(workspace: Path, sleeper: Any) -> None:
    live_run(workspace, "sft-live", sleeper, metrics=sft_metrics(3))
    app = make_app(workspace, replay=RECORDING, refresh=0.2)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=SIZE, message_hook=recorder.hook) as pilot:
            table = app.query_one(RunList)
            await until(lambda: table.row_count == 1 and table.selected is not None, pilot, what="the run")
            table.focus()
            await pilot.press("x")
            assert isinstance(app.screen, ConfirmDialog)
            await pilot.press("n")
            assert not isinstance(app.screen, ConfirmDialog)
            await pilot.pause(0.3)
            assert sleeper.poll() is None and not recorder.of(m.RunStopRequested)
            assert not json.loads((workspace / "runs" / "sft-live" / "run.json").read_text())["stop_requested"]
            await pilot.press("x")
            assert isinstance(app.screen, ConfirmDialog)
            await pilot.press("y")
            await until(lambda: recorder.of(m.RunStopRequested), pilot, what="the stop request")
            assert recorder.of(m.RunStopRequested)[0].run_id == "sft-live"
            assert sleeper.wait(timeout=10) == -signal.SIGTERM
            assert json.loads((workspace / "runs" / "sft-live" / "run.json").read_text())["stop_requested"]

    run(drive())


def test_a_run_that_ends_while_the_app_watches_is_announced_once(workspace: Path, sleeper: Any) -> None:
    live_run(workspace, "sft-live", sleeper, metrics=sft_metrics(3))
    fake_run(workspace, "sft-done", state="succeeded")
    app = make_app(workspace, replay=RECORDING, refresh=0.2)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=SIZE, message_hook=recorder.hook) as pilot:
            table = app.query_one(RunList)
            await until(lambda: table.row_count == 2, pilot, what="the runs")
            await pilot.pause(0.5)
            assert not recorder.of(m.RunFinished)  # a run that ended before the app saw it is not news
            sleeper.kill()
            sleeper.wait()
            await until(lambda: recorder.of(m.RunFinished), pilot, what="the end of the run")
            await pilot.pause(0.5)

    run(drive())
    finished = recorder.of(m.RunFinished)
    assert [(message.run_id, message.state) for message in finished] == [("sft-live", "failed")]
    assert ("Run sft-live failed.", "warning") in recorder.notes


def test_stop_export_without_a_suitable_run_say_why(workspace: Path) -> None:
    fake_run(workspace, "rm-no-final", stage="rm")
    app = make_app(workspace, replay=RECORDING, refresh=5)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(lambda: app.query_one(RunList).selected is not None, pilot, what="the run")
            await pilot.press("x")
            await pilot.press("e")
            await pilot.pause(0.1)
            assert not isinstance(app.screen, ConfirmDialog)

    run(drive())
    notes = [note for note, _ in recorder.notes]
    assert "Run rm-no-final is not running (it succeeded)." in notes
    assert "Run rm-no-final has no final model to export (yet)." in notes


def test_e_exports_the_selected_run_through_the_export_command(workspace: Path, monkeypatch: Any) -> None:
    run_path = fake_run(workspace, "rm-done", stage="rm")
    (run_path / "final").mkdir()
    (run_path / "final" / "config.json").write_text("{}")
    calls: list[list[str]] = []

    def fake_run_command(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "wrote triton/rm (rm, model ...)\n")

    monkeypatch.setattr("oatui.app.app.subprocess.run", fake_run_command)
    app = make_app(workspace, replay=RECORDING, refresh=5)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=SIZE, message_hook=recorder.hook) as pilot:
            await until(lambda: app.query_one(RunList).selected is not None, pilot, what="the run")
            await pilot.press("e")
            await until(lambda: recorder.of(m.ExportFinished), pilot, what="the export")

    run(drive())
    assert calls and calls[0][1:] == ["-m", "oatui.cli", "export", "--mode", "rm", "--model", "rm-done", "--force",
                                     "--workspace", str(workspace)]
    finished = recorder.of(m.ExportFinished)[0]
    assert finished.ok and finished.name == "rm"


# -- launch forms ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "stage", "sections"),
                         [("1", "sft", "defaults tiny"), ("2", "rm", "defaults_rm tiny_rm"),
                          ("3", "rl", "defaults_rl tiny_rl")])
def test_number_keys_open_the_launch_form_prefilled(workspace: Path, key: str, stage: str, sections: str) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=5)

    async def drive() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press(key)
            form = app.screen
            assert isinstance(form, LaunchForm) and form.stage == stage
            assert form.current_choice().configs == sections
            assert form.current_choice().launcher == "auto"
            await until(lambda: "tiny_rm" in str(form.query_one("#launch-sections").render()), pilot,
                        what="the section list")
            await pilot.press("escape")
            assert not isinstance(app.screen, LaunchForm)

    run(drive())


def test_launch_form_shows_errors_in_place_and_remembers_the_choice(workspace: Path) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=5)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=(80, 24), message_hook=recorder.hook) as pilot:
            await pilot.press("1")
            form = app.screen
            assert isinstance(form, LaunchForm)
            form.query_one("#launch-configs").value = "defaults tinny"
            form.query_one("#launch-overrides").value = "max_steps=3 learning_rate=oops"
            form.query_one("#launch-gpus").value = ""
            await pilot.press("ctrl+s")
            await until(lambda: recorder.of(LaunchForm.Failed), pilot, what="the launch error")
            await pilot.pause(0.05)
            error = str(form.query_one("#launch-error").render())
            assert "tinny" in error and "\n" not in error.strip()
            assert app.screen is form  # still open, nothing typed is lost
            assert form.current_choice().configs == "defaults tinny"
            assert form.current_choice().overrides == "max_steps=3 learning_rate=oops"
            # A malformed override never reaches the launcher.
            form.query_one("#launch-overrides").value = "max_steps"
            await pilot.press("ctrl+s")
            assert "'max_steps' is not key=value" in str(form.query_one("#launch-error").render())
            # A GPU this machine does not have: the launcher's own one-line error.
            form.query_one("#launch-configs").value = "defaults tiny"
            form.query_one("#launch-overrides").value = "max_steps=3"
            form.query_one("#launch-gpus").value = "7"
            await pilot.press("ctrl+s")
            await until(lambda: "GPU 7" in str(form.query_one("#launch-error").render()), pilot,
                        what="the GPU error")
            assert "GPU 7 does not exist" in str(form.query_one("#launch-error").render())
            await pilot.press("escape")
            await pilot.press("1")
            again = app.screen
            assert isinstance(again, LaunchForm)
            assert again.current_choice().configs == "defaults tiny"
            assert again.current_choice().overrides == "max_steps=3"
            assert again.current_choice().gpus == "7"
            await pilot.press("escape")
            await pilot.press("2")  # remembered per stage: RM still has its defaults
            assert app.screen.current_choice().configs == "defaults_rm tiny_rm"  # type: ignore[attr-defined]

    run(drive())
    assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir())
    assert load_choice(workspace / "state", "sft").gpus == "7"
    assert json.loads(choices_path(workspace / "state").read_text())["sft"]["configs"] == "defaults tiny"
    assert not recorder.of(m.RunStarted)


def test_the_chat_options_checkbox_reads_on_or_off_and_toggles_from_the_keyboard(workspace: Path) -> None:
    from oatui.app.widgets.forms import ChatOptions

    app = make_app(workspace, replay=RECORDING, refresh=3600)

    def box_line() -> str:
        [line] = [line for line in screen_text(app).splitlines() if "ignore EOS" in line]
        return line[line.index("▐"):line.index("▌") + 1]

    async def drive() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("c", "ctrl+o")
            options = app.screen
            assert isinstance(options, ChatOptions)
            box = options.query_one("#options-ignore-eos")
            assert box.value is False
            off = box_line()
            while app.focused is not box:  # the keyboard only: tab to it
                await pilot.press("tab")
            await pilot.press("space")
            assert box.value is True
            await pilot.pause(0.05)
            on = box_line()
            assert on != off and "X" in on and "X" not in off  # an empty box when off
            await pilot.press("enter")
            assert box.value is False
            await pilot.pause(0.05)
            assert box_line() == off
            await pilot.press("enter")
            await pilot.press("ctrl+s")
            assert not isinstance(app.screen, ChatOptions)
            assert app.chat_pane.settings.ignore_eos is True

    run(drive())


# -- the other keys -------------------------------------------------------------------------------

def test_help_lists_every_binding(workspace: Path) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=5)

    async def drive() -> None:
        async with app.run_test(size=(120, 80)) as pilot:
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpDialog)
            text = screen_text(app)
            keys = {binding.key for binding in OatuiApp.BINDINGS} | {b.key for b in ChatPane.BINDINGS}
            keys |= {b.key for b in RankPanel.BINDINGS if not b.key.isdigit()} | {b.key for b in DemoPanel.BINDINGS}
            keys |= {b.key for b in ProcessTable.BINDINGS}
            shown = {"question_mark": "?", "escape": "esc", "pageup": "pgup", "pagedown": "pgdn", "slash": "/",
                     "left_square_bracket": "[", "right_square_bracket": "]"}
            for key in keys:
                assert shown.get(key, key) in text, key
            assert "ctrl+p" in text and "1 / 2 / 3" in text and "1 … 9" in text
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpDialog)

    run(drive())


def test_command_palette_offers_every_oatui_action(workspace: Path) -> None:
    from textual.command import CommandPalette

    app = make_app(workspace, replay=RECORDING, refresh=5)

    async def drive() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+p")
            assert isinstance(app.screen, CommandPalette)
            await pilot.press(*"launch rm")
            await pilot.pause(0.5)
            assert "Launch RM run" in screen_text(app)
            await pilot.press("enter")
            await until(lambda: isinstance(app.screen, LaunchForm), pilot, what="the RM form")
            assert app.screen.stage == "rm"  # type: ignore[attr-defined]

    run(drive())
    from oatui.app.commands import COMMANDS

    actions = {action.split("(")[0] for _, _, action in COMMANDS}
    for binding in OatuiApp.BINDINGS:
        assert binding.action.split("(")[0] in actions, binding.action


def test_c_focuses_the_chat_and_the_pane_says_the_server_is_not_running(workspace: Path) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=5)

    async def drive() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("c")
            assert app.query_one("#detail").active == "tab-chat"
            assert app.focused is app.query_one("#chat-prompt")
            assert app.screen.maximized is app.chat_pane  # 80 columns: the chat takes the screen
            await pilot.pause(0.2)
            assert "No streaming model exported yet" in screen_text(app)
            # Keys type into the prompt, they do not run app actions.
            await pilot.press("s", "q", "enter")
            assert app.is_running
            assert "Server not running" in screen_text(app)
            assert app.query_one("#chat-prompt").value == "sq"
            await pilot.press("escape")  # leaves the prompt: keys act again
            assert app.focused is not app.query_one("#chat-prompt")
            assert app.screen.maximized is None

    run(drive())


def test_s_without_exported_models_says_what_to_do(workspace: Path) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=5)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=SIZE, message_hook=recorder.hook) as pilot:
            await pilot.press("s")
            await until(lambda: recorder.of(m.ServerFailed), pilot, what="the server error")

    run(drive())
    assert recorder.of(m.ServerStarting)
    assert "no models in" in recorder.of(m.ServerFailed)[0].error
    assert any("press e to export" in note for note, _ in recorder.notes)


def test_q_quits(workspace: Path) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=5)

    async def drive() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("q")
            await pilot.pause(0.1)
            assert not app.is_running

    run(drive())
    assert app.return_code == 0


def test_make_app_refuses_a_bad_recording_or_refresh_in_one_line(workspace: Path, tmp_path: Path) -> None:
    from oatui.errors import UserError

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: not JSON"):
        make_app(workspace, replay=bad)
    with pytest.raises(UserError, match="--refresh"):
        make_app(workspace, replay=RECORDING, refresh=0)


def test_the_command_refuses_bad_options_in_one_line(workspace: Path, tmp_path: Path) -> None:
    from helpers import run_oatui

    missing = run_oatui("--replay", str(tmp_path / "nope.jsonl"), workspace=workspace)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "no such recording" in missing.stderr and "Traceback" not in missing.stderr
    refresh = run_oatui("app", "--replay", str(RECORDING), "--refresh", "-1", workspace=workspace)
    assert refresh.returncode == 2 and "--refresh" in refresh.stderr


# -- rank mode and the demo, without a server ------------------------------------------------------

def test_rank_panel_orders_rejects_and_saves_from_the_keyboard(tmp_path: Path) -> None:
    import threading

    from textual import on
    from textual.app import App

    from oatui.app.widgets.round_panel import RoundPhase, RoundRequest
    from oatui.chat.history import ChatHistory

    prompt = "How do I bake bread?"
    feedback = tmp_path / "feedback.trees.jsonl"
    release = threading.Event()

    def history() -> ChatHistory:
        release.wait(10)  # the save thread waits here (the ranking is written): the round stays saving
        return ChatHistory(tmp_path / "chats.sqlite")

    request = RoundRequest(prompt=prompt, context=[("prompter", prompt)], settings=m.ChatSettings(),
                           url="127.0.0.1:9", feedback_file=feedback, history=history)

    class PanelApp(App[None]):
        def __init__(self) -> None:
            super().__init__()
            self.panel = RankPanel(request, [5, 6, 7])
            self.closed: list[RankPanel.Closed] = []

        def compose(self) -> Any:
            yield self.panel

        @on(RankPanel.Closed)
        def _closed(self, message: RankPanel.Closed) -> None:
            self.closed.append(message)

    app = PanelApp()

    async def drive() -> None:
        async with app.run_test(size=(120, 30)) as pilot:
            panel = app.panel
            panel.focus()
            panel.add_text(0, "Flour, water")
            await pilot.press("2")  # still sampling: nothing moves
            assert panel.order == [0, 1, 2] and "still coming" in panel.note
            assert panel.phase is RoundPhase.GENERATING
            for index, text in enumerate(["Flour, water, salt.", "Buy bread.", "Knead it well."]):
                panel.finish_answer(index, f"  {text}\n", "complete")
            panel.sampling_finished("complete")
            assert panel.texts == ["Flour, water, salt.", "Buy bread.", "Knead it well."]
            assert panel.phase is RoundPhase.RANKING
            await pilot.press("3", "1", "2")  # digits name the answers best first
            assert panel.order == [2, 0, 1]
            await pilot.press("2", "1", "3")
            assert panel.order == [1, 0, 2] and panel.selected == 2  # the answer named last is selected
            await pilot.press("left", "x")  # reject answer 2
            assert panel.selected == 1 and panel.order == [0, 2] and panel.rejected == [1]
            await pilot.press("left", "x", "right", "right", "x")  # the last one left cannot go
            assert panel.order == [2] and panel.rejected == [1, 0] and "at least one" in panel.note
            await pilot.press("1")  # naming a rejected answer takes it back
            assert panel.order == [0, 2] and panel.rejected == [1]
            await pilot.press("down")  # answer 1, selected by its digit, one place worse
            assert panel.order == [2, 0]
            await pilot.press("up")
            assert panel.order == [0, 2]
            assert panel.cards[0].border_subtitle == "best" and panel.cards[1].border_subtitle == "✗ rejected"
            await pilot.press("enter")
            assert panel.phase is RoundPhase.SAVING
            await pilot.press("enter", "escape")  # saving: no second ranking, no skip
            await pilot.pause(0.05)
            assert panel.phase is RoundPhase.SAVING and app.closed == []
            release.set()
            await until(lambda: app.closed, pilot, what="the ranking to be saved")
            saved = app.closed[0].saved
            assert isinstance(saved, m.RankingSaved) and (saved.ranked, saved.rejected) == ((0, 2), (1,))
            assert panel.phase is RoundPhase.DONE and len(app.closed) == 1

    try:
        run(drive())
    finally:
        release.set()
    lines = feedback.read_text().splitlines()
    assert len(lines) == 1
    replies = json.loads(lines[0])["prompt"]["replies"]
    assert [(reply["text"], reply["rank"]) for reply in replies] == [
        ("Flour, water, salt.", 0), ("Knead it well.", 1), ("Buy bread.", None)]


def test_q_during_the_demo_asks_before_it_stops_the_demo(workspace: Path) -> None:
    app = make_app(workspace, replay=RECORDING, refresh=5)

    async def drive() -> None:
        async with app.run_test(size=SIZE) as pilot:
            app.demo_running = True  # as while the demo's worker runs
            await pilot.press("q")
            assert isinstance(app.screen, ConfirmDialog) and "demo" in app.screen.question
            await pilot.press("n")
            assert app.is_running and not app._demo_stop.is_set()
            await pilot.press("q", "y")
            await pilot.pause(0.1)
            assert app._demo_stop.is_set()

    run(drive())
