"""Rank mode's round: K answers to one prompt, streamed in, put in order from the keyboard, saved.

The answers stand side by side when each gets about ``CARD_WIDTH`` columns, else one at a time
under a row of tabs (80 columns). Cards keep their sampled order (answer 1, 2, ...); the order
line and each card's subtitle say where it ranks. The panel holds the round (a
:class:`~oatui.app.widgets.round_panel.RoundPanel`): it samples the answers (seeds S, S+1, ...),
takes the person's choices (order, rejections, edits), writes the ranking
(``oatui.chat.feedback.save_ranking``, in a thread) and keeps the best answer in the chat history.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Static, Tab, Tabs

from oatui.app.messages import RankAnswerFinished, RankPieceReceived, RankSamplingFinished, RankingFailed, RankingSaved
from oatui.app.streaming import error_line
from oatui.app.widgets.forms import EditAnswer
from oatui.app.widgets.round_panel import ROUND_KEYS, SAVE_GROUP, AnswerCard, RoundPanel, RoundPhase, RoundRequest
from oatui.chat.feedback import save_ranking
from oatui.chat.ranking import Order

#: Columns an answer needs to stand beside the others.
CARD_WIDTH = 30
ORDINALS = ("best", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th", "9th")


class RankPanel(RoundPanel):
    """K answers to one prompt; the keys put them in order, edit or reject one, save or skip."""

    # Short descriptions: at 80 columns the footer holds them all.
    BINDINGS = [
        Binding("left", "select(-1)", "Answer", key_display="←→"),
        Binding("right", "select(1)", "Next answer", show=False),
        Binding("up", "move(-1)", "Move", key_display="↑↓"),
        Binding("down", "move(1)", "Worse", show=False),
        *[Binding(str(n), f"place({n})", "Order", key_display="1…9", show=n == 1) for n in range(1, 10)],
        Binding("x", "reject", "Reject"),
        Binding("e", "edit", "Edit"),
        *ROUND_KEYS,
        Binding("pageup", "scroll_answers(-1)", "Scroll answer up", show=False),
        Binding("pagedown", "scroll_answers(1)", "Scroll answer down", show=False),
    ]

    PieceReceived = RankPieceReceived
    AnswerFinished = RankAnswerFinished
    AnswersFinished = RankSamplingFinished
    ID_PREFIX = "rank"
    STOPPED_NOTICE = "Sampling stopped: nothing saved."
    FAILED_NOTICE = "sampling failed"

    def __init__(self, request: RoundRequest, seeds: list[int], **kwargs: Any) -> None:
        super().__init__(request, len(seeds), **kwargs)
        self.seeds = list(seeds)
        self.order: list[int] = list(range(self.count))
        self.rejected: list[int] = []
        self.edits: dict[int, str] = {}
        self.selected = 0
        self._typed = 0
        self._order_line = Static("", id="rank-order")
        self._tabs = Tabs(*[Tab(f"{i + 1}", id=f"rank-tab-{i}") for i in range(self.count)], id="rank-tabs")
        self._tabs.can_focus = False
        self.cards = [AnswerCard(i, f"{i + 1}") for i in range(self.count)]

    def compose(self) -> ComposeResult:
        yield self._header
        yield self._order_line
        yield self._tabs
        with Horizontal(id="rank-answers"):
            yield from self.cards

    def on_resize(self) -> None:
        side_by_side = self.size.width >= CARD_WIDTH * self.count + 2
        self.set_class(side_by_side, "-side-by-side")
        self.set_class(not side_by_side, "-tabs")

    # -- the answers ------------------------------------------------------------------------------
    def streams(self) -> list[tuple[str, int]]:
        return [(self.request.settings.model, seed) for seed in self.seeds]

    def stream_started(self, index: int) -> None:
        if self.has_class("-tabs") and self.states[self.selected] != "streaming":
            self.action_select_index(index)  # follow a stream, but do not jump between them
        # The card stays where it is (at the start, unless scrolled): an answer is ranked from its start.

    def answers_in(self) -> None:
        self.selected = 0  # the tabs followed the stream; ranking starts at the first answer

    # -- the person's choices ---------------------------------------------------------------------
    def current_order(self) -> Order:
        return Order(tuple(self.order), tuple(self.rejected))

    def best_text(self) -> str:
        best = self.order[0]
        return self.edits.get(best, self.texts[best])

    def action_select(self, step: int) -> None:
        self.action_select_index((self.selected + step) % self.count)

    def action_select_index(self, index: int) -> None:
        self.selected = index
        self._tabs.active = f"rank-tab-{index}"
        for card in self.cards:
            card.set_class(card.index == index, "-selected")

    @on(Tabs.TabActivated, "#rank-tabs")
    def _tab_clicked(self, event: Tabs.TabActivated) -> None:
        event.stop()
        if event.tab is not None and event.tab.id:
            index = int(event.tab.id.rsplit("-", 1)[1])
            if index != self.selected:
                self.action_select_index(index)

    def action_place(self, number: int) -> None:
        """Digits name the answers best first: 2 1 3 puts answer 2 first, 1 second, 3 third."""
        index = number - 1
        if index >= self.count or not self._ready():
            return
        if index in self.rejected:
            self.rejected.remove(index)
        else:
            self.order.remove(index)
        if self._typed >= len(self.order) + 1:
            self._typed = 0
        self.order.insert(min(self._typed, len(self.order)), index)
        self._typed += 1
        if self._typed >= len(self.order):
            self._typed = 0
        self.action_select_index(index)
        self._refresh_all()

    def action_move(self, step: int) -> None:
        """Up makes the selected answer better by one place, down worse."""
        if not self._ready():
            return
        index = self.selected
        self._typed = 0
        if index in self.rejected:
            if step < 0:  # back into the order, last
                self.rejected.remove(index)
                self.order.append(index)
                self._refresh_all()
            return
        place = self.order.index(index)
        target = place + step
        if not 0 <= target < len(self.order):
            return
        self.order[place], self.order[target] = self.order[target], self.order[place]
        self._refresh_all()

    def action_reject(self) -> None:
        """Reject the selected answer as unusable, or take it back."""
        if not self._ready():
            return
        index = self.selected
        self._typed = 0
        if index in self.rejected:
            self.rejected.remove(index)
            self.order.append(index)
        elif len(self.order) == 1:
            self.set_note("keep at least one answer")
            return
        else:
            self.order.remove(index)
            self.rejected.append(index)
        self._refresh_all()

    def action_edit(self) -> None:
        """Rewrite the selected answer into a better demonstration (in a dialog)."""
        if not self._ready():
            return
        index = self.selected

        def edited(text: str | None) -> None:
            if self.is_attached:
                if text is not None:
                    self.set_edit(index, text)
                self.focus()

        self.app.push_screen(EditAnswer(index + 1, self.edits.get(index, self.texts[index])), edited)

    def set_edit(self, index: int, text: str) -> None:
        """The person's rewrite of answer ``index`` (the model's own text when unchanged or empty)."""
        text = text.strip()
        if text and text != self.texts[index]:
            self.edits[index] = text
        else:
            self.edits.pop(index, None)
        self.cards[index].body.update(self.edits.get(index, self.texts[index]))
        self._refresh_all()

    def scrolled_cards(self) -> list[AnswerCard]:
        return [self.cards[self.selected]]

    # -- saving -----------------------------------------------------------------------------------
    def start_saving(self) -> None:
        self.write_ranking(self.current_order(), dict(self.edits), list(self.texts))

    @work(thread=True, exclusive=True, group=SAVE_GROUP)
    def write_ranking(self, order: Order, edits: dict[int, str], texts: list[str]) -> None:
        """Append the ranking to the feedback file, then keep the prompt and the best answer in the
        chat history."""
        request = self.request
        model = request.settings.model
        try:
            tree = save_ranking(request.feedback_file, request.context, texts, order, edits=edits, seeds=self.seeds,
                                model=model, run=request.runs.get(model), system=request.settings.system or None)
        except Exception as error:  # noqa: BLE001 - shown in the panel, never a traceback
            self.post_message(RankingFailed(f"not saved: {error_line(error)}"))
            return
        best = order.ranked[0]
        best_text = edits.get(best, texts[best])
        conversation_id, turns, history_error = self.keep(best_text, None if best in edits else model,
                                                          self.seeds[best], conversation_model=model)
        self.post_message(RankingSaved(request.feedback_file, tree["message_tree_id"], order.ranked, order.rejected,
                                       best_text, conversation_id, turns, history_error))

    # -- drawing ----------------------------------------------------------------------------------
    def place_label(self, index: int) -> str:
        if index in self.rejected:
            return "✗ rejected"
        return ORDINALS[self.order.index(index)] if self.order.index(index) < len(ORDINALS) else "?"

    def header_title(self) -> str:
        if self.phase is RoundPhase.GENERATING:
            streaming = [i for i, state in enumerate(self.states) if state != "waiting"]
            current = streaming[-1] + 1 if streaming else 1
            return f"Sampling answer {current} of {self.count}… "
        return f"Rank {self.count} answers: "

    def complete_subtitle(self, index: int) -> str:
        subtitle = self.place_label(index)
        return subtitle + " · edited" if index in self.edits else subtitle

    def style_card(self, index: int) -> None:
        card = self.cards[index]
        card.set_class(index in self.rejected, "-rejected")
        card.set_class(index in self.edits, "-edited")
        label = f"{index + 1}"
        if self.states[index] == "complete":
            label += " ✗" if index in self.rejected else f" #{self.order.index(index) + 1}"
            if index in self.edits:
                label += "✎"
        tab = self._tabs.query(f"#rank-tab-{index}")
        if tab:
            tab.first(Tab).label = label

    def draw_line(self) -> None:
        line = Text()
        line.append("Best first: ", style="dim")
        for position, index in enumerate(self.order):
            if position:
                line.append(" › ", style="dim")
            line.append(str(index + 1), style="bold")
            if index in self.edits:
                line.append("✎")
        if self.rejected:
            line.append("  rejected: ", style="dim")
            line.append(" ".join(str(index + 1) for index in self.rejected), style="bold red")
        if self._typed and self.phase is not RoundPhase.GENERATING:
            line.append(f"  (the next digit places #{self._typed + 1})", style="dim")
        self._order_line.update(line)

    def _refresh_all(self) -> None:
        super()._refresh_all()
        self.action_select_index(self.selected)
