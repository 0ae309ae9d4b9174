"""Modal forms: launching a stage (keys 1, 2, 3), the chat options (model, system prompt, sampling,
answers per rank round), and editing a sampled answer into a better demonstration.

The launch form validates and starts the run through ``oatui.stages.launcher.launch`` in a thread
worker; a ``UserError`` comes back as one line in the form, with everything typed left in place.
What was submitted is remembered per stage (``oatui.app.choices``).
"""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static, TextArea

from oatui.app.choices import STAGE_NAMES, LaunchChoice, load_choice, save_choice
from oatui.app.messages import ChatSettings
from oatui.errors import UserError
from oatui.workspace import Workspace

LAUNCHERS = ("auto", "python", "accelerate", "deepspeed")


class LaunchForm(ModalScreen[tuple[str, str] | None]):
    """Config sections, ``--set`` overrides, launcher and GPUs for one stage; dismisses with
    ``(run_id, stage)`` once the run is launched, or None."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "submit", "Launch"),
    ]

    class Launched(Message):
        def __init__(self, run_id: str) -> None:
            super().__init__()
            self.run_id = run_id

    class Failed(Message):
        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    class SectionsListed(Message):
        def __init__(self, names: list[str]) -> None:
            super().__init__()
            self.names = names

    def __init__(self, stage: str, workspace: Path) -> None:
        super().__init__(classes="dialog-screen")
        self.stage = stage
        self.workspace = Path(workspace)
        self.choice = load_choice(self.workspace / "state", stage)
        self._state = Workspace(self.workspace).state
        self.launching = False

    def compose(self) -> ComposeResult:
        choice = self.choice
        with Vertical(classes="dialog", id="launch-form"):
            yield Label(f"Launch an {STAGE_NAMES[self.stage]} run", classes="dialog-title")
            yield Label("Config sections, applied in order", classes="field-label")
            yield Input(choice.configs, id="launch-configs", placeholder="defaults tiny", compact=True)
            yield Static("", id="launch-sections", classes="field-hint")
            yield Label("Overrides (key=value, each one --set)", classes="field-label")
            example = "total_steps=40 kl_target=4" if self.stage == "rl" else "max_steps=100 learning_rate=1e-5"
            yield Input(choice.overrides, id="launch-overrides", placeholder=example, compact=True)
            with Horizontal(classes="field-row"):
                with Vertical():
                    yield Label("Launcher", classes="field-label")
                    yield Select([(name, name) for name in LAUNCHERS], value=choice.launcher
                                 if choice.launcher in LAUNCHERS else "auto", allow_blank=False,
                                 id="launch-launcher", compact=True)
                with Vertical():
                    yield Label("GPUs (empty: none)", classes="field-label")
                    yield Input(choice.gpus, id="launch-gpus", placeholder="0,1", compact=True)
            yield Static("", id="launch-error", classes="form-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Launch (ctrl+s)", variant="primary", id="launch-submit", compact=True)
                yield Button("Cancel (esc)", id="launch-cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#launch-configs", Input).focus()
        self._list_sections()

    @work(thread=True, exclusive=True, group="launch-sections")
    def _list_sections(self) -> None:
        try:
            from oatui.config import load_index

            names = load_index(self.workspace).names()
        except Exception:  # noqa: BLE001 - a hint only; the launch reports any real problem
            return
        self.post_message(self.SectionsListed(names))

    @on(SectionsListed)
    def _show_sections(self, message: SectionsListed) -> None:
        self.query_one("#launch-sections", Static).update("sections: " + " ".join(message.names))

    def current_choice(self) -> LaunchChoice:
        return LaunchChoice(
            configs=self.query_one("#launch-configs", Input).value.strip(),
            overrides=self.query_one("#launch-overrides", Input).value.strip(),
            launcher=str(self.query_one("#launch-launcher", Select).value),
            gpus=self.query_one("#launch-gpus", Input).value.strip(),
        )

    def show_error(self, error: str) -> None:
        self.query_one("#launch-error", Static).update(" ".join(error.split()))
        self.set_class(bool(error), "-error")

    @on(Input.Submitted)
    @on(Button.Pressed, "#launch-submit")
    def action_submit(self) -> None:
        if self.launching:
            return
        choice = self.current_choice()
        if not choice.configs:
            self.show_error("Config sections: name at least one, e.g. " + LaunchChoice.default(self.stage).configs)
            return
        try:
            overrides = shlex.split(choice.overrides)
        except ValueError as error:
            self.show_error(f"Overrides: {error}")
            return
        bad = [item for item in overrides if "=" not in item]
        if bad:
            self.show_error(f"Overrides: {bad[0]!r} is not key=value")
            return
        try:
            save_choice(self._state, self.stage, choice)
        except OSError as error:
            self.show_error(f"cannot remember the choice: {error}")
        self.choice = choice
        self.launching = True
        self.show_error("")
        self.query_one("#launch-submit", Button).disabled = True
        self.query_one("#launch-error", Static).update("Launching…")
        self._launch(replace(choice), overrides)

    @work(thread=True, exclusive=True, group="launch")
    def _launch(self, choice: LaunchChoice, overrides: list[str]) -> None:
        from oatui.stages.launcher import LaunchRequest, launch

        request = LaunchRequest(
            stage=self.stage,
            configs=choice.configs.split(),
            overrides=overrides,
            launcher=choice.launcher,
            gpus=choice.gpus or None,
        )
        try:
            run = launch(request, Workspace.open(self.workspace))
        except UserError as error:
            self.post_message(self.Failed(str(error)))
        except Exception as error:  # noqa: BLE001 - shown in the form, never a traceback
            self.post_message(self.Failed(f"{type(error).__name__}: {error}"))
        else:
            self.post_message(self.Launched(run.id))

    @on(Failed)
    def _failed(self, message: Failed) -> None:
        self.launching = False
        self.query_one("#launch-submit", Button).disabled = False
        self.show_error(message.error)

    @on(Launched)
    def _launched(self, message: Launched) -> None:
        self.launching = False
        self.dismiss((message.run_id, self.stage))

    @on(Button.Pressed, "#launch-cancel")
    def action_cancel(self) -> None:
        if not self.launching:
            self.dismiss(None)


class OptionBox(Checkbox):
    """A checkbox whose box is empty when off: Textual's own draws the same X either way, only dimmer."""

    @property
    def BUTTON_INNER(self) -> str:  # type: ignore[override]  # noqa: N802 - Textual's name
        return "X" if self.value else " "


