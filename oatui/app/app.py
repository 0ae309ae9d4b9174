"""The oatui workstation: GPUs and host, runs with their logs and curves, and the chat pane.

The app never holds NVML handles, model weights or training processes. It reads:
- monitor snapshots (``oatui.monitor``: a live ``Sampler`` or the ``ReplaySource`` of a recording),
  in a thread worker once per ``refresh`` seconds;
- run directories (``oatui.stages``), in another thread worker at the same pace: the list of
  runs, and the new lines of the selected run's log and metrics;
- the workspace's Triton server record (``oatui.serve.server.status``).
Stages and the server are started detached, so they outlive the app and the SSH session; the app
shows them again when it is reopened.

The ``a`` key runs ``oatui.demo.Demo`` (the whole flow, as ``oatui demo``) in a thread worker on
the workspace; its runs show in the runs panel like any other, its progress in the Demo tab.

``make_app`` is the one factory used by the ``oatui`` command, the tests and the snapshot tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import DataTable, Footer, Header, Static, TabbedContent, TabPane
from textual.widgets._footer import FooterKey
from textual.worker import Worker, WorkerState

from oatui.app import messages as m
from oatui.app.commands import OatuiCommands
from oatui.app.follow import FileFollower, MetricsFollower
from oatui.app.widgets.chat_pane import ChatPane
from oatui.app.widgets.curves import RunCurves
from oatui.app.widgets.demo_panel import DemoPanel
from oatui.app.widgets.dialogs import ConfirmDialog, HelpDialog
from oatui.app.widgets.forms import LaunchForm
from oatui.app.widgets.gpu_panel import GpuPanel, ProcessTable
from oatui.app.widgets.host_panel import HostPanel
from oatui.app.widgets.metric_picker import MetricPicker
from oatui.app.widgets.run_log import RunLog
from oatui.app.widgets.runs_panel import RunList
from oatui.app.widgets.server_line import ServerLine
from oatui.errors import UserError
from oatui.monitor import History, MonitorSnapshot, SnapshotSource, make_source
from oatui.monitor.owners import EMPTY, ActiveRun, OwnerFinder, Ownership
from oatui.stages.rundir import RunDir
from oatui.stages.runs import RunView, ended_since, list_runs, stop_run
from oatui.workspace import Workspace

if TYPE_CHECKING:
    from oatui.demo import DemoEvent, DemoOptions, PhaseResult
    from oatui.serve.record import ServerInfo

#: Below this width the panels stack instead of standing side by side.
NARROW_WIDTH = 100
EXPORT_MODES = {"sft": "policy", "rl": "policy", "rm": "rm"}
MAIN_SCREEN_ACTIONS = {
    "launch", "stop_run", "export", "toggle_server", "restart_server", "focus_chat", "focus_gpus", "focus_runs",
    "show_log", "show_curves", "show_demo", "zoom", "unzoom", "help", "new_conversation", "chat_options",
    "copy_answer", "toggle_rank", "toggle_ab", "demo", "stop_demo", "quit", "pick_metrics", "smoothing",
    "compare_run",
}

KEYS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Anywhere", (
        ("1 / 2 / 3", "launch an SFT / RM / RL run (a form: config sections, --set overrides, launcher, GPUs)"),
        ("x", "stop the selected run (asks first; the run saves a checkpoint and ends 'stopped')"),
        ("e", "export the selected run's model into WORKSPACE/triton (policy for SFT/RL, rm for RM; asks "
              "before replacing an export)"),
        ("s", "start or stop tritonserver on the workspace repository (asks before stopping it); the line "
              "above the footer shows it and the run behind each served model"),
        ("ctrl+t", "restart tritonserver (start it again after it died; works from the chat prompt; asks "
                   "before stopping a running one)"),
        ("a", "run the whole demo flow: data → SFT → RM → RL → export → serve → chat → compare, on the tiny "
              "default (asks first: several minutes, starts its own server); again: stop it"),
        ("c", "chat: focus the prompt (zoomed on narrow terminals)"),
        ("g", "GPUs: focus and zoom the GPU panel (again: unzoom)"),
        ("r", "focus the list of runs"),
        ("l / v", "show the selected run's log / curves"),
        ("/", "curves: pick the metrics to draw, any metric the runs logged (type to filter, space picks, "
              "enter draws, ctrl+d: the stage's default charts)"),
        ("[ / ]", "curves: less / more smoothing (TensorBoard's EMA weight, 0 to 0.99; shown in each title)"),
        ("m", "keep the selected run on the curves (again: take it off); select another run: both are "
              "drawn on the same axes, each line with its own marker and name"),
        ("z", "zoom the focused panel in or out"),
        ("esc", "unzoom (in the chat: stop the answer first, then leave the prompt)"),
        ("tab", "next panel"),
        ("ctrl+p", "command palette: every action by name"),
        ("?", "this help"),
        ("q", "quit (runs and the server keep going; a running demo asks first, then stops)"),
    )),
    ("Runs list", (
        ("up / down", "select a run: its log and curves follow (runs kept with m stay on the curves, marked +)"),
    )),
    ("GPU panel (g, then tab to the process table)", (
        ("o", "sort the processes: by GPU, GPU memory, GPU utilization, pid, run"),
        ("x", "stop the highlighted process's run (asks first), when it is one of this workspace's runs"),
    )),
    ("Chat", (
        ("enter", "send the prompt; the answer streams in"),
        ("esc", "stop the answer (the server stops generating); else leave the prompt"),
        ("ctrl+r", "rank mode on/off: each prompt gets K answers (different seeds) to put in order"),
        ("ctrl+g", "blind A/B on/off: two models answer each prompt, as A and B"),
        ("ctrl+n", "new conversation"),
        ("ctrl+o", "options: model, system prompt, temperature, top-p, max new tokens, answers to rank (K)"),
        ("ctrl+y", "copy the last answer to the clipboard (works over SSH: OSC 52)"),
    )),
    ("Rank mode (the answers of one prompt)", (
        ("left / right", "select an answer (narrow terminals: its tab)"),
        ("up / down", "move the selected answer one place better / worse"),
        ("1 … 9", "name the answers best first: 2 1 3 puts answer 2 first, then 1, then 3"),
        ("x", "reject the selected answer as unusable (again: take it back)"),
        ("e", "edit the selected answer into a better demonstration (ctrl+s keeps the edit)"),
        ("enter", "save the ranking to WORKSPACE/data/feedback.trees.jsonl; the chat goes on from the best"),
        ("esc", "stop the sampling; once every answer is in: skip this prompt (nothing saved)"),
        ("pgup / pgdn", "scroll the selected answer"),
    )),
    ("Blind A/B (two models' answers to one prompt, in a random order)", (
        ("a / b / t", "A is better / B is better / a tie"),
        ("enter", "save the choice to WORKSPACE/data/feedback.trees.jsonl; then the models are revealed, "
                  "with the pair's win rate so far"),
        ("esc", "stop the answers; once both are in: skip this prompt (nothing saved)"),
        ("pgup / pgdn", "scroll both answers"),
    )),
    ("Demo tab", (
        ("x", "stop the demo (the current run saves a checkpoint and stops, the server is stopped)"),
    )),
    ("Forms and dialogs", (
        ("ctrl+s / enter", "submit"),
        ("esc", "cancel"),
        ("y / n", "answer a confirmation"),
    )),
)


LAUNCH_GROUP = Binding.Group("Launch")
#: Left off the footer on narrow terminals (the help lists them), so that moving around, help and
#: quit stay on it.
FOOTER_WIDE_ONLY = {"stop_run", "export", "toggle_server"}
#: Below this width the footer drops the space between its keys.
COMPACT_FOOTER_WIDTH = 130


class MainFooter(Footer):
    """The footer, without the keys of ``FOOTER_WIDE_ONLY`` (and the palette key) when the app is narrow."""

    def compose(self) -> ComposeResult:
        narrow = self.app.has_class("-narrow")
        self.show_command_palette = not narrow
        for widget in super().compose():
            if narrow and isinstance(widget, FooterKey) and widget.action in FOOTER_WIDE_ONLY:
                continue
            yield widget


class OatuiApp(App[None]):
    """The workstation. Build it with :func:`make_app`."""

    CSS_PATH = "app.tcss"
    TITLE = "oatui"
    # Esc belongs to the chat first (stop the answer), even when the chat is zoomed.
    ESCAPE_TO_MINIMIZE = False
    COMMANDS = App.COMMANDS | {OatuiCommands}
    BINDINGS = [
        # One footer entry for the three launch keys, so that every main key fits on the footer.
        Binding("1", "launch('sft')", "SFT", group=LAUNCH_GROUP),
        Binding("2", "launch('rm')", "RM", group=LAUNCH_GROUP),
        Binding("3", "launch('rl')", "RL", group=LAUNCH_GROUP),
        Binding("x", "stop_run", "Stop"),
        Binding("e", "export", "Export"),
        Binding("s", "toggle_server", "Server"),
        Binding("ctrl+t", "restart_server", "Restart server", show=False),
        Binding("a", "demo", "Demo", show=False),
        # The chat's own keys work from the main screen too: they open the chat in that mode.
        Binding("ctrl+r", "toggle_rank", "Rank mode", show=False),
        Binding("ctrl+g", "toggle_ab", "Blind A/B", show=False),
        Binding("c", "focus_chat", "Chat"),
        Binding("g", "focus_gpus", "GPUs"),
        Binding("r", "focus_runs", "Runs"),
        Binding("l", "show_log", "Log"),
        Binding("v", "show_curves", "Curves"),
        Binding("slash", "pick_metrics", "Metrics", show=False),
        Binding("left_square_bracket", "smoothing(-1)", "Less smoothing", show=False),
        Binding("right_square_bracket", "smoothing(1)", "More smoothing", show=False),
        Binding("m", "compare_run", "Compare", show=False),
        Binding("z", "zoom", "Zoom"),
        # The screen's own tab binding is hidden from the footer; this one (same action) is shown.
        Binding("tab", "focus_next", "Next", priority=True),
        Binding("escape", "unzoom", "Unzoom", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        workspace: Workspace,
        source: SnapshotSource,
        refresh: float = 1.0,
        server_options: dict[str, Any] | None = None,
        demo_options: DemoOptions | None = None,
        replay: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.workspace = workspace
        self.source = source
        self.refresh_interval = refresh
        self.server_options = dict(server_options or {})
        self.demo_options = demo_options
        self.demo_running = False
        self._demo_stop = threading.Event()
        self.history = History()
        self.snapshot: MonitorSnapshot | None = None
        self.owners: Ownership = EMPTY
        self.runs: list[RunView] = []
        self.server_info: ServerInfo | None = None
        self.server_busy = False
        self.sub_title = str(workspace.root)
        #: The recording the GPU and host panels replay (its file name), or None for this machine.
        self.replay_name = None if replay is None else Path(replay).name
        if self.replay_name:
            self.title = f"oatui · replay of {self.replay_name}"
        self._owner_finder = OwnerFinder(workspace.runs)
        self._active_runs: tuple[ActiveRun, ...] = ()
        self._gpu_busy = False
        self._runs_busy = False
        self._runs_again = False
        self._states: dict[str, str] = {}
        self._selected: tuple[str, str] | None = None
        self._log_follower: FileFollower | None = None
        #: Followers of the metrics the curves draw, by run id: the selected run and the compared ones.
        self._metrics_followers: dict[str, MetricsFollower] = {}
        #: Runs kept on the curves (key m), in the order they were marked.
        self._compared: list[str] = []
        self._server_checked = False
        self._last_poll_error: str | None = None

    # -- layout -------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        # Handlers reach the panels through these references, not app.query_one: a modal screen
        # (a form, the palette) may be on top when a worker's result arrives.
        self.gpu_panel = GpuPanel(id="gpus")
        self.host_panel = HostPanel(id="host")
        self.run_list = RunList(id="runs")
        self.runs_empty = Static("No runs yet: press 1 (SFT), 2 (RM) or 3 (RL) to launch one.", id="runs-empty")
        self.run_log = RunLog(id="run-log")
        self.run_curves = RunCurves(id="run-curves")
        self.chat_pane = ChatPane(self.workspace, id="chat")
        self.demo_panel = DemoPanel(id="demo")
        self.server_line = ServerLine(id="server-line")
        self.detail = TabbedContent(id="detail", initial="tab-log")
        yield Header(icon="◆")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield self.gpu_panel
                yield self.host_panel
            with Vertical(id="right"):
                with Vertical(id="runs-panel"):
                    yield self.runs_empty
                    yield self.run_list
                with self.detail:
                    with TabPane("Log", id="tab-log"):
                        yield self.run_log
                    with TabPane("Curves", id="tab-curves"):
                        yield self.run_curves
                    with TabPane("Chat", id="tab-chat"):
                        yield self.chat_pane
                    with TabPane("Demo", id="tab-demo"):
                        yield self.demo_panel
        yield self.server_line
        yield MainFooter()

    def on_mount(self) -> None:
        self.query_one("#runs-panel").border_title = "Runs"
        if self.replay_name:
            self.gpu_panel.border_title = f"GPUs · replay of {self.replay_name}"
            self.host_panel.border_title = "Host · recorded"
        self.detail.hide_tab("tab-demo")  # shown once the demo runs
        self.run_log.start(None, "Select a run to follow its log.")
        self._apply_width(self.size.width)
        self.poll()
        self.set_interval(self.refresh_interval, self.poll, name="poll")
        self.run_list.focus()

    def on_resize(self, event: events.Resize) -> None:
        self._apply_width(event.size.width)

    def _apply_width(self, width: int) -> None:
        narrow = width < NARROW_WIDTH
        changed = narrow != self.has_class("-narrow")
        self.set_class(narrow, "-narrow")
        for footer in self.screen.query(Footer):
            footer.compact = width < COMPACT_FOOTER_WIDTH
            if changed:
                footer.call_later(footer.recompose)  # the narrow footer leaves keys off

    def on_unmount(self) -> None:
        # The demo's thread must end for the process to end: it stops its current run and its server.
        self._demo_stop.set()
        try:
            self.source.close()
        except Exception:  # noqa: BLE001 - closing NVML at exit
            pass

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # The single-key actions belong to the main screen: in a form or dialog they stay quiet.
        if action in MAIN_SCREEN_ACTIONS and isinstance(self.screen, ModalScreen):
            return False
        return True

    # -- polling ------------------------------------------------------------------------------
    def poll(self) -> None:
        """Start one GPU sample and one runs read, unless the previous ones are still at work."""
        if not self._gpu_busy:
            self._gpu_busy = True
            self.sample_gpus(self._active_runs)
        self._read_runs_soon()

    def _read_runs_soon(self) -> None:
        """Read the runs now, or as soon as the read in progress has returned."""
        if self._runs_busy:
            self._runs_again = True
            return
        self._runs_busy = True
        self._runs_again = False
        self.read_runs(self._selected, self._log_follower, dict(self._metrics_followers))

    def action_refresh_now(self) -> None:
        self.poll()

    @work(thread=True, exclusive=True, group="gpu-poll", exit_on_error=False)
    def sample_gpus(self, active: tuple[ActiveRun, ...]) -> None:
        try:
            snapshot = self.source.sample()
            try:
                owners = self._owner_finder.find(snapshot, active)
            except Exception:  # noqa: BLE001 - highlighting is a nicety; the numbers still show
                owners = EMPTY
            self.post_message(m.GpuSampled(snapshot, owners))
        except Exception as error:  # noqa: BLE001 - a sampler failure is one line in the panel
            self.post_message(m.GpuSampled(MonitorSnapshot.failed(f"{type(error).__name__}: {error}"), EMPTY))

    @on(Worker.StateChanged)
    def _poll_ended(self, event: Worker.StateChanged) -> None:
        """A poll may start again once the previous one has returned (its thread is done)."""
        if event.state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        if event.worker.group == "gpu-poll":
            self._gpu_busy = False
        elif event.worker.group == "runs-poll":
            self._runs_busy = False
            if self._runs_again:
                self._read_runs_soon()
        else:
            return
        error = event.worker.error
        if event.state == WorkerState.ERROR and error is not None:
            text = f"{event.worker.group}: {type(error).__name__}: {error}"
            if text != self._last_poll_error:  # once, not once per poll
                self._last_poll_error = text
                self.notify(text, severity="error", timeout=10)

    @on(m.GpuSampled)
    def _gpu_sampled(self, message: m.GpuSampled) -> None:
        self.snapshot = message.snapshot
        self.owners = message.owners
        self.history.add(message.snapshot)
        # Without GPUs the GPU panel is one line and the host panel takes the room.
        self.set_class(not message.snapshot.gpus, "-no-gpus")
        if self.gpu_panel.is_attached:
            self.gpu_panel.show(message.snapshot, message.owners, self.history)
            self.host_panel.show(message.snapshot.host, self.history)

    @work(thread=True, exclusive=True, group="runs-poll", exit_on_error=False)
    def read_runs(self, selected: tuple[str, str] | None, log: FileFollower | None,
                  metrics: dict[str, MetricsFollower]) -> None:
        try:
            runs = list_runs(self.workspace.runs)
        except Exception as error:  # noqa: BLE001 - a runs folder we cannot list: say so, keep going
            self.post_message(m.ActionFailed(f"cannot list runs: {error}"))
            runs = []
        self.post_message(m.RunsRefreshed(runs))
        if selected is not None and log is not None:
            run_id, stage = selected
            lines = log.read_new()
            if lines:
                self.post_message(m.LogLinesRead(run_id, lines))
        for run_id, follower in metrics.items():
            records = follower.read_new()
            if records:
                self.post_message(m.MetricsRead(run_id, follower.stage, records, follower=follower))
        try:
            from oatui.serve.server import status

            info = status(self.workspace)
        except Exception:  # noqa: BLE001 - an unreadable server record reads as "not running"
            info = None
        self.post_message(m.ServerChecked(info))

    @on(m.RunsRefreshed)
    def _runs_refreshed(self, message: m.RunsRefreshed) -> None:
        self.runs = message.runs
        table = self.run_list
        if not table.is_attached:
            return
        table.show(message.runs)
        self.runs_empty.display = not message.runs
        table.display = bool(message.runs)
        for run in ended_since(self._states, message.runs):
            self.post_message(m.RunFinished(run.id, run.state))
        self._states.update((run.id, run.state) for run in message.runs)
        active = [ActiveRun(run.id, run.info.pid, run.info.supervisor_pid, run.info.gpus)
                  for run in message.runs if run.info is not None and run.active]
        if self.server_info is not None:
            active.append(ActiveRun("tritonserver", self.server_info.pid, self.server_info.supervisor_pid, None))
        self._active_runs = tuple(active)
        self._follow(table.selected)

    @on(TabbedContent.TabActivated, "#detail")
    def _detail_tab_shown(self, event: TabbedContent.TabActivated) -> None:
        # The chat wants the width more than the GPU panel does: its column widens while it shows.
        self.set_class(event.pane.id == "tab-chat", "-chatting")

    @on(DataTable.RowHighlighted, "#runs")
    def _run_highlighted(self) -> None:
        self._follow(self.run_list.selected)

    def _follow(self, run: RunView | None) -> None:
        """Follow the log and metrics of ``run`` (None: no run) when it is not followed yet."""
        key = None if run is None else (run.id, run.stage)
        if key == self._selected:
            return
        self._selected = key
        self.detail.border_title = None if run is None else run.id
        log_view = self.run_log
        if run is None:
            self._log_follower = None
            log_view.start(None, "Select a run to follow its log.")
            self._show_curve_runs(None)
            return
        self._log_follower = FileFollower(run.path / "stdout.log")
        log_view.start(run.id)
        if run.problem:
            log_view.append([f"{run.id}: {run.problem}"])
        self._show_curve_runs(run)
        self._read_runs_soon()

    def _show_curve_runs(self, selected: RunView | None) -> None:
        """Draw ``selected`` (None: no run) with the compared runs; a run drawn already keeps its
        follower and its points. Compared runs are drawn only beside a selected one."""
        if selected is None:
            self._metrics_followers = {}
            self.run_curves.show_runs(None, ())
            return
        runs = self.run_list.runs
        shown = [selected, *(runs[run_id] for run_id in self._compared if run_id in runs and run_id != selected.id)]
        self._metrics_followers = {
            run.id: self._metrics_followers.get(run.id) or MetricsFollower(run.path / "metrics.jsonl", run.stage)
            for run in shown
        }
        pairs = [(run.id, run.stage if run.info else None) for run in shown]
        self.run_curves.show_runs(pairs[0], pairs[1:])

    @on(m.LogLinesRead)
    def _log_lines_read(self, message: m.LogLinesRead) -> None:
        log_view = self.run_log
        if log_view.is_attached and log_view.run_id == message.run_id:
            log_view.append(message.lines)

    @on(m.MetricsRead)
    def _metrics_read(self, message: m.MetricsRead) -> None:
        curves = self.run_curves
        # Records read by a follower that has since been replaced would be counted twice.
        if curves.is_attached and self._metrics_followers.get(message.run_id) is message.follower:
            curves.add(message.records, message.run_id)

    @on(m.RunFinished)
    def _run_finished(self, message: m.RunFinished) -> None:
        severity = "information" if message.state == "succeeded" else "warning"
        self.notify(f"Run {message.run_id} {message.state}.", severity=severity)

    @on(m.ServerChecked)
    def _server_checked_message(self, message: m.ServerChecked) -> None:
        if self.server_busy:
            return
        changed = not self._server_checked or _server_key(message.info) != _server_key(self.server_info)
        self._server_checked = True
        self.server_info = message.info
        if changed:
            self.chat_pane.set_server(message.info)
            self.server_line.show(message.info)

    @on(m.ActionFailed)
    def _action_failed(self, message: m.ActionFailed) -> None:
        self.notify(message.error, severity="error", timeout=8)

    # -- launching and stopping runs -------------------------------------------------------------
    def action_launch(self, stage: str) -> None:
        def launched(result: tuple[str, str] | None) -> None:
            if result is not None:
                self.post_message(m.RunStarted(*result))

        self.push_screen(LaunchForm(stage, self.workspace.root), launched)

    @on(m.RunStarted)
    def _run_started(self, message: m.RunStarted) -> None:
        self.notify(f"Launched {message.run_id}.")
        self._states[message.run_id] = "queued"
        self.call_after_refresh(self._select_after_refresh, message.run_id, 20)
        self._read_runs_soon()

    def _select_after_refresh(self, run_id: str, tries: int, focus: bool = True) -> None:
        table = self.run_list
        if table.select_run(run_id):
            if focus:
                table.focus()
        elif tries > 0:
            self.set_timer(0.2, lambda: self._select_after_refresh(run_id, tries - 1, focus))

    def selected_run(self) -> RunView | None:
        return self.run_list.selected

    def action_stop_run(self) -> None:
        run = self.selected_run()
        if run is None:
            self.notify("Select a run first.", severity="warning")
            return
        self._confirm_stop(run)

    def _confirm_stop(self, run: RunView) -> None:
        """Ask, then stop ``run``: the runs list's x and the GPU process table's x."""
        if not run.active:
            self.notify(f"Run {run.id} is not running (it {run.state}).", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.stop_selected(run.path)

        self.push_screen(
            ConfirmDialog(f"Stop run {run.id}?", "It saves a checkpoint, then ends as 'stopped'; "
                          "resume it later with 'oatui train --resume'.", yes="Stop"),
            answered,
        )

    @on(ProcessTable.StopAsked)
    def _process_stop_asked(self, message: ProcessTable.StopAsked) -> None:
        if message.run_id is None:
            self.notify(f"Process {message.pid} is not one of this workspace's runs: oatui stops only its own.",
                        severity="warning")
            return
        if message.run_id == "tritonserver":
            self._confirm_server_stop("Stop tritonserver?", "Stop", self._stop_server)
            return
        run = self.run_list.runs.get(message.run_id)
        if run is None:
            self.notify(f"Run {message.run_id} is no longer in the runs list.", severity="warning")
            return
        self._confirm_stop(run)

    @work(thread=True, exclusive=True, group="stop")
    def stop_selected(self, path: Path) -> None:
        try:
            stop_run(RunDir(path))
        except UserError as error:
            self.post_message(m.ActionFailed(str(error)))
        except Exception as error:  # noqa: BLE001 - one line, never a traceback
            self.post_message(m.ActionFailed(f"cannot stop {path.name}: {error}"))
        else:
            self.post_message(m.RunStopRequested(path.name))

    @on(m.RunStopRequested)
    def _stop_requested(self, message: m.RunStopRequested) -> None:
        self.notify(f"Asked {message.run_id} to stop: it saves a checkpoint first.")
        self.poll()

    # -- export and the server -----------------------------------------------------------------
    def action_export(self) -> None:
        run = self.selected_run()
        if run is None:
            self.notify("Select a finished run to export.", severity="warning")
            return
        mode = EXPORT_MODES.get(run.stage)
        if mode is None or not (run.path / "final" / "config.json").is_file():
            self.notify(f"Run {run.id} has no final model to export (yet).", severity="warning")
            return
        target = self.workspace.triton_repo / mode
        if not target.exists():
            self._export(run.id, mode)
            return
        from oatui.serve.repository import read_export_source

        current = read_export_source(target).label() or "a model from outside this workspace's runs"
        detail = f"WORKSPACE/triton/{mode} holds {current}; {run.id} takes its place."
        if self.server_info is not None and mode in self.server_info.models:
            detail += " The running server keeps serving the old one until it restarts (ctrl+t)."

        def answered(yes: bool | None) -> None:
            if yes:
                self._export(run.id, mode)

        self.push_screen(ConfirmDialog(f"Replace the exported '{mode}'?", detail, yes="Replace"), answered)

    def _export(self, run_id: str, mode: str) -> None:
        self.notify(f"Exporting {run_id} as '{mode}'…")
        self.export_run(run_id, mode)

    @work(thread=True, exclusive=True, group="export")
    def export_run(self, run_id: str, mode: str) -> None:
        # In a child process: exporting reads the tokenizer (transformers), which the app never imports.
        argv = [sys.executable, "-m", "oatui.cli", "export", "--mode", mode, "--model", run_id, "--force",
                "--workspace", str(self.workspace.root)]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except (OSError, subprocess.TimeoutExpired) as error:
            self.post_message(m.ExportFinished(run_id, mode, False, str(error)))
            return
        output = (result.stderr.strip() or result.stdout.strip()).splitlines()
        detail = output[-1] if output else f"exit status {result.returncode}"
        self.post_message(m.ExportFinished(run_id, mode, result.returncode == 0, detail))

    @on(m.ExportFinished)
    def _export_finished(self, message: m.ExportFinished) -> None:
        if message.ok:
            note = " Restart the server (ctrl+t) to serve it." if self.server_info is not None else ""
            self.notify(f"Exported {message.run_id} as '{message.name}'.{note}")
            self.chat_pane.list_models()
        else:
            self.notify(f"Export failed: {message.detail}", severity="error", timeout=10)

    def action_toggle_server(self) -> None:
        if self.server_busy:
            self.notify("The server is starting or stopping…", severity="warning")
            return
        if self.server_info is None:
            self.server_busy = True
            self.post_message(m.ServerStarting())
            self.toggle_server(True)
            return
        self._confirm_server_stop("Stop tritonserver?", "Stop", self._stop_server)

    def action_restart_server(self) -> None:
        """Start the server again: after it died, or to serve a new export (stops a running one first)."""
        if self.server_busy:
            self.notify("The server is starting or stopping…", severity="warning")
            return

        def restart() -> None:
            self.server_busy = True
            self.post_message(m.ServerStarting())
            self.toggle_server(True, restart=True)

        self._confirm_server_stop("Restart tritonserver?", "Restart", restart)

    def _confirm_server_stop(self, question: str, yes: str, then: Callable[[], None]) -> None:
        """Ask before ``then`` stops the running server; with none running, nothing to ask."""
        info = self.server_info
        if info is None:
            then()
            return
        served = ", ".join(info.served_label(name) for name in info.models)
        detail = f"It serves {served} on {info.grpc_url}. Answers streaming now stop, and runs that score on it fail."

        def answered(answer: bool | None) -> None:
            if answer and not self.server_busy:
                then()

        self.push_screen(ConfirmDialog(question, detail, yes=yes), answered)

    def _stop_server(self) -> None:
        self.server_busy = True
        self.server_line.show(self.server_info, "stopping")
        self.toggle_server(False)

    @work(thread=True, exclusive=True, group="server")
    def toggle_server(self, start: bool, restart: bool = False) -> None:
        from oatui.serve import server

        try:
            if not start:
                server.stop(self.workspace)
                self.post_message(m.ServerStopped())
                return
            if restart:
                server.stop(self.workspace)
            info = server.status(self.workspace)
            if info is None:
                try:
                    options = server.repository_options(self.workspace.triton_repo, self.server_options)
                except server.NothingToServe as error:
                    raise UserError(f"{error}: select a finished run and press e to export one") from None
                info = server.start_detached(self.workspace, options)
            self.post_message(m.ServerStarted(info))
        except UserError as error:
            self.post_message(m.ServerFailed(str(error)))
        except Exception as error:  # noqa: BLE001 - one line, never a traceback
            self.post_message(m.ServerFailed(f"{type(error).__name__}: {error}"))

    @on(m.ServerStarting)
    def _server_starting(self) -> None:
        self.chat_pane.set_server(None, "Starting tritonserver on the workspace repository…")
        self.server_line.show(None, "starting")

    @on(m.ServerStarted)
    def _server_started(self, message: m.ServerStarted) -> None:
        self.server_busy = False
        self.server_info = message.info
        self.chat_pane.set_server(message.info)
        self.server_line.show(message.info)
        served = ", ".join(message.info.served_label(name) for name in message.info.models)
        self.notify(f"tritonserver ready on {message.info.grpc_url}: {served}.")

    @on(m.ServerStopped)
    def _server_stopped(self) -> None:
        self.server_busy = False
        self.server_info = None
        self.chat_pane.set_server(None)
        self.server_line.show(None)
        self.notify("tritonserver stopped.")

    @on(m.ServerFailed)
    def _server_failed(self, message: m.ServerFailed) -> None:
        self.server_busy = False
        self.chat_pane.set_server(self.server_info)
        self.server_line.show(self.server_info)
        self.notify(f"Server: {message.error}", severity="error", timeout=10)

    # -- focus and views -------------------------------------------------------------------------
    def action_focus_chat(self) -> None:
        self.screen.minimize()
        self.detail.active = "tab-chat"
        self.chat_pane.focus_prompt()
        if self.has_class("-narrow") or self.chat_pane.rank_mode:
            # 80x24 leaves the pane a few lines, and ranking wants the width: give it the screen
            # (Esc gives it back).
            self.screen.maximize(self.chat_pane, container=False)

    def action_toggle_rank(self) -> None:
        if self.screen.maximized is not self.chat_pane:
            self.action_focus_chat()
        self.chat_pane.action_toggle_rank()

    def action_toggle_ab(self) -> None:
        if self.screen.maximized is not self.chat_pane:
            self.action_focus_chat()
        self.chat_pane.action_toggle_ab()

    def action_focus_gpus(self) -> None:
        panel = self.gpu_panel
        if self.screen.maximized is panel:
            self.screen.minimize()
            return
        # The process table when it has rows: its keys sort it and stop a run from it.
        table = panel.process_table
        (table if table.row_count and table.display else panel).focus()
        self.screen.maximize(panel, container=False)

    def action_focus_runs(self) -> None:
        self.screen.minimize()
        self.run_list.focus()

    def action_show_log(self) -> None:
        self.detail.active = "tab-log"

    def action_show_curves(self) -> None:
        self.detail.active = "tab-curves"

    def action_pick_metrics(self) -> None:
        curves = self.run_curves
        if curves.run_id is None:
            self.notify("Select a run first: the picker lists the metrics it logged.", severity="warning")
            return
        self.action_show_curves()

        def picked(names: tuple[str, ...] | None) -> None:
            if names is not None:
                curves.pick(names)

        self.push_screen(MetricPicker(curves.metric_names(), curves.picked), picked)

    def action_smoothing(self, direction: int) -> None:
        self.action_show_curves()
        self.run_curves.step_smoothing(direction)

    def action_compare_run(self) -> None:
        run = self.selected_run()
        if run is None:
            self.notify("Select a run first.", severity="warning")
            return
        if run.id in self._compared:
            self._compared.remove(run.id)
            self.notify(f"{run.id} is no longer kept on the curves.")
        else:
            self._compared.append(run.id)
            self.notify(f"{run.id} stays on the curves: select another run to draw both on the same axes.")
        self.run_list.mark(self._compared)
        self._show_curve_runs(run)
        self.action_show_curves()
        self._read_runs_soon()

    def action_zoom(self) -> None:
        screen = self.screen
        if screen.maximized is not None:
            screen.minimize()
            return
        focused = self.focused
        if focused is None or screen.maximize(focused):
            return
        # A widget that does not zoom by itself (the chat transcript): its nearest panel that does.
        for widget in focused.ancestors:
            if isinstance(widget, Widget) and widget.allow_maximize:
                screen.maximize(widget, container=False)
                return

    def action_unzoom(self) -> None:
        self.screen.minimize()

    def action_new_conversation(self) -> None:
        self.action_focus_chat()
        self.run_worker(self.chat_pane.action_new_conversation(), exclusive=False)

    def action_chat_options(self) -> None:
        self.chat_pane.action_options()

    def action_copy_answer(self) -> None:
        self.chat_pane.action_copy_answer()

    # -- the demo flow ----------------------------------------------------------------------------
    def action_demo(self) -> None:
        if self.demo_running:
            self.action_stop_demo()
            return
        detail = ("Data → SFT → RM → RL → export → serve → chat → compare, on the tiny default: several "
                  "minutes. Each stage is a run in this workspace; the RL policy, the SFT policy and the "
                  "reward model are exported to WORKSPACE/triton (replacing models of those names) and "
                  "served by a tritonserver the demo starts and stops.")
        if self.server_info is not None:
            detail += " The running tritonserver is stopped first."

        def answered(yes: bool | None) -> None:
            if yes:
                self._start_demo(stop_server_first=self.server_info is not None)

        self.push_screen(ConfirmDialog("Run the whole demo flow?", detail, yes="Run"), answered)

    def _start_demo(self, stop_server_first: bool) -> None:
        from oatui.demo import PHASES

        self.demo_running = True
        self._demo_stop.clear()
        self.demo_panel.start(PHASES)
        self.action_show_demo()
        self.run_demo(self.demo_options, stop_server_first)

    def action_show_demo(self) -> None:
        self.screen.minimize()
        self.detail.show_tab("tab-demo")
        self.detail.active = "tab-demo"
        self.demo_panel.focus()
        if self.has_class("-narrow"):
            self.screen.maximize(self.demo_panel, container=False)

    def action_stop_demo(self) -> None:
        if not self.demo_running:
            self.notify("The demo is not running.", severity="warning")
            return
        if self._demo_stop.is_set():
            return

        def answered(yes: bool | None) -> None:
            if yes and self.demo_running:
                self._demo_stop.set()
                self.demo_panel.stop_requested()

        self.push_screen(ConfirmDialog("Stop the demo?", "The current run saves a checkpoint and stops; the "
                                       "rest is skipped and the demo's server is stopped.", yes="Stop"), answered)

    async def action_quit(self) -> None:
        if not self.demo_running:
            self.exit()
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._demo_stop.set()
                self.exit(message="oatui: the demo was stopped; its current run saves a checkpoint and stops, "
                                  "and its server stops.")

        self.push_screen(ConfirmDialog("Quit and stop the demo?", "The demo runs inside the app: quitting stops "
                                       "it (its current run saves a checkpoint and stops, its server stops). "
                                       "Other runs and servers keep going.", yes="Quit"), answered)

    @work(thread=True, exclusive=True, group="demo", exit_on_error=False)
    def run_demo(self, options: DemoOptions | None, stop_server_first: bool) -> None:
        from oatui.demo import Demo, DemoOptions, format_summary

        results: list[PhaseResult] = []
        try:
            if stop_server_first:
                from oatui.serve.server import stop

                stop(self.workspace)

            def report(event: DemoEvent) -> None:
                self.post_message(m.DemoReported(event))

            demo = Demo(self.workspace, report, options or DemoOptions(), should_stop=self._demo_stop.is_set)
            results = demo.run()
            self.post_message(m.DemoFinished(results, format_summary(results), demo.succeeded))
        except Exception as error:  # noqa: BLE001 - shown in the panel, never a traceback
            summary = format_summary(results) if results else ""
            self.post_message(m.DemoFinished(results, summary, False, f"{type(error).__name__}: {error}"))

    @on(m.DemoReported)
    def _demo_reported(self, message: m.DemoReported) -> None:
        event = message.event
        self.demo_panel.report(event)
        if event.kind == "progress" and event.text.startswith("run "):
            # The stage's run shows in the runs panel: select it so l and v follow it.
            self._read_runs_soon()
            self._select_after_refresh(event.text[4:].strip(), 20, focus=False)

    @on(m.DemoFinished)
    def _demo_finished(self, message: m.DemoFinished) -> None:
        self.demo_running = False
        self.demo_panel.finish(message.results, message.summary, message.succeeded, message.error)
        self.notify(self.demo_panel.outcome or "The demo ended.",
                    severity="information" if message.succeeded else "error", timeout=10)
        self.poll()

    def action_help(self) -> None:
        self.push_screen(HelpDialog(KEYS, "Runs and the server are detached: they keep going after q, "
                                          "and the app shows them again when reopened."))


def _server_key(info: ServerInfo | None) -> tuple[int, str, tuple[str, ...]] | None:
    return None if info is None else (info.pid, info.grpc_url, tuple(info.models))


def make_app(
    workspace: str | os.PathLike[str] | Workspace | None = None,
    replay: str | os.PathLike[str] | None = None,
    refresh: float = 1.0,
    *,
    source: SnapshotSource | None = None,
    server_options: dict[str, Any] | None = None,
    demo_options: DemoOptions | None = None,
) -> OatuiApp:
    """The app on ``workspace``, its GPU panel fed by ``replay`` (a recording) or this machine.

    ``refresh`` is the seconds between two samples of the GPUs and two reads of the runs.
    ``source`` replaces the snapshot source (tests); ``server_options`` are extra
    ``ServerOptions`` fields (ports, ready timeout) for the server the ``s`` key starts (without
    ports: 8000-8002, or free ports when those are taken). ``demo_options`` configure the demo
    flow of the ``a`` key (default: ``DemoOptions()``, as ``oatui demo``).
    A bad recording or refresh is a ``UserError`` raised here, before anything is drawn.
    """
    if refresh <= 0 or refresh != refresh:
        raise UserError(f"--refresh {refresh}: must be a number of seconds above 0")
    workspace = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
    if source is None:
        source = make_source(replay, workspace.root)
    return OatuiApp(workspace, source, refresh=refresh, server_options=server_options, demo_options=demo_options,
                    replay=replay)
