"""The selected run's log: follows the end of ``stdout.log``, wraps long lines, keeps a bounded buffer.

The bytes are read by the app's run poller (``oatui.app.follow.FileFollower``); this widget only
appends the lines it is given.
"""

from __future__ import annotations

import re

from rich.text import Text
from textual.widgets import RichLog

MAX_LINES = 2000
_ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_line(line: str) -> str:
    """What a terminal would show of a log line: the text after the last carriage return
    (progress bars redraw that way), without escape sequences or other control characters."""
    if "\r" in line:
        line = line.rsplit("\r", 1)[-1]
    line = _ANSI.sub("", line)
    return _CONTROL.sub("", line).expandtabs(4)


class RunLog(RichLog):
    ALLOW_MAXIMIZE = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(max_lines=MAX_LINES, wrap=True, markup=False, highlight=False, auto_scroll=True,
                         **kwargs)  # type: ignore[arg-type]
        self.run_id: str | None = None
        self.line_count = 0

    def start(self, run_id: str | None, placeholder: str = "") -> None:
        """Show another run's log from its start (or a placeholder when no run is selected)."""
        self.run_id = run_id
        self.line_count = 0
        self.clear()
        if placeholder:
            self.write(Text(placeholder, style="dim"))

    def append(self, lines: list[str]) -> None:
        if not lines:
            return
        # One write per batch: RichLog renders each write separately.
        self.write(Text("\n".join(clean_line(line) for line in lines)))
        self.line_count += len(lines)