class ChatOptions(ModalScreen[ChatSettings | None]):
    """Model (any streaming model of the repository), system prompt and sampling parameters."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "submit", "Save"),
    ]

    def __init__(self, settings: ChatSettings, models: list[str]) -> None:
        super().__init__(classes="dialog-screen")
        self.settings = settings
        self.models = sorted(set(models) | {settings.model})

    def compose(self) -> ComposeResult:
        settings = self.settings
        with Vertical(classes="dialog", id="chat-options"):
            yield Label("Chat options", classes="dialog-title")
            yield Label("Model (streaming models in the repository)", classes="field-label")
            yield Select([(name, name) for name in self.models], value=settings.model, allow_blank=False,
                         id="options-model", compact=True)
            yield Label("System prompt", classes="field-label")
            yield Input(settings.system, id="options-system", placeholder="(none)", compact=True)
            with Horizontal(classes="field-row"):
                with Vertical():
                    yield Label("Temperature", classes="field-label")
                    yield Input(f"{settings.temperature:g}", id="options-temperature", compact=True)
                with Vertical():
                    yield Label("Top-p", classes="field-label")
                    yield Input(f"{settings.top_p:g}", id="options-top-p", compact=True)
                with Vertical():
                    yield Label("Max new tokens", classes="field-label")
                    yield Input(str(settings.max_new_tokens), id="options-max-new-tokens", compact=True)
                with Vertical():
                    yield Label("Answers to rank", classes="field-label")
                    yield Input(str(settings.rank_count), id="options-rank-count", compact=True)
            yield OptionBox("Always generate max new tokens (ignore EOS)", settings.ignore_eos,
                            id="options-ignore-eos", compact=True)
            yield Static("", id="options-error", classes="form-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="options-save", compact=True)
                yield Button("Cancel (esc)", id="options-cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#options-system", Input).focus()

    def _number(self, selector: str, name: str, kind: type, low: float, high: float) -> float | int:
        text = self.query_one(selector, Input).value.strip()
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not low <= value <= high:
            raise ValueError(f"{name}: {value} is outside {low:g}..{high:g}")
        return value

    @on(Input.Submitted)
    @on(Button.Pressed, "#options-save")
    def action_submit(self) -> None:
        try:
            settings = ChatSettings(
                model=str(self.query_one("#options-model", Select).value),
                system=self.query_one("#options-system", Input).value,
                temperature=float(self._number("#options-temperature", "Temperature", float, 0.0, 10.0)),
                top_p=float(self._number("#options-top-p", "Top-p", float, 0.01, 1.0)),
                max_new_tokens=int(self._number("#options-max-new-tokens", "Max new tokens", int, 1, 32768)),
                ignore_eos=self.query_one("#options-ignore-eos", Checkbox).value,
                rank_count=int(self._number("#options-rank-count", "Answers to rank", int, 2, 9)),
            )
        except ValueError as error:
            self.query_one("#options-error", Static).update(str(error))
            return
        self.dismiss(settings)

    @on(Button.Pressed, "#options-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class EditAnswer(ModalScreen[str | None]):
    """A sampled answer in a TextArea, to rewrite into a better demonstration; dismisses with the text."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "submit", "Keep the edit"),
    ]

    def __init__(self, number: int, text: str) -> None:
        super().__init__(classes="dialog-screen")
        self.number = number
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="edit-answer"):
            yield Label(f"Edit answer {self.number} into a better demonstration", classes="dialog-title")
            yield TextArea(self.text, id="edit-text", soft_wrap=True)
            yield Static("It is saved as the best answer, written by you; the model's text is ranked below it.",
                         classes="field-hint")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Keep (ctrl+s)", variant="primary", id="edit-save", compact=True)
                yield Button("Cancel (esc)", id="edit-cancel", compact=True)

    def on_mount(self) -> None:
        area = self.query_one("#edit-text", TextArea)
        area.focus()
        area.move_cursor(area.document.end)

    @on(Button.Pressed, "#edit-save")
    def action_submit(self) -> None:
        self.dismiss(self.query_one("#edit-text", TextArea).text)

    @on(Button.Pressed, "#edit-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
