"""The chat pane: streams the served policy's answers into Markdown, keeps conversations in SQLite.

Answers stream in an async worker (``AsyncChatClient`` on the app's event loop); pieces are
gathered and posted as ``TokenReceived`` at most ``FLUSH_INTERVAL`` apart, and a ``MarkdownStream``
coalesces them further, so a fast model never floods the screen. Esc cancels the worker, which
cancels the gRPC call, which makes the server stop generating. Conversations and their messages
go to ``oatui.chat.history`` (``WORKSPACE/state/chats.sqlite``) from worker threads.

Rank mode (ctrl+r): each prompt opens a round, a :class:`RankPanel` that samples K answers (seeds
S, S+1, ...) at the same time, where the person puts them in order, edits one into a better
demonstration or rejects some. Enter appends the ranking to ``WORKSPACE/data/feedback.trees.jsonl``
(``oatui.chat.feedback``, in a thread) and the conversation goes on from the best answer; only that
answer is kept in the chat history. Esc stops the sampling, or skips a round: nothing is saved.

Blind A/B mode (ctrl+g): each prompt goes to two models at once, their answers shown as A and B in
a random order revealed after the choice (``oatui.app.widgets.ab_panel``, mixed in as ``ABMode``).

Both kinds of round are a :class:`~oatui.app.widgets.round_panel.RoundPanel` in place of the
transcript: it runs the round and posts ``Closed`` when it is over; the pane's ``phase`` says where
the open round stands (``RoundPhase.IDLE`` when there is none).

A failed answer (the server went away mid-answer, say) leaves one line in the status bar until
the next prompt, with ctrl+t to restart the server.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Input, Markdown, OptionList, Static
from textual.widgets.option_list import Option

from oatui.app.messages import (
    AnswerFinished,
    ChatSettings,
    ConversationOpened,
    ConversationsLoaded,
    ModelsListed,
    RoundAnswersFinished,
    TokenReceived,
)
from oatui.app.streaming import ANSWER_TIMEOUT, close_quietly, one_line, stream_in_batches
from oatui.app.widgets.ab_panel import ABMode, ABPanel
from oatui.app.widgets.forms import ChatOptions
from oatui.app.widgets.rank_panel import RankPanel
from oatui.app.widgets.round_panel import RoundPanel, RoundPhase, RoundRequest

if TYPE_CHECKING:
    from collections.abc import Iterable

    from textual.widgets.markdown import MarkdownStream

    from oatui.app.messages import RankingSaved
    from oatui.chat.history import ChatHistory
    from oatui.serve.record import ServerInfo
    from oatui.workspace import Workspace

#: The conversation list shows beside the transcript from this width of the pane (zoomed, or a wide terminal).
CONVERSATIONS_WIDTH = 100
PROMPT_HINT = "Ask the policy (Enter sends · Esc stops · ctrl+o options · ctrl+r rank mode)"

STOPPED_MARK = "— stopped"


def stopped_answer(text: str) -> str:
    """An answer stopped with Esc as the pane shows it: marked, so that it does not look finished.
    The mark is only drawn; the history keeps the text and the state ``cancelled``."""
    return f"{text}\n\n*{STOPPED_MARK}*" if text.strip() else f"*{STOPPED_MARK}*"


class ChatPane(ABMode, Vertical):
    """Prompt, transcript and conversation list of the chat with the served policy."""

    ALLOW_MAXIMIZE = True
    BORDER_TITLE = "Chat"
    BINDINGS = [
        Binding("escape", "cancel", "Stop answer / leave prompt"),
        Binding("ctrl+r", "toggle_rank", "Rank mode"),
        Binding("ctrl+g", "toggle_ab", "Blind A/B"),
        Binding("ctrl+n", "new_conversation", "New chat"),
        Binding("ctrl+o", "options", "Chat options"),
        Binding("ctrl+y", "copy_answer", "Copy answer"),
    ]

    def __init__(self, workspace: Workspace, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.workspace = workspace
        self.settings = ChatSettings()
        self.server: ServerInfo | None = None
        self.server_note: str | None = None
        self.models: list[str] = []
        self.conversation_id: int | None = None
        self.turns: list[tuple[str, str, int | None]] = []  # (role, text, message id)
        self.streaming = False
        self.stop_requested = False
        self.answer_text = ""
        #: The last answer's failure (one line), shown until the next prompt or a new server.
        self.failure: str | None = None
        self.rank_mode = False
        #: The open round (rank mode's or blind A/B's), in place of the transcript.
        self.round_panel: RoundPanel | None = None
        self._zoomed_for_mode = False  # rank or A/B mode took the screen, and gives it back
        self._history: ChatHistory | None = None
        self._stream: MarkdownStream | None = None
        self._answer_view: Markdown | None = None
        # Children are reached by reference: a message may arrive while the app tears them down.
        self._status = Static(id="chat-status")
        self._listing = OptionList(id="chat-conversations")
        self._transcript = VerticalScroll(id="chat-transcript")
        self._body = Horizontal(id="chat-body")
        self._prompt = Input(id="chat-prompt", placeholder=PROMPT_HINT)

    def compose(self) -> ComposeResult:
        yield self._status
        with self._body:
            yield self._listing
            yield self._transcript
        yield self._prompt

    def on_mount(self) -> None:
        self._listing.border_title = "Conversations"
        self._show_status()
        self.load_conversations()
        self.list_models()

    def on_resize(self) -> None:
        self.set_class(self.size.width >= CONVERSATIONS_WIDTH, "-wide")

    # -- the store ------------------------------------------------------------------------------
    def history(self) -> ChatHistory:
        if self._history is None:
            from oatui.chat.history import ChatHistory

            self._history = ChatHistory(self.workspace.chat_db)
        return self._history

    @work(thread=True, exclusive=True, group="chat-history")
    def load_conversations(self, selected: int | None = None) -> None:
        try:
            conversations = self.history().conversations()
        except Exception as error:  # noqa: BLE001 - a broken store must not take the pane down
            self.app.call_from_thread(self._show_status, f"chat history unavailable: {error}")
            return
        self.post_message(ConversationsLoaded(conversations, selected))

    @on(ConversationsLoaded)
    def _conversations_loaded(self, message: ConversationsLoaded) -> None:
        listing = self._listing
        listing.clear_options()
        listing.add_options(
            Option(f"{conversation.title}", id=str(conversation.id)) for conversation in message.conversations
        )
        if message.selected is not None:
            try:
                listing.highlighted = listing.get_option_index(str(message.selected))
            except Exception:  # noqa: BLE001 - gone meanwhile
                pass

    @on(OptionList.OptionSelected, "#chat-conversations")
    def _conversation_chosen(self, event: OptionList.OptionSelected) -> None:
        if self.streaming or self.round_panel is not None or event.option.id is None:
            return
        self.open_conversation(int(event.option.id))

    @work(thread=True, exclusive=True, group="chat-history")
    def open_conversation(self, conversation_id: int) -> None:
        history = self.history()
        conversation = history.conversation(conversation_id)
        if conversation is None:
            return
        self.post_message(ConversationOpened(conversation, history.thread(conversation_id)))

    @on(ConversationOpened)
    async def _conversation_opened(self, message: ConversationOpened) -> None:
        conversation = message.conversation
        self.conversation_id = conversation.id
        self.turns = [(m.role, m.text, m.id) for m in message.messages if m.text or m.role == "prompter"]
        if conversation.model:
            self.settings = replace(self.settings, model=conversation.model, system=conversation.system or "")
        transcript = self._transcript
        await transcript.remove_children()
        widgets = []
        for m in message.messages:
            widgets.append(self._message_widget(m.role, m.text, m.state))
        await transcript.mount_all(widgets)
        transcript.scroll_end(animate=False)
        self._show_status()

    # -- models and the server ------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="chat-models")
    def list_models(self) -> None:
        from oatui.serve.repository import streaming_models

        try:
            models = streaming_models(self.workspace.triton_repo)
        except OSError:
            models = []
        self.post_message(ModelsListed(models))

    @on(ModelsListed)
    def _models_listed(self, message: ModelsListed) -> None:
        self.models = message.models
        if self.models and self.settings.model not in self.models:
            self.settings = replace(self.settings, model="policy" if "policy" in self.models else self.models[0])
        self._show_status()

    def set_server(self, info: ServerInfo | None, note: str | None = None) -> None:
        if info is not None and self.server is None:
            self.failure = None  # a server (re)started: the old failure is history
        self.server = info
        self.server_note = note
        self._show_status()

    def _show_status(self, error: str | None = None) -> None:
        """One line: ``error`` (a passing notice), else the last failure, else the server and settings."""
        status = self._status
        text = Text()
        if error:
            text.append(one_line(error), style="bold red")
        elif self.failure and not self.server_note:
            text.append("✗ ", style="bold red")
            text.append(self.failure, style="bold red")
            if self.server is None:
                text.append("  server down: ctrl+t restarts it", style="bold")
        elif self.server_note:
            text.append(self.server_note, style="italic")
        elif self.server is None:
            if not self.models:
                text.append("No streaming model exported yet: ", style="bold")
                text.append("select a finished SFT or RL run and press e, then s to serve it.")
            else:
                text.append("Server not running: ", style="bold")
                text.append("press s to start it (Esc leaves the prompt first).")
        else:
            if self.ab_models is not None:
                status.update(self.ab_status())
                return
            text.append("● ", style="green")
            text.append(f"{self.server.served_label(self.settings.model)} @ {self.server.grpc_url}")
            s = self.settings
            text.append(f"  T {s.temperature:g} · top-p {s.top_p:g} · max {s.max_new_tokens}", style="dim")
            if s.system:
                text.append(" · system prompt", style="dim")
        if self.rank_mode and not error and not (self.failure and not self.server_note):
            text.append(f"  rank mode: {self.settings.rank_count} answers", style="bold magenta")
        status.update(text)

    # -- sending a prompt -----------------------------------------------------------------------
    @on(Input.Submitted, "#chat-prompt")
    async def _prompt_submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if self.busy():
            return
        if self.server is None:
            self._show_status("Server not running: press ctrl+t (or Esc, then s) to start it.")
            return
        event.input.value = ""
        self.failure = None
        if self.ab_models is not None:
            await self.start_ab_round(prompt)
            return
        if self.rank_mode:
            await self._start_rank_round(prompt)
            return
        transcript = self._transcript
        self._answer_view = self._message_widget("assistant", "", "complete")
        await transcript.mount_all([self._message_widget("prompter", prompt, "complete"), self._answer_view])
        transcript.scroll_end(animate=False)
        self._stream = Markdown.get_stream(self._answer_view)
        self.streaming = True
        self.stop_requested = False
        self.answer_text = ""
        self.add_class("-streaming")
        self.send(prompt, self.settings, self.server.grpc_url)

    @work(exclusive=True, group="chat")
    async def send(self, prompt: str, settings: ChatSettings, url: str) -> None:
        """Save the prompt, stream the answer, save the answer: whatever way it ends (Esc at any
        moment included), one ``AnswerFinished`` is posted."""
        history = self.history()
        pieces: list[str] = []
        state, error = "complete", None
        asked = None
        client = None
        try:
            from oatui.serve.client import AsyncChatClient, RemoteError, ServerUnavailable

            parent = self.turns[-1][2] if self.turns else None
            if self.conversation_id is None:
                conversation = await asyncio.to_thread(
                    history.new_conversation, prompt, model=settings.model, system=settings.system or None,
                    params=settings.sampling())
                self.conversation_id = conversation.id
            asked = await asyncio.to_thread(
                history.add_message, self.conversation_id, "prompter", prompt, parent_id=parent)
            context = [(role, text) for role, text, _ in self.turns] + [("prompter", prompt)]
            self.turns.append(("prompter", prompt, asked.id))
            client = AsyncChatClient(url, model=settings.model, timeout=ANSWER_TIMEOUT, retries=2)
            try:
                await stream_in_batches(client, context, settings, pieces,
                                        lambda text: self.post_message(TokenReceived(text)))
            except (ServerUnavailable, RemoteError, ValueError) as failure:
                state, error = "error", str(failure)
            if self.stop_requested and state == "complete":
                # The client ends its stream quietly when its call was cancelled under it.
                state = "cancelled"
        except asyncio.CancelledError:
            state = "cancelled"
            raise
        except Exception as failure:  # noqa: BLE001 - shown in the pane, never a traceback
            state, error = "error", f"{type(failure).__name__}: {failure}"
        finally:
            answer = "".join(pieces)
            self.post_message(AnswerFinished(answer, state, error))
            if asked is not None and self.conversation_id is not None:
                try:
                    saved = history.add_message(
                        self.conversation_id, "assistant", answer, parent_id=asked.id, model=settings.model,
                        params=settings.sampling(), state=state)
                    if state != "error":
                        self.turns.append(("assistant", answer, saved.id))
                except Exception:  # noqa: BLE001 - the answer is on screen; the store reports later
                    pass
            await close_quietly(client)

    @on(TokenReceived)
    async def _token_received(self, message: TokenReceived) -> None:
        self.answer_text += message.text
        if self._stream is not None:
            await self._stream.write(message.text)
        transcript = self._transcript
        if transcript.max_scroll_y - transcript.scroll_y <= 3:
            transcript.scroll_end(animate=False)

    @on(AnswerFinished)
    async def _answer_finished(self, message: AnswerFinished) -> None:
        self.streaming = False
        self.remove_class("-streaming")
        self.answer_text = message.text
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        view = self._answer_view
        if view is not None:
            if message.state == "cancelled":
                view.add_class("-cancelled")
                view.border_subtitle = "stopped"
                await view.update(stopped_answer(message.text))
            elif message.state == "error":
                view.add_class("-error")
                view.border_subtitle = "failed"
                if not message.text:
                    await view.update(f"*{message.error}*")
        if message.state == "error":
            self.failure = one_line(message.error or "the answer failed")
        self._show_status()
        self.load_conversations(self.conversation_id)

    def _message_widget(self, role: str, text: str, state: str) -> Static | Markdown:
        if role == "prompter":
            widget: Static | Markdown = Static(Text(text), classes="chat-message chat-prompter")
        else:
            widget = Markdown(stopped_answer(text) if state == "cancelled" else text,
                              classes="chat-message chat-assistant")
            if state == "cancelled":
                widget.add_class("-cancelled")
                widget.border_subtitle = "stopped"
            elif state == "error":
                widget.add_class("-error")
        return widget

    # -- rank mode and the rounds ---------------------------------------------------------------------
    @property
    def phase(self) -> RoundPhase:
        """Where the open round stands; ``RoundPhase.IDLE`` when there is none."""
        return self.round_panel.phase if self.round_panel is not None else RoundPhase.IDLE

    def busy(self, finish_round: str = "Finish the ranking first: Enter saves it, Esc skips it.") -> bool:
        """Whether an answer streams or a round is open (the status line says so, and what to do)."""
        if self.streaming:
            self._show_status("An answer is still streaming: Esc stops it.")
        elif self.round_panel is not None:
            self._show_status(finish_round)
        return self.streaming or self.round_panel is not None

    def action_toggle_rank(self) -> None:
        if self.busy():
            return
        if not self.rank_mode and self.ab_models is not None:
            self.leave_ab_mode()  # one mode at a time
        self.rank_mode = not self.rank_mode
        self.set_class(self.rank_mode, "-rank-mode")
        if self.rank_mode:
            self.take_screen()
        else:
            self.give_screen_back()
        self.mode_changed()

    def mode_changed(self) -> None:
        """Rank or A/B mode came or went: the prompt's hint and the status line say so; the prompt has the keys."""
        self._prompt.placeholder = self._placeholder()
        self._show_status()
        self._prompt.focus()

    def take_screen(self) -> None:
        """Side by side needs the width: the pane takes the screen, unless something is zoomed already
        (the mode's key, or Esc, gives it back)."""
        screen = self.screen
        if screen.maximized is None:
            self._zoomed_for_mode = screen.maximize(self, container=False)

    def give_screen_back(self) -> None:
        """Leaving a mode: the screen goes back as it was, if the mode took it."""
        screen = self.screen
        if self._zoomed_for_mode and screen.maximized is self:
            screen.minimize()
        self._zoomed_for_mode = False

    def _placeholder(self) -> str:
        if self.ab_models is not None:
            return self.ab_placeholder()
        if self.rank_mode:
            return (f"Rank mode: ask for {self.settings.rank_count} answers to put in order "
                    "(Enter samples · ctrl+r leaves rank mode)")
        return PROMPT_HINT

    def round_request(self, prompt: str, models: Iterable[str]) -> RoundRequest:
        """What a round on ``prompt`` takes from the pane; ``models``: those it asks (the training run
        behind each is looked up, where the server knows it)."""
        server = self.server
        assert server is not None
        source = getattr(server, "model_source", None)
        runs = {name: source(name).run_id for name in models} if source is not None else {}
        return RoundRequest(prompt=prompt, context=[(role, text) for role, text, _ in self.turns] + [("prompter", prompt)],
                            settings=self.settings, url=server.grpc_url, feedback_file=self.workspace.feedback_file,
                            history=self.history, conversation_id=self.conversation_id,
                            parent_id=self.turns[-1][2] if self.turns else None, runs=runs)

    async def open_round(self, panel: RoundPanel) -> None:
        """Show the round's panel in place of the transcript, and start its answers."""
        self.round_panel = panel
        self.add_class("-ranking")
        self.add_class("-streaming")
        await self._body.mount(panel)
        panel.generate()
        panel.focus()
        self._show_status()

    async def _start_rank_round(self, prompt: str) -> None:
        base = random.randrange(0, 2**31)
        seeds = [base + i for i in range(self.settings.rank_count)]
        await self.open_round(RankPanel(self.round_request(prompt, [self.settings.model]), seeds, id="rank-panel"))

    @on(RoundAnswersFinished)
    def _round_answers_finished(self, message: RoundAnswersFinished) -> None:
        # The round's panel took it first (its phase says what comes next).
        self.set_class(self.phase is RoundPhase.GENERATING, "-streaming")
        if message.state == "complete":
            self._show_status()

    @on(RoundPanel.Closed)
    async def _round_closed(self, message: RoundPanel.Closed) -> None:
        """Close the round's panel: the conversation goes on from the answer it kept, or the prompt
        goes back into the input when nothing was saved."""
        message.stop()
        panel, self.round_panel = self.round_panel, None
        self.remove_class("-ranking")
        self.remove_class("-streaming")
        if panel is not None and panel.is_attached:
            await panel.remove()
        saved = message.saved
        if saved is None:
            if message.failure:
                self.failure = one_line(message.failure)
            if message.prompt and not self._prompt.value:
                self._prompt.value = message.prompt
            self._show_status(message.notice)
            self._prompt.focus()
            return
        self.conversation_id = saved.conversation_id
        self.turns.extend(saved.turns)
        transcript = self._transcript
        await transcript.mount_all([self._message_widget(role, text, "complete") for role, text, _ in saved.turns])
        transcript.scroll_end(animate=False)
        if isinstance(saved, ABPanel.RoundSaved):
            self.ab_round_saved(saved)
        else:
            self._ranking_saved(saved)  # type: ignore[arg-type]
        self._prompt.focus()
        self.load_conversations(self.conversation_id)

    def _ranking_saved(self, message: RankingSaved) -> None:
        order = " › ".join(str(index + 1) for index in message.ranked)
        rejected = f", {len(message.rejected)} rejected" if message.rejected else ""
        note = f"Saved the ranking ({order}{rejected}) to {message.path}"
        if message.history_error:
            note += f"; chat history: {message.history_error}"
        text = Text()
        text.append("✓ saved ", style="bold green")
        text.append(note.removeprefix("Saved "))
        self._status.update(text)
        self.notify(note, timeout=6)

    # -- keys -----------------------------------------------------------------------------------
    def action_cancel(self) -> None:
        if self.streaming:
            self.stop_requested = True
            self.workers.cancel_group(self, "chat")
            return
        panel = self.round_panel
        if panel is not None:  # Esc outside the round's panel: stop the answers, else back to the panel
            if panel.phase is RoundPhase.GENERATING:
                panel.action_stop()
            else:
                panel.focus()
            return
        if self.screen.maximized is not None:
            self.screen.minimize()
        self._transcript.focus()

    async def action_new_conversation(self) -> None:
        if self.streaming or self.round_panel is not None:
            return
        self.conversation_id = None
        self.turns = []
        await self._transcript.remove_children()
        self._listing.highlighted = None
        self._prompt.focus()

    def action_options(self) -> None:
        def chosen(settings: ChatSettings | None) -> None:
            if settings is not None:
                self.settings = settings
                self._prompt.placeholder = self._placeholder()
                self._show_status()

        self.app.push_screen(ChatOptions(self.settings, self.models), chosen)

    def last_answer(self) -> str | None:
        if self.streaming and self.answer_text:
            return self.answer_text
        for role, text, _ in reversed(self.turns):
            if role == "assistant":
                return text
        return self.answer_text or None

    def action_copy_answer(self) -> None:
        text = self.last_answer()
        if not text:
            self.notify("No answer to copy yet.", severity="warning")
            return
        self.app.copy_to_clipboard(text)
        self.notify(f"Copied the answer ({len(text)} characters).")

    def focus_prompt(self) -> None:
        self._prompt.focus()
