"""Messages the app's workers post back to the UI, named for what happened.

Workers never touch widgets; they post one of these, and handlers (``@on(...)``) draw it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textual.message import Message

from oatui.monitor import MonitorSnapshot
from oatui.monitor.owners import Ownership

if TYPE_CHECKING:
    from oatui.serve.record import ServerInfo
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
    """Metrics records appended to a drawn run's metrics.jsonl (the selected run's or a compared
    one's) since the last poll."""

    def __init__(self, run_id: str, stage: str, records: list[dict[str, Any]], reset: bool = False,
                 follower: object = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.stage = stage
        self.records = records
        self.reset = reset
        #: The follower that read them: records of a replaced follower are not drawn.
        self.follower = follower


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
    #: Answers sampled per prompt in rank mode (seeds S, S+1, ...).
    rank_count: int = 3

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


class AnswerPieceReceived(Message):
    """Pieces of answer ``index`` of a round (several answers streamed at once), batched like
    ``TokenReceived``."""

    def __init__(self, index: int, text: str) -> None:
        super().__init__()
        self.index = index
        self.text = text


class RoundAnswerFinished(Message):
    """Answer ``index`` of a round ended: complete, cancelled or failed (``error``)."""

    def __init__(self, index: int, text: str, state: str, error: str | None = None) -> None:
        super().__init__()
        self.index = index
        self.text = text
        self.state = state
        self.error = error


class RoundAnswersFinished(Message):
    """Every answer of a round is in (``complete``), or they stopped (Esc: ``cancelled``) or one failed."""

    def __init__(self, state: str, error: str | None = None) -> None:
        super().__init__()
        self.state = state
        self.error = error


class RoundSaved(Message):
    """A round's outcome was appended to the feedback file ``path``; the conversation goes on from the
    answer it kept."""

    def __init__(self, path: Any, conversation_id: int | None, turns: list[tuple[str, str, int | None]],
                 history_error: str | None = None) -> None:
        super().__init__()
        self.path = path
        self.conversation_id = conversation_id
        #: The prompter turn and the kept answer, as the chat pane keeps turns (role, text, message id).
        self.turns = turns
        self.history_error = history_error


class RoundSaveFailed(Message):
    """A round's outcome could not be written (nothing was appended)."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class RankPieceReceived(AnswerPieceReceived):
    """Pieces of answer ``index`` of a rank round."""


class RankAnswerFinished(RoundAnswerFinished):
    """Answer ``index`` of a rank round ended."""


class RankSamplingFinished(RoundAnswersFinished):
    """Every answer of a rank round is in (``complete``), or sampling stopped (Esc) or failed."""


class RankingSaved(RoundSaved):
    """A ranking was appended to the feedback file; the conversation goes on from the best answer."""

    def __init__(self, path: Any, tree_id: str, ranked: tuple[int, ...], rejected: tuple[int, ...],
                 best_text: str, conversation_id: int | None, turns: list[tuple[str, str, int | None]],
                 history_error: str | None = None) -> None:
        super().__init__(path, conversation_id, turns, history_error)
        self.tree_id = tree_id
        self.ranked = ranked
        self.rejected = rejected
        self.best_text = best_text


class RankingFailed(RoundSaveFailed):
    """The ranking could not be written (nothing was appended)."""


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


class DemoReported(Message):
    """One event of the demo flow (a phase started, progressed or ended, or a piece of the chat)."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event


class DemoFinished(Message):
    """The demo flow ended; ``results`` holds one ``PhaseResult`` per phase (``error``: it crashed)."""

    def __init__(self, results: list[Any], summary: str, succeeded: bool, error: str | None = None) -> None:
        super().__init__()
        self.results = results
        self.summary = summary
        self.succeeded = succeeded
        self.error = error
