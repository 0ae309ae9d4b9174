"""The metric picker of the Curves tab (key /): every metric the drawn runs logged, filtered as you
type; space picks or unpicks the highlighted one, enter draws the picked ones (or, with none picked,
the highlighted one), ctrl+d goes back to the stage's default charts, esc leaves things as they were.

Focus stays in the filter; up/down move the highlight. A picked metric reads ``[x]``, the others
``[ ]``, so the list reads without colour.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option


class MetricFilter(Input):
    """The filter: metric names have no spaces, so space is left to the picker (pick/unpick)."""

    def check_consume_key(self, key: str, character: str | None) -> bool:
        return key != "space" and super().check_consume_key(key, character)


class MetricPicker(ModalScreen[tuple[str, ...] | None]):
    """Dismisses with the picked metric names (empty: the default charts), or None (cancelled)."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", priority=True),
        Binding("enter", "apply", "Draw", priority=True),
        Binding("space", "pick", "Pick", priority=True),
        Binding("up", "move(-1)", show=False, priority=True),
        Binding("down", "move(1)", show=False, priority=True),
        Binding("pageup", "move(-10)", show=False, priority=True),
        Binding("pagedown", "move(10)", show=False, priority=True),
        Binding("ctrl+d", "defaults", "Default charts", priority=True),
    ]

    def __init__(self, names: Sequence[str], picked: Sequence[str] = ()) -> None:
        super().__init__(classes="dialog-screen")
        self.names = list(names)
        self.picked = [name for name in picked if name in self.names]
        self.shown: list[str] = list(self.names)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="metric-picker"):
            yield Label("Metrics to draw", classes="dialog-title")
            yield MetricFilter(placeholder="type to filter", id="metric-filter", compact=True)
            options = OptionList(id="metric-options", compact=True)
            options.can_focus = False
            yield options
            yield Static("", id="metric-count", classes="field-hint")
            yield Label("space pick/unpick · enter draw · ctrl+d default charts · esc cancel", classes="dialog-hint")

    def on_mount(self) -> None:
        self._fill()
        self.query_one("#metric-filter", Input).focus()

    def _fill(self, keep: str | None = None) -> None:
        text = self.query_one("#metric-filter", Input).value.strip().lower()
        words = text.split()
        self.shown = [name for name in self.names if all(word in name.lower() for word in words)]
        options = self.query_one("#metric-options", OptionList)
        options.clear_options()
        options.add_options([Option(self._prompt(name), id=name) for name in self.shown])
        if self.shown:
            options.highlighted = self.shown.index(keep) if keep in self.shown else 0
        count = self.query_one("#metric-count", Static)
        if not self.names:
            count.update("No metrics logged yet.")
        else:
            shown = f"{len(self.shown)} of {len(self.names)} metrics"
            count.update(f"{shown} · picked: {', '.join(self.picked)}" if self.picked else f"{shown} · none picked")

    def _prompt(self, name: str) -> Text:
        picked = name in self.picked
        return Text.assemble(("[x] " if picked else "[ ] ", "bold" if picked else ""), name)

    @property
    def highlighted(self) -> str | None:
        index = self.query_one("#metric-options", OptionList).highlighted
        return self.shown[index] if index is not None and 0 <= index < len(self.shown) else None

    @on(Input.Changed, "#metric-filter")
    def _filter_changed(self) -> None:
        self._fill(self.highlighted)

    def action_move(self, rows: int) -> None:
        options = self.query_one("#metric-options", OptionList)
        if not self.shown:
            return
        index = options.highlighted or 0
        options.highlighted = max(0, min(len(self.shown) - 1, index + rows))

    def action_pick(self) -> None:
        name = self.highlighted
        if name is None:
            return
        if name in self.picked:
            self.picked.remove(name)
        else:
            self.picked.append(name)
        self._fill(name)

    def action_apply(self) -> None:
        if not self.picked and self.highlighted is not None:
            self.dismiss((self.highlighted,))
            return
        self.dismiss(tuple(self.picked))

    def action_defaults(self) -> None:
        self.dismiss(())

    def action_cancel(self) -> None:
        self.dismiss(None)
