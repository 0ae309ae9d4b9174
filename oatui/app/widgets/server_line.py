"""The server line above the footer: the workspace's tritonserver, always in sight from every view.

Running: its gRPC address and each served model with the run it was exported from (and that
run's step); else whether it is starting, stopping or not running, and the key that changes that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.widgets import Static

if TYPE_CHECKING:
    from oatui.serve.record import ServerInfo


def server_text(info: ServerInfo | None, busy: str | None = None, checked: bool = True) -> Text:
    """The line for ``info`` (None: not running); ``busy`` ("starting", "stopping") wins over both."""
    text = Text()
    text.append("Server ", style="bold")
    if busy:
        text.append("◌ ", style="yellow")
        text.append(f"{busy}…", style="italic")
        return text
    if info is None:
        if not checked:
            text.append("…", style="dim")
            return text
        text.append("○ ", style="dim")
        text.append("not running", style="bold")
        text.append("  s starts it on the workspace repository", style="dim")
        return text
    text.append("● ", style="green")
    text.append("ready ", style="bold green")
    text.append(info.grpc_url)
    for index, name in enumerate(info.models):
        text.append("  ·  " if index else "  ", style="dim")
        text.append(name, style="bold")
        source = info.model_source(name)
        if source.run_id is not None:
            text.append(f" ← {source.run_id}")
            if source.step is not None:
                text.append(f" step {source.step}", style="dim")
    return text


class ServerLine(Static):
    """One line: the server's state, address and served models, kept up to date by the app."""

    DEFAULT_CSS = """
    ServerLine {
        height: 1;
    }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(server_text(None, checked=False), **kwargs)  # type: ignore[arg-type]
        self.info: ServerInfo | None = None
        self.busy: str | None = None

    def show(self, info: ServerInfo | None, busy: str | None = None) -> None:
        self.info = info
        self.busy = busy
        self.update(server_text(info, busy))
