"""Messages the app's workers post back to the UI, named for what happened.

Workers never touch widgets; they post one of these, and handlers (``@on(...)``) draw it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textual.message import Message

from oatui.app.owners import Ownership
from oatui.monitor import MonitorSnapshot

if TYPE_CHECKING:
    from oatui.serve.server import ServerInfo
    from oatui.stages.runs import RunView


class GpuSampled(Message):
    """A new monitor snapshot, with the GPU processes and GPUs that belong to our runs."""

    def __init__(self, snapshot: MonitorSnapshot, owners: Ownership) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.owners = owners


class RunsRefreshed(Message):
    """The runs of the workspace, newest first."""

    def __init__(self, runs: list[RunView]) -> None:
        super().__init__()
        self.runs = runs


class RunStarted(Message):
    def __init__(self, run_id: str, stage: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.stage = stage


class RunFinished(Message):
    """A run this app saw active is no longer (succeeded, failed or stopped)."""

    def __init__(self, run_id: str, state: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.state = state


class RunStopRequested(Message):
    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id


class LogLinesRead(Message):
    """Lines appended to the selected run's log since the last poll."""

    def __init__(self, run_id: str, lines: list[str], reset: bool = False) -> None:
        super().__init__()
        self.run_id = run_id
        self.lines = lines
        self.reset = reset


class MetricsRead(Message):
    """Metrics records appended to the selected run's metrics.jsonl since the last poll."""

    def __init__(self, run_id: str, stage: str, records: list[dict[str, Any]], reset: bool = False) -> None:
        super().__init__()
        self.run_id = run_id
        self.stage = stage
        self.records = records
        self.reset = reset


class ServerChecked(Message):
    """The workspace's Triton server as found now (None: not running)."""

    def __init__(self, info: ServerInfo | None) -> None:
        super().__init__()
        self.info = info


class ServerStarting(Message):
    pass


class ServerStarted(Message):
    def __init__(self, info: ServerInfo) -> None:
        super().__init__()
        self.info = info


class ServerStopped(Message):
    pass


class ServerFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class ExportFinished(Message):
    def __init__(self, run_id: str, name: str, ok: bool, detail: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.name = name
        self.ok = ok
        self.detail = detail


class ActionFailed(Message):
    """A keyboard action that could not be done, with one line saying why."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


@dataclass(frozen=True)
class ChatSettings:
    """What the chat pane sends with a prompt."""

    model: str = "policy"
    system: str = ""
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    #: Generate exactly ``max_new_tokens`` (load tests, long streams), EOS or not.
    ignore_eos: bool = False

    def sampling(self) -> dict[str, Any]:
        values: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p,
                                  "max_new_tokens": self.max_new_tokens}
        if self.ignore_eos:
            values["ignore_eos"] = True
        return values


class TokenReceived(Message):
    """Pieces of the answer being streamed (batched: one message per screen refresh at most)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class AnswerFinished(Message):
    """The stream ended: complete, cancelled (Esc) or failed (``error``)."""

    def __init__(self, text: str, state: str, error: str | None = None) -> None:
        super().__init__()
        self.text = text
        self.state = state
        self.error = error


class ConversationsLoaded(Message):
    def __init__(self, conversations: list[Any], selected: int | None = None) -> None:
        super().__init__()
        self.conversations = conversations
        self.selected = selected


class ConversationOpened(Message):
    def __init__(self, conversation: Any, messages: list[Any]) -> None:
        super().__init__()
        self.conversation = conversation
        self.messages = messages


class ModelsListed(Message):
    """The decoupled (streaming) models of the workspace's Triton repository."""

    def __init__(self, models: list[str]) -> None:
        super().__init__()
        self.models = models
