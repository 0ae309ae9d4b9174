"""Blind A/B mode of the chat pane (ctrl+g): the gold judge for real data.

Each prompt goes to two served models at once; their answers stream side by side as A and B, in
an order drawn at random for the round (``oatui.chat.ab.ORDER_RANDOM``) and kept from the person:
the cards name no model. ``a`` / ``b`` / ``t`` choose (A better, B better, a tie), Enter saves the
choice as an export tree in ``WORKSPACE/data/feedback.trees.jsonl`` (``oatui.chat.ab``, in a
thread), and only then does the status line reveal which model wrote which answer, with the pair's
win rate so far (counted from the feedback file). Esc stops the answers, or skips the round. The
conversation goes on from the chosen answer (after a tie, from A's).

:class:`ABPanel` holds one round (a :class:`~oatui.app.widgets.round_panel.RoundPanel`): it
streams both answers and saves the choice itself, and tells the chat pane it is done with
``ABPanel.Closed``. :class:`ABMode` is what the chat pane gains
(entering and leaving the mode, starting a round, taking the round's result back), kept here so
that the pane's own code holds only small hooks.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Select, Static

from oatui.app import messages
from oatui.app.streaming import error_line
from oatui.app.widgets.round_panel import ROUND_KEYS, SAVE_GROUP, AnswerCard, RoundPanel, RoundPhase, RoundRequest

if TYPE_CHECKING:
    from oatui.chat.ab import ABRound, PairTally

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


class ABPanel(RoundPanel):
    """One blind round: two answers streamed at once, the person's choice, the tree saved."""

    BINDINGS = [
        Binding("a", "choose('A')", "A is better"),
        Binding("b", "choose('B')", "B is better"),
        Binding("t", "choose('tie')", "Tie"),
        *ROUND_KEYS,
        Binding("pageup", "scroll_answers(-1)", "Scroll answers up", show=False),
        Binding("pagedown", "scroll_answers(1)", "Scroll answers down", show=False),
    ]

    class PieceReceived(messages.AnswerPieceReceived):
        """Pieces of answer ``index`` (0 for A), batched as the chat's ``TokenReceived``."""

    class AnswerFinished(messages.RoundAnswerFinished):
        """Answer ``index`` (0 for A) ended."""

    class AnswersFinished(messages.RoundAnswersFinished):
        """Both streams ended: ``complete``, ``cancelled`` (Esc) or ``error``."""

    class RoundSaved(messages.RoundSaved):
        def __init__(self, ab_round: ABRound, tally: PairTally, path: Path, conversation_id: int | None,
                     turns: list[tuple[str, str, int | None]], history_error: str | None) -> None:
            super().__init__(path, conversation_id, turns, history_error)
            self.ab_round = ab_round
            self.tally = tally

    class SaveFailed(messages.RoundSaveFailed):
        """The choice could not be written (nothing was appended)."""

    ID_PREFIX = "ab"

    def __init__(self, request: RoundRequest, models: tuple[str, str], context_models: list[str | None],
                 **kwargs: Any) -> None:
        super().__init__(request, 2, **kwargs)
        self.models = models  # (A, B): never shown before the choice is saved
        self.context_models = context_models
        self.seed = random.randrange(2**31)  # the same for both: only the model differs
        self.choice: str | None = None
        self._choice_line = Static("", id="ab-choice")
        self.cards = [AnswerCard(index, label, "ab-card") for index, label in enumerate(LABELS)]

    def compose(self) -> ComposeResult:
        yield self._header
        yield self._choice_line
        with Horizontal(id="ab-answers"):
            yield from self.cards

    # -- both answers at once ---------------------------------------------------------------------
    def streams(self) -> list[tuple[str, int]]:
        return [(model, self.seed) for model in self.models]

    def answer_failure(self, index: int, error: str) -> str:
        return f"{LABELS[index]}: {error}"

    def text_added(self, index: int) -> None:
        card = self.cards[index]
        if card.max_scroll_y - card.scroll_y <= 2:
            card.scroll_end(animate=False)

    # -- the person's choice ----------------------------------------------------------------------
    def action_choose(self, choice: str) -> None:
        if not self._ready():
            return
        self.choice = choice
        self.note = ""
        self._refresh_all()

    def can_save(self) -> bool:
        if self.choice is None:
            self.set_note("choose first: a (A is better), b (B is better) or t (a tie)")
            return False
        return True

    def start_saving(self) -> None:
        assert self.choice is not None
        self.save_round(self.choice)

    @work(thread=True, exclusive=True, group=SAVE_GROUP)
    def save_round(self, choice: str) -> None:
        """Append the round's tree, count the pair's rounds again, then keep the prompt and the chosen
        answer in the chat history."""
        from oatui.chat.ab import ABRound, append_round, pair_tally

        request = self.request
        try:
            ab_round = ABRound(context=request.context, models=self.models, texts=(self.texts[0], self.texts[1]),
                               choice=choice, system=request.settings.system or None,
                               context_models=self.context_models,
                               runs=(request.runs.get(self.models[0]), request.runs.get(self.models[1])))
            append_round(request.feedback_file, ab_round)
            tally = pair_tally(request.feedback_file, *self.models)
        except Exception as error:  # noqa: BLE001 - shown in the panel, never a traceback
            self.post_message(self.SaveFailed(f"not saved: {error_line(error)}"))
            return
        conversation_id, turns, history_error = self.keep(ab_round.kept_text, ab_round.kept_model, self.seed,
                                                          conversation_model=ab_round.kept_model)
        self.post_message(self.RoundSaved(ab_round, tally, request.feedback_file, conversation_id, turns,
                                          history_error))

    # -- drawing ----------------------------------------------------------------------------------
    def header_title(self) -> str:
        return "Blind A/B: both models answer… " if self.phase is RoundPhase.GENERATING else "Which is better? "

    def style_card(self, index: int) -> None:
        chosen = self.choice is not None and self.choice in (LABELS[index], "tie")
        self.cards[index].set_class(chosen, "-chosen")

    def complete_subtitle(self, index: int) -> str:
        if self.choice == "tie":
            return "tie"
        chosen = self.choice == LABELS[index]
        return "better" if chosen else ("worse" if self.choice else "")

    def draw_line(self) -> None:
        line = Text()
        if self.phase is RoundPhase.GENERATING:
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


