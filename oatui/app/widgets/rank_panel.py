"""Rank mode's panel: K answers to one prompt, streamed in, put in order from the keyboard.

The answers stand side by side when each gets about ``CARD_WIDTH`` columns, else one at a time
under a row of tabs (80 columns). Cards keep their sampled order (answer 1, 2, ...); the order
line and each card's subtitle say where it ranks. The panel holds the person's choices (order,
rejections, edits) and posts ``Confirmed`` or ``Skipped``; the chat pane samples the answers and
writes the ranking.
"""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Static, Tab, Tabs

from oatui.chat.ranking import Order

#: Columns an answer needs to stand beside the others.
CARD_WIDTH = 30
ORDINALS = ("best", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th", "9th")


class AnswerCard(VerticalScroll):
    """One sampled answer; its border says its number, its place and its state."""

    def __init__(self, index: int, seed: int, **kwargs: object) -> None:
        super().__init__(classes="rank-card -waiting", **kwargs)  # type: ignore[arg-type]
        self.index = index
        self.seed = seed
        self.can_focus = False
        self.body = Static("", classes="rank-card-body", markup=False)
        self.border_title = f"{index + 1}"

    def compose(self) -> ComposeResult:
        yield self.body


class RankPanel(Vertical, can_focus=True):
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
        Binding("enter", "confirm", "Save"),
        Binding("escape", "stop", "Stop/skip"),
        Binding("pageup", "scroll_answer(-1)", "Scroll answer up", show=False),
        Binding("pagedown", "scroll_answer(1)", "Scroll answer down", show=False),
    ]

    class Confirmed(Message):
        """The person's ranking: ``order`` of answer indices (best first), ``edits`` by index."""

        def __init__(self, order: Order, edits: dict[int, str]) -> None:
            super().__init__()
            self.order = order
            self.edits = edits

    class Skipped(Message):
        """Esc once every answer was in: nothing is saved."""

    class StopRequested(Message):
        """Esc while the answers stream: the chat pane stops the sampling."""

    class EditRequested(Message):
        def __init__(self, index: int, text: str) -> None:
            super().__init__()
            self.index = index
            self.text = text

    def __init__(self, prompt: str, seeds: list[int], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.prompt = prompt
        self.seeds = list(seeds)
        self.count = len(seeds)
        self.texts = [""] * self.count
        self.states = ["waiting"] * self.count
        self.order: list[int] = list(range(self.count))
        self.rejected: list[int] = []
        self.edits: dict[int, str] = {}
        self.selected = 0
        self.sampling = True
        self.saving = False
        self.note = ""
        self._typed = 0
        self._header = Static("", id="rank-header")
        self._order_line = Static("", id="rank-order")
        self._tabs = Tabs(*[Tab(f"{i + 1}", id=f"rank-tab-{i}") for i in range(self.count)], id="rank-tabs")
        self._tabs.can_focus = False
        self.cards = [AnswerCard(i, seed) for i, seed in enumerate(self.seeds)]

    def compose(self) -> ComposeResult:
        yield self._header
        yield self._order_line
        yield self._tabs
        with Horizontal(id="rank-answers"):
            yield from self.cards

    def on_mount(self) -> None:
        self._refresh_all()

    def on_resize(self) -> None:
        side_by_side = self.size.width >= CARD_WIDTH * self.count + 2
        self.set_class(side_by_side, "-side-by-side")
        self.set_class(not side_by_side, "-tabs")

    # -- what the chat pane feeds in --------------------------------------------------------------
    def add_text(self, index: int, text: str) -> None:
        if self.states[index] == "waiting":
            self.states[index] = "streaming"
            self._refresh_card(index)
            if self.has_class("-tabs") and self.states[self.selected] != "streaming":
                self.action_select_index(index)  # follow a stream, but do not jump between them
        self.texts[index] += text
        # The card stays where it is (at the start, unless scrolled): an answer is ranked from its start.
        self.cards[index].body.update(self.texts[index])

    def finish_answer(self, index: int, text: str, state: str) -> None:
        self.texts[index] = text.strip() if state == "complete" else text
        self.states[index] = state
        self.cards[index].body.update(self.texts[index])
        self._refresh_card(index)

    def sampling_finished(self, state: str) -> None:
        self.sampling = False
        self.note = "" if state == "complete" else state
        self.selected = 0  # the tabs followed the stream; ranking starts at the first answer
        self._refresh_all()

    def set_note(self, note: str) -> None:
        self.note = note
        self._show_header()

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

    def _ready(self) -> bool:
        if self.sampling:
            self.set_note("the answers are still coming (Esc stops)")
            return False
        return not self.saving

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
        if not self._ready():
            return
        index = self.selected
        self.post_message(self.EditRequested(index, self.edits.get(index, self.texts[index])))

    def set_edit(self, index: int, text: str) -> None:
        """The person's rewrite of answer ``index`` (the model's own text when unchanged or empty)."""
        text = text.strip()
        if text and text != self.texts[index]:
            self.edits[index] = text
        else:
            self.edits.pop(index, None)
        self.cards[index].body.update(self.edits.get(index, self.texts[index]))
        self._refresh_all()

    def action_confirm(self) -> None:
        if not self._ready():
            return
        self.saving = True
        self.set_note("saving…")
        self.post_message(self.Confirmed(self.current_order(), dict(self.edits)))

    def saving_failed(self, error: str) -> None:
        self.saving = False
        self.set_note(error)

    def action_stop(self) -> None:
        if self.saving:
            return
        if self.sampling:
            self.set_note("stopping…")
            self.post_message(self.StopRequested())
        else:
            self.post_message(self.Skipped())

    def action_scroll_answer(self, direction: int) -> None:
        card = self.cards[self.selected]
        if direction < 0:
            card.scroll_page_up(animate=False)
        else:
            card.scroll_page_down(animate=False)

    # -- drawing ----------------------------------------------------------------------------------
    def place_label(self, index: int) -> str:
        if index in self.rejected:
            return "✗ rejected"
        return ORDINALS[self.order.index(index)] if self.order.index(index) < len(ORDINALS) else "?"

    def _show_header(self) -> None:
        text = Text()
        if self.sampling:
            streaming = [i for i, state in enumerate(self.states) if state != "waiting"]
            current = streaming[-1] + 1 if streaming else 1
            text.append(f"Sampling answer {current} of {self.count}… ", style="bold")
            text.append("Esc stops. ", style="dim")
        else:
            text.append(f"Rank {self.count} answers: ", style="bold")
        if self.note:
            text.append(self.note, style="bold yellow")
        else:
            text.append(self.prompt)
        self._header.update(text)

    def _refresh_card(self, index: int) -> None:
        card = self.cards[index]
        state = self.states[index]
        card.set_class(state == "waiting", "-waiting")
        card.set_class(index in self.rejected, "-rejected")
        card.set_class(index in self.edits, "-edited")
        card.border_title = f"{index + 1}"
        if state in ("waiting", "streaming"):
            card.border_subtitle = state + ("…" if state == "streaming" else "")
        elif state != "complete":
            card.border_subtitle = "stopped" if state == "cancelled" else "failed"
        else:
            subtitle = self.place_label(index)
            if index in self.edits:
                subtitle += " · edited"
            card.border_subtitle = subtitle
        label = f"{index + 1}"
        if state == "complete":
            label += " ✗" if index in self.rejected else f" #{self.order.index(index) + 1}"
            if index in self.edits:
                label += "✎"
        tab = self._tabs.query(f"#rank-tab-{index}")
        if tab:
            tab.first(Tab).label = label

    def _refresh_all(self) -> None:
        self._show_header()
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
        if self._typed and not self.sampling:
            line.append(f"  (the next digit places #{self._typed + 1})", style="dim")
        self._order_line.update(line)
        for index in range(self.count):
            self._refresh_card(index)
        self.action_select_index(self.selected)
