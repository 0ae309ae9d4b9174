"""The demo flow (key a) as it runs: one line per phase, the streamed chat answer, the summary.

The app runs ``oatui.demo.Demo`` in a thread worker and hands each ``DemoEvent`` here (through
``DemoReported`` messages); this panel only draws them. While the demo runs, a one-second timer
moves the running phase's clock; it stops with the demo, so an idle app stays idle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import ScrollableContainer
from textual.widgets import Static

from oatui.app.widgets.runs_panel import clock

STATE_MARKS = {
    "pending": ("·", "dim"),
    "running": ("▶", "bold yellow"),
    "ok": ("✔", "bold green"),
    "failed": ("✗", "bold red"),
    "skipped": ("–", "dim"),
}


@dataclass
class PhaseLine:
    name: str
    state: str = "pending"
    started: float | None = None
    elapsed: float | None = None
    text: str = ""
    run_id: str | None = None


class DemoPanel(ScrollableContainer, can_focus=True):
    """Phase lines, the chat answer and the final summary of the demo flow."""

    ALLOW_MAXIMIZE = True
    BINDINGS = [Binding("x", "stop_demo", "Stop demo")]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.phases: dict[str, PhaseLine] = {}
        self.running = False
        self.stopping = False
        self.outcome: str | None = None
        self.chat_text = ""
        self._started = 0.0
        self._ticker: Any = None
        self._headline = Static("Press a to run the whole flow on the tiny default.", id="demo-headline")
        self._lines = Static("", id="demo-phases")
        self._chat = Static("", id="demo-chat", markup=False)
        self._summary = Static("", id="demo-summary", markup=False)

    def compose(self) -> ComposeResult:
        yield self._headline
        yield self._lines
        yield self._chat
        yield self._summary

    def on_mount(self) -> None:
        self._chat.display = False
        self._summary.display = False

    # -- what the app feeds in ----------------------------------------------------------------
    def start(self, phases: tuple[str, ...]) -> None:
        self.phases = {name: PhaseLine(name) for name in phases}
        self.running = True
        self.stopping = False
        self.outcome = None
        self.chat_text = ""
        self._started = time.monotonic()
        self.remove_class("-failed", "-succeeded")
        self._chat.display = False
        self._summary.display = False
        self._headline.update("Running the demo: data → SFT → RM → RL → export → serve → chat → compare "
                              "(x or a stops it)")
        self._draw()
        self.refresh_bindings()
        if self._ticker is None:
            self._ticker = self.set_interval(1.0, self._draw, name="demo-clock")

    def report(self, event: Any) -> None:
        """One ``oatui.demo.DemoEvent``."""
        line = self.phases.setdefault(event.phase, PhaseLine(event.phase))
        if event.kind == "start":
            line.state, line.started, line.text = "running", time.monotonic(), ""
        elif event.kind == "progress":
            if event.text.startswith("run "):
                line.run_id = event.text[4:].strip()
            else:
                line.text = event.text
        elif event.kind == "end":
            result = event.result
            ok = None if result is None else result.ok
            line.state = {True: "ok", False: "failed", None: "skipped"}[ok]
            line.elapsed = event.elapsed
            line.text = event.text
        elif event.kind == "piece":
            self.chat_text += event.text
            self._chat.display = True
            self._chat.update(self.chat_text.strip("\n"))
            return
        self._draw()

    def finish(self, results: list[Any], summary: str, succeeded: bool, error: str | None = None) -> None:
        self.running = False
        self.stopping = False
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        for result in results:
            line = self.phases.setdefault(result.name, PhaseLine(result.name))
            if line.state in ("pending", "running"):
                line.state = {True: "ok", False: "failed", None: "skipped"}[result.ok]
                line.elapsed = result.seconds
                line.text = result.metric or result.detail
        total = clock(time.monotonic() - self._started)
        if succeeded:
            self.outcome = f"✔ Demo finished: every phase succeeded in {total}."
        else:
            failed = next((result for result in results if result.ok is False), None)
            if error:
                reason = f"the demo stopped: {error}"
            elif failed is not None:
                reason = f"{failed.name}: {failed.detail or 'failed'}"
            else:
                reason = "not every phase ran"
            stop = next((result for result in results if result.name == "stop"), None)
            tail = ""
            if stop is not None and failed is not stop:
                tail = f" · {stop.metric or stop.detail}"
            self.outcome = " ".join(f"✗ Demo failed at {reason}{tail}".split())
        self.set_class(succeeded, "-succeeded")
        self.set_class(not succeeded, "-failed")
        self._headline.update(self.outcome)
        self._draw()
        self.refresh_bindings()
        if summary:
            self._summary.display = True
            self._summary.update(Text(summary, no_wrap=True))

    def stop_requested(self) -> None:
        self.stopping = True
        self.refresh_bindings()
        self._headline.update("Stopping the demo: the current run saves a checkpoint and stops, "
                              "then the server is stopped…")

    # -- drawing ----------------------------------------------------------------------------------
    def _draw(self) -> None:
        table = Table(box=None, show_header=False, expand=True, padding=(0, 1))
        table.add_column(width=1, no_wrap=True)
        table.add_column(width=8, no_wrap=True, style="bold")
        table.add_column(width=6, no_wrap=True, justify="right")
        table.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        now = time.monotonic()
        for line in self.phases.values():
            mark, style = STATE_MARKS[line.state]
            if line.elapsed is not None:
                elapsed = clock(line.elapsed)
            elif line.started is not None and line.state == "running":
                elapsed = clock(now - line.started)
            else:
                elapsed = ""
            detail = line.text
            if line.run_id:
                detail = f"{line.run_id} · {detail}" if detail else line.run_id
            table.add_row(Text(mark, style=style), line.name, elapsed,
                          Text(detail, style="red" if line.state == "failed" else ""))
        self._lines.update(table)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop_demo":
            return self.running and not self.stopping
        return True

    def action_stop_demo(self) -> None:
        self.app.action_stop_demo()  # type: ignore[attr-defined]