class ABMode:
    """What blind A/B mode adds to the chat pane (mixed into ``ChatPane``, which provides the
    attributes used here)."""

    #: The two models compared (in the order the person chose them), or None outside A/B mode.
    ab_models: tuple[str, str] | None = None
    ab_tally: PairTally | None = None
    #: The last round's outcome (who wrote A and B, the choice, the win rate), shown until the next round.
    ab_reveal: Text | None = None
    #: Which model wrote the answers A/B rounds added to the conversation, by chat-history message id.
    ab_turn_models: dict[int, str] | None = None

    def action_toggle_ab(self) -> None:
        pane: Any = self
        if pane.busy("Finish the round first: Enter saves it, Esc skips it."):
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
        pane.take_screen()
        pane.mode_changed()
        self.load_ab_tally()

    def leave_ab_mode(self) -> None:
        pane: Any = self
        self.ab_models = None
        self.ab_reveal = None
        pane.remove_class("-ab-mode")
        pane.give_screen_back()
        pane.mode_changed()

    @work(thread=True, exclusive=True, group="ab-tally")
    def load_ab_tally(self) -> None:
        from oatui.chat.ab import pair_tally

        pane: Any = self
        models = self.ab_models
        if models is None:
            return
        try:
            tally = pair_tally(pane.workspace.feedback_file, *models)
        except OSError:
            return  # the status line goes without a win rate
        pane.app.call_from_thread(self._tally_loaded, models, tally)

    def _tally_loaded(self, models: tuple[str, str], tally: PairTally) -> None:
        pane: Any = self
        if self.ab_models == models:
            self.ab_tally = tally
            if pane.round_panel is None:
                pane._show_status()

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

        pane: Any = self
        assert self.ab_models is not None
        written_by = self.ab_turn_models or {}
        context_models = [written_by.get(message_id) if message_id is not None else None
                          for _, _, message_id in pane.turns] + [None]
        panel = ABPanel(pane.round_request(prompt, self.ab_models), shown_order(*self.ab_models), context_models,
                        id="ab-panel")
        self.ab_reveal = None
        await pane.open_round(panel)

    def ab_round_saved(self, saved: ABPanel.RoundSaved) -> None:
        """A round was saved (the chat pane took its turns): reveal who wrote A and B, with the win rate."""
        pane: Any = self
        answer_id = saved.turns[-1][2]
        if answer_id is not None:
            self.ab_turn_models = {**(self.ab_turn_models or {}), answer_id: saved.ab_round.kept_model}
        self.ab_tally = saved.tally
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
