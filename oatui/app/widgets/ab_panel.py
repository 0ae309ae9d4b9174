"""Blind A/B mode of the chat pane (ctrl+g): the gold judge for real data.

Each prompt goes to two served models at once; their answers stream side by side as A and B, in
an order drawn at random for the round (``oatui.chat.ab.ORDER_RANDOM``) and kept from the person:
the cards name no model. ``a`` / ``b`` / ``t`` choose (A better, B better, a tie), Enter saves the
choice as an export tree in ``WORKSPACE/data/feedback.trees.jsonl`` (``oatui.chat.ab``, in a
thread), and only then does the status line reveal which model wrote which answer, with the pair's
win rate so far (counted from the feedback file). Esc stops the answers, or skips the round. The
conversation goes on from the chosen answer (after a tie, from A's).

:class:`ABPanel` holds one round: it streams both answers and saves the choice itself, and tells
the chat pane it is done with ``ABPanel.Closed``. :class:`ABMode` is what the chat pane gains
(entering and leaving the mode, starting a round, taking the round's result back), kept here so
that the pane's own code holds only small hooks.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Select, Static
from textual.worker import Worker, WorkerState

from oatui.app.messages import ChatSettings

if TYPE_CHECKING:
    from oatui.chat.ab import ABRound, PairTally
    from oatui.chat.history import ChatHistory

LABELS = ("A", "B")


def default_pair(models: list[str]) -> tuple[str, str] | None:
    """The pair A/B mode offers first: ``policy-sft`` and ``policy`` when both are served, else the
    first two streaming models; None with fewer than two."""
    if "policy-sft" in models and "policy" in models:
        return ("policy-sft", "policy")
    return (models[0], models[1]) if len(models) >= 2 else None


class ABModels(ModalScreen[tuple[str, str] | None]):
    """The two models to compare (any streaming models of the repository)."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "submit", "Start"),
    ]

    def __init__(self, models: list[str], chosen: tuple[str, str]) -> None:
        super().__init__(classes="dialog-screen")
        self.models = sorted(set(models) | set(chosen))
        self.chosen = chosen

    def compose(self) -> ComposeResult:
        options = [(name, name) for name in self.models]
        with Vertical(classes="dialog", id="ab-models"):
            yield Label("Blind A/B: compare two models", classes="dialog-title")
            yield Label("One model", classes="field-label")
            yield Select(options, value=self.chosen[0], allow_blank=False, id="ab-first", compact=True)
            yield Label("The other model", classes="field-label")
            yield Select(options, value=self.chosen[1], allow_blank=False, id="ab-second", compact=True)
            yield Static("Each prompt goes to both; the answers come as A and B in a random order, revealed "
                         "after your choice (a, b or t for a tie; enter saves it).", classes="field-hint")
            yield Static("", id="ab-models-error", classes="form-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Start (ctrl+s)", variant="primary", id="ab-start", compact=True)
                yield Button("Cancel (esc)", id="ab-cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#ab-first", Select).focus()

    @on(Button.Pressed, "#ab-start")
    def action_submit(self) -> None:
        first = str(self.query_one("#ab-first", Select).value)
        second = str(self.query_one("#ab-second", Select).value)
        if first == second:
            self.query_one("#ab-models-error", Static).update("Choose two different models.")
            return
        self.dismiss((first, second))

    @on(Button.Pressed, "#ab-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class ABCard(VerticalScroll):
    """One of the two answers; its border names it A or B, never its model, until the choice is saved."""

    def __init__(self, index: int, **kwargs: Any) -> None:
        super().__init__(classes="rank-card ab-card -waiting", **kwargs)
        self.index = index
        self.can_focus = False
        self.body = Static("", classes="rank-card-body", markup=False)
        self.border_title = LABELS[index]

    def compose(self) -> ComposeResult:
        yield self.body


class ABPanel(Vertical, can_focus=True):
    """One blind round: two answers streamed at once, the person's choice, the tree saved."""

    BINDINGS = [
        Binding("a", "choose('A')", "A is better"),
        Binding("b", "choose('B')", "B is better"),
        Binding("t", "choose('tie')", "Tie"),
        Binding("enter", "confirm", "Save"),
        Binding("escape", "stop", "Stop/skip"),
        Binding("pageup", "scroll_answers(-1)", "Scroll answers up", show=False),
        Binding("pagedown", "scroll_answers(1)", "Scroll answers down", show=False),
    ]

    class PieceReceived(Message):
        """Pieces of answer ``index`` (0 for A), batched as the chat's ``TokenReceived``."""

        def __init__(self, index: int, text: str) -> None:
            super().__init__()
            self.index = index
            self.text = text

    class AnswerFinished(Message):
        def __init__(self, index: int, text: str, state: str, error: str | None = None) -> None:
            super().__init__()
            self.index = index
            self.text = text
            self.state = state
            self.error = error

    class AnswersFinished(Message):
        """Both streams ended: ``complete``, ``cancelled`` (Esc) or ``error``."""

        def __init__(self, state: str, error: str | None = None) -> None:
            super().__init__()
            self.state = state
            self.error = error

    class RoundSaved(Message):
        def __init__(self, ab_round: ABRound, tally: PairTally, path: Path, conversation_id: int | None,
                     turns: list[tuple[str, str, int | None]], history_error: str | None) -> None:
            super().__init__()
            self.ab_round = ab_round
            self.tally = tally
            self.path = path
            self.conversation_id = conversation_id
            self.turns = turns
            self.history_error = history_error

    class SaveFailed(Message):
        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    class Closed(Message):
        """The round is over: ``saved`` (the chat pane takes its turns), or skipped, stopped or failed
        (``prompt`` goes back into the input, ``failure`` is the error if any)."""

        def __init__(self, prompt: str, saved: ABPanel.RoundSaved | None = None, notice: str | None = None,
                     failure: str | None = None) -> None:
            super().__init__()
            self.prompt = prompt
            self.saved = saved
            self.notice = notice
            self.failure = failure

    def __init__(self, prompt: str, context: list[tuple[str, str]], context_models: list[str | None],
                 models: tuple[str, str], settings: ChatSettings, url: str, feedback_file: Path,
                 history: Callable[[], ChatHistory], conversation_id: int | None,
                 parent_id: int | None, runs: dict[str, str | None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prompt = prompt
        self.runs = runs or {}  # each served model's training run, when the server knows it
        self.context = context
        self.context_models = context_models
        self.models = models  # (A, B): never shown before the choice is saved
        self.settings = settings
        self.url = url
        self.feedback_file = feedback_file
        self.history = history  # opened in the save thread: the store may be slow or broken
        self.conversation_id = conversation_id
        self.parent_id = parent_id
        self.seed = random.randrange(2**31)  # the same for both: only the model differs
        self.texts = ["", ""]
        self.states = ["waiting", "waiting"]
        self.choice: str | None = None
        self.sampling = True
        self._answers_posted = False
        self.saving = False
        self.note = ""
        self._header = Static("", id="ab-header")
        self._choice_line = Static("", id="ab-choice")
        self.cards = [ABCard(0), ABCard(1)]

    def compose(self) -> ComposeResult:
        yield self._header
        yield self._choice_line
        with Horizontal(id="ab-answers"):
            yield from self.cards

    def on_mount(self) -> None:
        self._refresh_all()
        self.generate()

    # -- both answers at once ---------------------------------------------------------------------
    @work(exclusive=True, group="ab-answers")
    async def generate(self) -> None:
        """Stream A and B concurrently (one client and one gRPC stream per model, so the server
        generates both at the same time); whatever way it ends, one ``AnswersFinished`` is posted.
        A failed answer stops the other."""
        from oatui.app.widgets.chat_pane import ANSWER_TIMEOUT, close_quietly, stream_in_batches
        from oatui.serve.client import AsyncChatClient, RemoteError, ServerUnavailable

        class Failed(Exception):
            pass

        async def answer(index: int) -> None:
            client = AsyncChatClient(self.url, model=self.models[index], timeout=ANSWER_TIMEOUT, retries=2)
            pieces: list[str] = []
            state, error = "complete", None
            try:
                await stream_in_batches(client, self.context, self.settings, pieces,
                                        lambda text: self.post_message(self.PieceReceived(index, text)),
                                        seed=self.seed)
            except (ServerUnavailable, RemoteError, ValueError) as failure:
                state, error = "error", str(failure)
            except asyncio.CancelledError:
                state = "cancelled"
                raise
            finally:
                self.post_message(self.AnswerFinished(index, "".join(pieces), state, error))
                await close_quietly(client)
            if error is not None:
                raise Failed(f"{LABELS[index]}: {error}")

        state, error = "complete", None
        try:
            async with asyncio.TaskGroup() as group:
                for index in (0, 1):
                    group.create_task(answer(index))
        except asyncio.CancelledError:  # Esc: the worker is cancelled (plain except: except* would regroup it)
            state = "cancelled"
            raise
        except ExceptionGroup as failures:
            first = failures.exceptions[0]
            state, error = "error", str(first) if isinstance(first, Failed) else f"{type(first).__name__}: {first}"
        finally:
            self._answers_posted = True
            self.post_message(self.AnswersFinished(state, error))

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # A worker cancelled before its body ran (Esc at once) never reaches the finally above.
        if (event.worker.group == "ab-answers" and event.state in (WorkerState.CANCELLED, WorkerState.ERROR)
                and not self._answers_posted):
            self._answers_posted = True
            state = "cancelled" if event.state == WorkerState.CANCELLED else "error"
            self.post_message(self.AnswersFinished(state, None if state == "cancelled" else str(event.worker.error)))

    @on(PieceReceived)
    def _piece(self, message: PieceReceived) -> None:
        index = message.index
        if self.states[index] == "waiting":
            self.states[index] = "streaming"
            self._refresh_card(index)
        self.texts[index] += message.text
        card = self.cards[index]
        card.body.update(self.texts[index])
        if card.max_scroll_y - card.scroll_y <= 2:
            card.scroll_end(animate=False)

    @on(AnswerFinished)
    def _answer_finished(self, message: AnswerFinished) -> None:
        index = message.index
        self.texts[index] = message.text.strip() if message.state == "complete" else message.text
        self.states[index] = message.state
        self.cards[index].body.update(self.texts[index])
        self._refresh_card(index)

    @on(AnswersFinished)
    def _answers_finished(self, message: AnswersFinished) -> None:
        self.sampling = False
        if message.state == "complete":
            self._refresh_all()
            return
        if message.state == "error":
            self.post_message(self.Closed(self.prompt, failure=message.error or "an answer failed"))
        else:
            self.post_message(self.Closed(self.prompt, notice="Answers stopped: nothing saved."))

    # -- the person's choice ----------------------------------------------------------------------
    def _ready(self) -> bool:
        if self.sampling:
            self.set_note("the answers are still coming (Esc stops)")
            return False
        return not self.saving

    def action_choose(self, choice: str) -> None:
        if not self._ready():
            return
        self.choice = choice
        self.note = ""
        self._refresh_all()

    def action_confirm(self) -> None:
        if not self._ready():
            return
        if self.choice is None:
            self.set_note("choose first: a (A is better), b (B is better) or t (a tie)")
            return
        self.saving = True
        self.set_note("saving…")
        self.save_round(self.choice)

    def action_stop(self) -> None:
        if self.saving:
            return
        if self.sampling:
            self.set_note("stopping…")
            self.workers.cancel_group(self, "ab-answers")
        else:
            self.post_message(self.Closed(self.prompt, notice="Skipped: nothing saved."))

    def action_scroll_answers(self, direction: int) -> None:
        for card in self.cards:
            if direction < 0:
                card.scroll_page_up(animate=False)
            else:
                card.scroll_page_down(animate=False)

    @work(thread=True, exclusive=True, group="ab-save")
    def save_round(self, choice: str) -> None:
        """Append the round's tree, count the pair's rounds again, then keep the prompt and the chosen
        answer in the chat history."""
        from oatui.chat.ab import ABRound, append_round, pair_tally

        try:
            ab_round = ABRound(context=self.context, models=self.models, texts=(self.texts[0], self.texts[1]),
                               choice=choice, system=self.settings.system or None,
                               context_models=self.context_models,
                               runs=(self.runs.get(self.models[0]), self.runs.get(self.models[1])))
            append_round(self.feedback_file, ab_round)
            tally = pair_tally(self.feedback_file, *self.models)
        except Exception as error:  # noqa: BLE001 - shown in the panel, never a traceback
            reason = " ".join(str(error).split())
            if not isinstance(error, (ValueError, OSError)):
                reason = f"{type(error).__name__}: {reason}"
            self.post_message(self.SaveFailed(f"not saved: {reason}"))
            return
        settings = self.settings
        turns: list[tuple[str, str, int | None]] = [("prompter", self.prompt, None),
                                                    ("assistant", ab_round.kept_text, None)]
        conversation_id, history_error = self.conversation_id, None
        try:
            history = self.history()
            if conversation_id is None:
                conversation_id = history.new_conversation(self.prompt, model=ab_round.kept_model,
                                                           system=settings.system or None,
                                                           params=settings.sampling()).id
            asked = history.add_message(conversation_id, "prompter", self.prompt, parent_id=self.parent_id)
            answer = history.add_message(conversation_id, "assistant", ab_round.kept_text, parent_id=asked.id,
                                         model=ab_round.kept_model, params={**settings.sampling(), "seed": self.seed})
            turns = [("prompter", self.prompt, asked.id), ("assistant", ab_round.kept_text, answer.id)]
        except Exception as error:  # noqa: BLE001 - the round is saved; the store's problem is shown
            history_error = " ".join(str(error).split())
        self.post_message(self.RoundSaved(ab_round, tally, self.feedback_file, conversation_id, turns, history_error))

    @on(SaveFailed)
    def _save_failed(self, message: SaveFailed) -> None:
        self.saving = False
        self.set_note(message.error)

    @on(RoundSaved)
    def _round_saved(self, message: RoundSaved) -> None:
        self.post_message(self.Closed(self.prompt, saved=message))

    # -- drawing ----------------------------------------------------------------------------------
    def set_note(self, note: str) -> None:
        self.note = note
        self._show_header()

    def _show_header(self) -> None:
        text = Text()
        if self.sampling:
            text.append("Blind A/B: both models answer… ", style="bold")
            text.append("Esc stops. ", style="dim")
        else:
            text.append("Which is better? ", style="bold")
        if self.note:
            text.append(self.note, style="bold yellow")
        else:
            text.append(self.prompt)
        self._header.update(text)

    def _refresh_card(self, index: int) -> None:
        card = self.cards[index]
        state = self.states[index]
        card.set_class(state == "waiting", "-waiting")
        chosen = self.choice is not None and self.choice in (LABELS[index], "tie")
        card.set_class(chosen, "-chosen")
        if state in ("waiting", "streaming"):
            card.border_subtitle = state + ("…" if state == "streaming" else "")
        elif state != "complete":
            card.border_subtitle = "stopped" if state == "cancelled" else "failed"
        elif self.choice == "tie":
            card.border_subtitle = "tie"
        else:
            card.border_subtitle = "better" if chosen else ("worse" if self.choice else "")

    def _refresh_all(self) -> None:
        self._show_header()
        line = Text()
        if self.sampling:
            line.append("a: A is better · b: B is better · t: tie, once both answers are in", style="dim")
        elif self.choice is None:
            line.append("Your choice: ", style="dim")
            line.append("a", style="bold")
            line.append(" A is better · ", style="dim")
            line.append("b", style="bold")
            line.append(" B is better · ", style="dim")
            line.append("t", style="bold")
            line.append(" tie · enter saves · esc skips", style="dim")
        else:
            line.append("Your choice: ", style="dim")
            line.append("a tie" if self.choice == "tie" else f"{self.choice} is better", style="bold")
            line.append(" · enter saves it (then the models are revealed) · a/b/t change it", style="dim")
        self._choice_line.update(line)
        for index in (0, 1):
            self._refresh_card(index)


class ABMode:
    """What blind A/B mode adds to the chat pane (mixed into ``ChatPane``, which provides the
    attributes used here)."""

    #: The two models compared (in the order the person chose them), or None outside A/B mode.
    ab_models: tuple[str, str] | None = None
    ab_panel: ABPanel | None = None
    ab_tally: PairTally | None = None
    #: The last round's outcome (who wrote A and B, the choice, the win rate), shown until the next round.
    ab_reveal: Text | None = None
    #: Which model wrote the answers A/B rounds added to the conversation, by chat-history message id.
    ab_turn_models: dict[int, str] | None = None
    _zoomed_for_ab = False

    def action_toggle_ab(self) -> None:
        pane: Any = self
        if pane.ranking:
            pane._show_status("Finish the round first: Enter saves it, Esc skips it.")
            return
        if pane.streaming:
            pane._show_status("An answer is still streaming: Esc stops it.")
            return
        if self.ab_models is not None:
            self.leave_ab_mode()
            return
        chosen = default_pair(pane.models)
        if chosen is None:
            pane._show_status("Blind A/B needs two streaming models: export another "
                              "(say an SFT run as policy-sft beside the RL run as policy).")
            return

        def picked(models: tuple[str, str] | None) -> None:
            if models is not None:
                self.enter_ab_mode(models)
            else:
                pane._prompt.focus()

        pane.app.push_screen(ABModels(pane.models, chosen), picked)

    def enter_ab_mode(self, models: tuple[str, str]) -> None:
        pane: Any = self
        if pane.rank_mode:
            pane.action_toggle_rank()  # one mode at a time
        self.ab_models = models
        self.ab_tally = None
        self.ab_reveal = None
        pane.add_class("-ab-mode")
        screen = pane.screen
        if screen.maximized is None:
            # Side by side needs the width: the pane takes the screen (ctrl+g or Esc gives it back).
            self._zoomed_for_ab = screen.maximize(pane, container=False)
        pane._prompt.placeholder = pane._placeholder()
        pane._show_status()
        pane._prompt.focus()
        self.load_ab_tally()

    def leave_ab_mode(self) -> None:
        pane: Any = self
        self.ab_models = None
        self.ab_reveal = None
        pane.remove_class("-ab-mode")
        screen = pane.screen
        if self._zoomed_for_ab and screen.maximized is pane:
            screen.minimize()
        self._zoomed_for_ab = False
        pane._prompt.placeholder = pane._placeholder()
        pane._show_status()
        pane._prompt.focus()

    @work(thread=True, exclusive=True, group="ab-tally")
    def load_ab_tally(self) -> None:
        from oatui.chat.ab import pair_tally
        from oatui.workspace import Workspace

        pane: Any = self
        models = self.ab_models
        if models is None:
            return
        try:
            tally = pair_tally(Workspace(pane.workspace).feedback_file, *models)
        except OSError:
            return  # the status line goes without a win rate
        pane.app.call_from_thread(self._tally_loaded, models, tally)

    def _tally_loaded(self, models: tuple[str, str], tally: PairTally) -> None:
        if self.ab_models == models:
            self.ab_tally = tally
            if not getattr(self, "ranking", False):
                getattr(self, "_show_status")()

    def ab_placeholder(self) -> str:
        assert self.ab_models is not None
        return (f"Blind A/B of {self.ab_models[0]} and {self.ab_models[1]}: ask both "
                "(Enter sends · ctrl+g leaves A/B mode)")

    def ab_status(self) -> Text:
        """The status line in A/B mode, with the server up: the last round revealed until the next one
        starts, else the pair and its win rate so far."""
        if self.ab_reveal is not None:
            return self.ab_reveal.copy()
        text = Text()
        if self.ab_models is None:
            return text
        first, second = self.ab_models
        text.append("● ", style="green")
        text.append(f"blind A/B {first} vs {second}", style="bold magenta")
        tally = self.ab_tally
        if tally is not None and tally.rounds:
            text.append(f": {tally.counts()}: {tally.headline()}", style="magenta")
        elif tally is not None:
            text.append(": no rounds yet", style="dim")
        return text

    async def start_ab_round(self, prompt: str) -> None:
        from oatui.chat.ab import shown_order
        from oatui.workspace import Workspace

        pane: Any = self
        assert self.ab_models is not None and pane.server is not None
        context = [(role, text) for role, text, _ in pane.turns] + [("prompter", prompt)]
        written_by = self.ab_turn_models or {}
        context_models = [written_by.get(message_id) if message_id is not None else None
                          for _, _, message_id in pane.turns] + [None]
        source = getattr(pane.server, "model_source", None)
        runs = {name: source(name).run_id for name in self.ab_models} if source is not None else {}
        panel = ABPanel(prompt, context, context_models, shown_order(*self.ab_models), pane.settings,
                        pane.server.grpc_url,
                        Workspace(pane.workspace).feedback_file, pane.history, pane.conversation_id,
                        pane.turns[-1][2] if pane.turns else None, runs=runs, id="ab-panel")
        self.ab_panel = panel
        self.ab_reveal = None
        pane.ranking = True  # a round is open: the pane's guards hold as in rank mode
        pane.add_class("-ranking")
        pane.add_class("-streaming")
        await pane._body.mount(panel)
        panel.focus()
        pane._show_status()

    def ab_cancel(self) -> bool:
        """Esc outside the panel during a round: stop the answers, else go back to the panel."""
        panel = self.ab_panel
        if panel is None:
            return False
        if panel.sampling:
            panel.action_stop()
        else:
            panel.focus()
        return True

    async def on_abpanel_closed(self, message: ABPanel.Closed) -> None:
        message.stop()
        pane: Any = self
        panel, self.ab_panel = self.ab_panel, None
        pane.ranking = False
        pane.remove_class("-ranking")
        pane.remove_class("-streaming")
        if panel is not None and panel.is_attached:
            await panel.remove()
        saved = message.saved
        if saved is None:
            if message.failure:
                pane.failure = " ".join(message.failure.split())
            if not pane._prompt.value:
                pane._prompt.value = message.prompt
            pane._show_status(message.notice)
            pane._prompt.focus()
            return
        pane.conversation_id = saved.conversation_id
        pane.turns.extend(saved.turns)
        answer_id = saved.turns[-1][2]
        if answer_id is not None:
            self.ab_turn_models = {**(self.ab_turn_models or {}), answer_id: saved.ab_round.kept_model}
        self.ab_tally = saved.tally
        transcript = pane._transcript
        await transcript.mount_all([pane._message_widget(role, text, "complete") for role, text, _ in saved.turns])
        transcript.scroll_end(animate=False)
        ab_round = saved.ab_round
        verdict = "a tie" if ab_round.winner is None else f"{ab_round.choice} ({ab_round.winner})"
        note = f"A was {ab_round.models[0]}, B was {ab_round.models[1]}: you chose {verdict}"
        if saved.history_error:
            note += f"; chat history: {saved.history_error}"
        text = Text()
        text.append("✓ saved: ", style="bold green")
        text.append(note)
        text.append(f" · {saved.tally.headline()}", style="magenta")
        self.ab_reveal = text
        pane._show_status()
        pane.notify(f"{note}. So far: {saved.tally.describe()}", timeout=8)
        pane._prompt.focus()
        pane.load_conversations(pane.conversation_id)
