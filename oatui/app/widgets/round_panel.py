"""A round of the chat pane: several answers to one prompt, streamed at once, judged by the person.

The base of rank mode's panel (K answers put in order, ``rank_panel``) and blind A/B's (two
models' answers, one chosen, ``ab_panel``). A panel holds its whole round: it streams the answers
(one client and one gRPC stream each, so the server generates them together), takes the person's
keys, saves the outcome in a thread (the feedback file through ``oatui.chat``, then the prompt and
the kept answer in the chat history) and tells the chat pane that the round is over with
:class:`RoundPanel.Closed`. Where the round stands is one :class:`RoundPhase`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Static
from textual.worker import Worker, WorkerState

from oatui.app.messages import (
    AnswerPieceReceived,
    ChatSettings,
    RoundAnswerFinished,
    RoundAnswersFinished,
    RoundSaved,
    RoundSaveFailed,
)
from oatui.app.streaming import ANSWER_TIMEOUT, close_quietly, one_line, stream_in_batches

if TYPE_CHECKING:
    from oatui.chat.history import ChatHistory

ANSWERS_GROUP = "round-answers"
SAVE_GROUP = "round-save"


class RoundPhase(Enum):
    """Where a round stands. A panel goes GENERATING → RANKING ⇄ SAVING → DONE (or from GENERATING
    or RANKING straight to DONE: stopped, failed or skipped); the chat pane is IDLE between rounds."""

    IDLE = "idle"
    """No round open (the chat pane's phase between rounds)."""
    GENERATING = "generating"
    """The answers stream in; Esc stops them."""
    RANKING = "ranking"
    """Every answer is in: the person orders or chooses; Enter saves, Esc skips."""
    SAVING = "saving"
    """The outcome is being written; the keys wait (a failure goes back to RANKING)."""
    DONE = "done"
    """Saved, skipped, stopped or failed: the chat pane closes the panel."""


@dataclass(frozen=True)
class RoundRequest:
    """What a round takes from the chat pane."""

    prompt: str
    #: The conversation so far and the prompt, as ``(role, text)`` turns.
    context: list[tuple[str, str]]
    settings: ChatSettings
    url: str
    feedback_file: Path
    #: Opens the chat history; called in the save thread (the store may be slow or broken).
    history: Callable[[], ChatHistory]
    conversation_id: int | None = None
    #: The chat-history id of the turn the prompt answers.
    parent_id: int | None = None
    #: The training run behind each served model, when the server knows it.
    runs: dict[str, str | None] = field(default_factory=dict)


#: Enter and Esc, the same in every round.
ROUND_KEYS = [
    Binding("enter", "confirm", "Save"),
    Binding("escape", "stop", "Stop/skip"),
]


class AnswerCard(VerticalScroll):
    """One answer of a round; its border names it (a number, or A and B) and says its state."""

    def __init__(self, index: int, title: str, classes: str = "") -> None:
        super().__init__(classes=" ".join(["rank-card", *classes.split(), "-waiting"]))
        self.index = index
        self.can_focus = False
        self.body = Static("", classes="rank-card-body", markup=False)
        self.border_title = title

    def compose(self) -> ComposeResult:
        yield self.body


class _AnswerFailed(Exception):
    """One answer failed; the round's other answers are stopped."""


class RoundPanel(Vertical, can_focus=True):
    """One round: ``count`` answers streamed at once, the person's keys, the outcome saved."""

    #: The messages this kind of round posts (subclasses name their own).
    PieceReceived: type[AnswerPieceReceived] = AnswerPieceReceived
    AnswerFinished: type[RoundAnswerFinished] = RoundAnswerFinished
    AnswersFinished: type[RoundAnswersFinished] = RoundAnswersFinished
    #: The ids of the panel's widgets start with this.
    ID_PREFIX = "round"
    #: The chat pane's notice when the answers were stopped, and its failure when one failed silently.
    STOPPED_NOTICE = "Answers stopped: nothing saved."
    FAILED_NOTICE = "an answer failed"

    @dataclass
    class Closed(Message):
        """The round is over: ``saved`` (the chat pane takes its turns), or skipped, stopped or failed
        (``prompt`` goes back into the input, ``failure`` is the error if any)."""

        prompt: str
        saved: RoundSaved | None = None
        notice: str | None = None
        failure: str | None = None

    def __init__(self, request: RoundRequest, count: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.request = request
        self.prompt = request.prompt
        self.count = count
        self.texts = [""] * count
        self.states = ["waiting"] * count
        self.phase = RoundPhase.GENERATING
        self.note = ""
        self._header = Static("", id=f"{self.ID_PREFIX}-header")
        self.cards: list[AnswerCard] = []

    def on_mount(self) -> None:
        self._refresh_all()

    # -- the answers, all at once -------------------------------------------------------------------
    def streams(self) -> list[tuple[str, int]]:
        """The model and seed of each answer."""
        raise NotImplementedError

    def answer_failure(self, index: int, error: str) -> str:
        """The round's error when answer ``index`` failed."""
        return error

    @work(exclusive=True, group=ANSWERS_GROUP)
    async def generate(self) -> tuple[str, str | None]:
        """Stream every answer concurrently; returns how they ended (``complete`` or ``error`` and the
        error), which ``on_worker_state_changed`` posts as ``AnswersFinished``, as it posts a cancel
        (Esc), at any moment. A failed answer stops the others."""
        try:
            async with asyncio.TaskGroup() as group:
                for index, (model, seed) in enumerate(self.streams()):
                    group.create_task(self._answer(index, model, seed))
        except ExceptionGroup as failures:
            first = failures.exceptions[0]
            return "error", str(first) if isinstance(first, _AnswerFailed) else f"{type(first).__name__}: {first}"
        except Exception as failure:  # noqa: BLE001 - shown in the pane, never a traceback
            return "error", f"{type(failure).__name__}: {failure}"
        return "complete", None

    async def _answer(self, index: int, model: str, seed: int) -> None:
        from oatui.serve.client import AsyncChatClient, RemoteError, ServerUnavailable

        request = self.request
        client = AsyncChatClient(request.url, model=model, timeout=ANSWER_TIMEOUT, retries=2)
        pieces: list[str] = []
        state, error = "complete", None
        try:
            await stream_in_batches(client, request.context, request.settings, pieces,
                                    lambda text: self.post_message(self.PieceReceived(index, text)), seed=seed)
        except (ServerUnavailable, RemoteError, ValueError) as failure:
            state, error = "error", str(failure)
        except asyncio.CancelledError:
            state = "cancelled"
            raise
        finally:
            self.post_message(self.AnswerFinished(index, "".join(pieces), state, error))
            await close_quietly(client)
        if error is not None:
            raise _AnswerFailed(self.answer_failure(index, error))

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # Posted from here, not from the worker: a worker cancelled before its body ran (Esc at once)
        # ends all the same.
        if event.worker.group != ANSWERS_GROUP:
            return
        if event.state == WorkerState.SUCCESS:
            state, error = event.worker.result
        elif event.state == WorkerState.CANCELLED:
            state, error = "cancelled", None
        elif event.state == WorkerState.ERROR:
            failure = event.worker.error
            state, error = "error", f"{type(failure).__name__}: {failure}"
        else:
            return
        self.post_message(self.AnswersFinished(state, error))

    @on(AnswerPieceReceived)
    def _piece(self, message: AnswerPieceReceived) -> None:
        self.add_text(message.index, message.text)

    @on(RoundAnswerFinished)
    def _answer_finished(self, message: RoundAnswerFinished) -> None:
        self.finish_answer(message.index, message.text, message.state)

    @on(RoundAnswersFinished)
    def _answers_finished(self, message: RoundAnswersFinished) -> None:
        self.sampling_finished(message.state, message.error)

    def add_text(self, index: int, text: str) -> None:
        if self.states[index] == "waiting":
            self.states[index] = "streaming"
            self._refresh_card(index)
            self.stream_started(index)
        self.texts[index] += text
        self.cards[index].body.update(self.texts[index])
        self.text_added(index)

    def stream_started(self, index: int) -> None:
        """Answer ``index`` sent its first text."""

    def text_added(self, index: int) -> None:
        """Answer ``index`` grew."""

    def finish_answer(self, index: int, text: str, state: str) -> None:
        self.texts[index] = text.strip() if state == "complete" else text
        self.states[index] = state
        self.cards[index].body.update(self.texts[index])
        self._refresh_card(index)

    def sampling_finished(self, state: str, error: str | None = None) -> None:
        """Every answer ended: the person's turn when all are in; otherwise the round is over."""
        if state == "complete":
            self.phase = RoundPhase.RANKING
            self.answers_in()
            self._refresh_all()
        elif state == "error":
            self.close(failure=error or self.FAILED_NOTICE)
        else:
            self.close(notice=self.STOPPED_NOTICE)

    def answers_in(self) -> None:
        """Every answer is in; the person's turn starts."""

    # -- the person's keys ------------------------------------------------------------------------
    def _ready(self) -> bool:
        if self.phase is RoundPhase.GENERATING:
            self.set_note("the answers are still coming (Esc stops)")
            return False
        return self.phase is RoundPhase.RANKING

    def action_confirm(self) -> None:
        if not self._ready() or not self.can_save():
            return
        self.phase = RoundPhase.SAVING
        self.set_note("saving…")
        self.start_saving()

    def can_save(self) -> bool:
        """Whether the person's choice can be saved as it stands (if not, the note says why)."""
        return True

    def start_saving(self) -> None:
        """Start the save worker (which posts a ``RoundSaved`` or ``RoundSaveFailed``)."""
        raise NotImplementedError

    def action_stop(self) -> None:
        if self.phase is RoundPhase.GENERATING:
            self.set_note("stopping…")
            self.workers.cancel_group(self, ANSWERS_GROUP)
        elif self.phase is RoundPhase.RANKING:
            self.close(notice="Skipped: nothing saved.")

    def scrolled_cards(self) -> list[AnswerCard]:
        """The cards page up and page down scroll."""
        return self.cards

    def action_scroll_answers(self, direction: int) -> None:
        for card in self.scrolled_cards():
            if direction < 0:
                card.scroll_page_up(animate=False)
            else:
                card.scroll_page_down(animate=False)

    def close(self, saved: RoundSaved | None = None, notice: str | None = None, failure: str | None = None) -> None:
        self.phase = RoundPhase.DONE
        self.post_message(self.Closed(self.prompt, saved=saved, notice=notice, failure=failure))

    # -- saving -----------------------------------------------------------------------------------
    def keep(self, text: str, model: str | None, seed: int,
             conversation_model: str | None) -> tuple[int | None, list[tuple[str, str, int | None]], str | None]:
        """Keep the prompt and the answer the conversation goes on from in the chat history (a new
        conversation, for ``conversation_model``, when there is none yet); run in the save thread.
        Returns the conversation, the two turns as the chat pane keeps them, and the history's error,
        if any (the round is saved all the same)."""
        request = self.request
        settings = request.settings
        prompt = request.prompt
        turns: list[tuple[str, str, int | None]] = [("prompter", prompt, None), ("assistant", text, None)]
        conversation_id, history_error = request.conversation_id, None
        try:
            history = request.history()
            if conversation_id is None:
                conversation_id = history.new_conversation(prompt, model=conversation_model,
                                                           system=settings.system or None,
                                                           params=settings.sampling()).id
            asked = history.add_message(conversation_id, "prompter", prompt, parent_id=request.parent_id)
            answer = history.add_message(conversation_id, "assistant", text, parent_id=asked.id, model=model,
                                         params={**settings.sampling(), "seed": seed})
            turns = [("prompter", prompt, asked.id), ("assistant", text, answer.id)]
        except Exception as error:  # noqa: BLE001 - the round is saved; the store's problem is shown
            history_error = one_line(str(error))
        return conversation_id, turns, history_error

    @on(RoundSaveFailed)
    def _save_failed(self, message: RoundSaveFailed) -> None:
        self.phase = RoundPhase.RANKING
        self.set_note(message.error)

    @on(RoundSaved)
    def _saved(self, message: RoundSaved) -> None:
        self.close(saved=message)

    # -- drawing ----------------------------------------------------------------------------------
    def set_note(self, note: str) -> None:
        self.note = note
        self._show_header()

    def header_title(self) -> str:
        """The header's start: what the round is doing."""
        raise NotImplementedError

    def _show_header(self) -> None:
        text = Text()
        text.append(self.header_title(), style="bold")
        if self.phase is RoundPhase.GENERATING:
            text.append("Esc stops. ", style="dim")
        if self.note:
            text.append(self.note, style="bold yellow")
        else:
            text.append(self.prompt)
        self._header.update(text)

    def complete_subtitle(self, index: int) -> str:
        """The border subtitle of answer ``index`` once it is in."""
        return ""

    def style_card(self, index: int) -> None:
        """Marks of answer ``index`` beyond its state (chosen, rejected, edited, ...)."""

    def _refresh_card(self, index: int) -> None:
        card = self.cards[index]
        state = self.states[index]
        card.set_class(state == "waiting", "-waiting")
        self.style_card(index)
        if state in ("waiting", "streaming"):
            card.border_subtitle = state + ("…" if state == "streaming" else "")
        elif state != "complete":
            card.border_subtitle = "stopped" if state == "cancelled" else "failed"
        else:
            card.border_subtitle = self.complete_subtitle(index)

    def draw_line(self) -> None:
        """The line under the header (the order, the choice)."""

    def _refresh_all(self) -> None:
        self._show_header()
        self.draw_line()
        for index in range(self.count):
            self._refresh_card(index)
