"""The selected run's log: follows the end of ``stdout.log``, wraps long lines, keeps a bounded buffer.

The bytes are read by the app's run poller (``oatui.app.follow.FileFollower``); this widget only
appends the lines it is given. Lines are wrapped to the panel's width, and wrapped again from the
kept lines whenever that width changes (a resize of the terminal, zoom in or out), so every part of
a long line stays readable.
"""

from __future__ import annotations

import re
from collections import deque

from rich.text import Text
from textual.events import Resize
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
        super().__init__(max_lines=MAX_LINES, min_width=1, wrap=True, markup=False, highlight=False,
                         auto_scroll=True, **kwargs)  # type: ignore[arg-type]
        self.run_id: str | None = None
        self.line_count = 0
        #: The cleaned lines, kept to wrap them again when the width changes.
        self.kept: deque[str] = deque(maxlen=MAX_LINES)
        self.placeholder = ""
        #: The width the shown lines were wrapped to (0: not drawn yet).
        self.wrap_width = 0

    def start(self, run_id: str | None, placeholder: str = "") -> None:
        """Show another run's log from its start (or a placeholder when no run is selected)."""
        self.run_id = run_id
        self.line_count = 0
        self.kept.clear()
        self.placeholder = placeholder
        self._rewrap(self._width())

    def append(self, lines: list[str]) -> None:
        if not lines:
            return
        cleaned = [clean_line(line) for line in lines]
        self.kept.extend(cleaned)
        self.line_count += len(lines)
        width = self._width()
        if self.placeholder or width != self.wrap_width:
            self.placeholder = ""  # the first lines take its place
            self._rewrap(width)
        elif width:
            # One write per batch: RichLog renders each write separately.
            self.write(Text("\n".join(cleaned)), width=width)

    def on_resize(self, event: Resize) -> None:
        width = self._width()
        if width and width != self.wrap_width:
            self._rewrap(width)

    def _width(self) -> int:
        return max(0, self.scrollable_content_region.width)

    def _rewrap(self, width: int) -> None:
        """Draw the kept lines (or the placeholder) again, wrapped to ``width``."""
        self.clear()
        self.wrap_width = width
        if not width:
            return  # not laid out yet: the first resize draws
        if self.kept:
            self.write(Text("\n".join(self.kept)), width=width)
        elif self.placeholder:
            self.write(Text(self.placeholder, style="dim"), width=width)
