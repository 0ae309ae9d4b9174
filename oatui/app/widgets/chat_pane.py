"""The chat pane: streams the served policy's answers into Markdown, keeps conversations in SQLite.

Answers stream in an async worker (``AsyncChatClient`` on the app's event loop); pieces are
gathered and posted as ``TokenReceived`` at most ``FLUSH_INTERVAL`` apart, and a ``MarkdownStream``
coalesces them further, so a fast model never floods the screen. Esc cancels the worker, which
cancels the gRPC call, which makes the server stop generating. Conversations and their messages
go to ``oatui.chat.history`` (``WORKSPACE/state/chats.sqlite``) from worker threads.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from pathlib import Path
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
    TokenReceived,
)

if TYPE_CHECKING:
    from textual.widgets.markdown import MarkdownStream

    from oatui.chat.history import ChatHistory
    from oatui.serve.server import ServerInfo

#: Seconds between two batches of streamed text sent to the screen.
FLUSH_INTERVAL = 1 / 20
_DECOUPLED = re.compile(r"decoupled\s*:\s*true", re.IGNORECASE)


def streaming_models(repo: Path) -> list[str]:
    """Models of a Triton repository whose config.pbtxt declares them decoupled (streaming)."""
    found = []
    try:
        folders = sorted(path for path in Path(repo).iterdir() if path.is_dir() and not path.name.startswith("."))
    except OSError:
        return []
    for folder in folders:
        try:
            text = (folder / "config.pbtxt").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        # Comments may mention the word; only a real "decoupled: true" line counts.
        lines = [line.split("#", 1)[0] for line in text.splitlines()]
        if _DECOUPLED.search("\n".join(lines)):
            found.append(folder.name)
    return found


class ChatPane(Vertical):
    """Prompt, transcript and conversation list of the chat with the served policy."""

    ALLOW_MAXIMIZE = True
    BORDER_TITLE = "Chat"
    BINDINGS = [
        Binding("escape", "cancel", "Stop answer / leave prompt"),
        Binding("ctrl+n", "new_conversation", "New chat"),
        Binding("ctrl+o", "options", "Chat options"),
        Binding("ctrl+y", "copy_answer", "Copy answer"),
    ]

    def __init__(self, workspace: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.workspace = Path(workspace)
        self.settings = ChatSettings()
        self.server: ServerInfo | None = None
        self.server_note: str | None = None
        self.models: list[str] = []
        self.conversation_id: int | None = None
        self.turns: list[tuple[str, str, int | None]] = []  # (role, text, message id)
        self.streaming = False
        self.stop_requested = False
        self.answer_text = ""
        self._history: ChatHistory | None = None
        self._stream: MarkdownStream | None = None
        self._answer_view: Markdown | None = None
        # Children are reached by reference: a message may arrive while the app tears them down.
        self._status = Static(id="chat-status")
        self._listing = OptionList(id="chat-conversations")
        self._transcript = VerticalScroll(id="chat-transcript")
        self._prompt = Input(id="chat-prompt", placeholder="Ask the policy (Enter sends · Esc stops · ctrl+o options)")

    def compose(self) -> ComposeResult:
        yield self._status
        with Horizontal(id="chat-body"):
            yield self._listing
            yield self._transcript
        yield self._prompt

    def on_mount(self) -> None:
        self._listing.border_title = "Conversations"
        self._show_status()
        self.load_conversations()
        self.list_models()

    def on_resize(self) -> None:
        self.set_class(self.size.width >= 56, "-wide")

    # -- the store ------------------------------------------------------------------------------
    def history(self) -> ChatHistory:
        if self._history is None:
            from oatui.chat.history import ChatHistory
            from oatui.workspace import Workspace

            self._history = ChatHistory(Workspace(self.workspace).chat_db)
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
        if self.streaming or event.option.id is None:
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
        self.post_message(ModelsListed(streaming_models(self.workspace / "triton")))

    @on(ModelsListed)
    def _models_listed(self, message: ModelsListed) -> None:
        self.models = message.models
        if self.models and self.settings.model not in self.models:
            self.settings = replace(self.settings, model="policy" if "policy" in self.models else self.models[0])
        self._show_status()

    def set_server(self, info: ServerInfo | None, note: str | None = None) -> None:
        self.server = info
        self.server_note = note
        self._show_status()

    def _show_status(self, error: str | None = None) -> None:
        status = self._status
        text = Text()
        if error:
            text.append(error, style="bold red")
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
            text.append("● ", style="green")
            text.append(f"{self.settings.model} @ {self.server.grpc_url}")
            s = self.settings
            text.append(f"  T {s.temperature:g} · top-p {s.top_p:g} · max {s.max_new_tokens}", style="dim")
            if s.system:
                text.append(" · system prompt", style="dim")
        status.update(text)

    # -- sending a prompt -----------------------------------------------------------------------
    @on(Input.Submitted, "#chat-prompt")
    async def _prompt_submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if self.streaming:
            self._show_status("An answer is still streaming: Esc stops it.")
            return
        if self.server is None:
            self._show_status("Server not running: press Esc, then s to start it.")
            return
        event.input.value = ""
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
        pending: list[str] = []
        last_flush = 0.0
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
            client = AsyncChatClient(url, model=settings.model, timeout=60.0, retries=2)
            try:
                async for piece in client.stream(turns=context, system=settings.system or None,
                                                 **settings.sampling()):
                    pieces.append(piece)
                    pending.append(piece)
                    now = time.monotonic()
                    if now - last_flush >= FLUSH_INTERVAL:
                        self.post_message(TokenReceived("".join(pending)))
                        pending.clear()
                        last_flush = now
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
            if pending:
                self.post_message(TokenReceived("".join(pending)))
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
            if client is not None:
                try:
                    await asyncio.shield(client.close())
                except BaseException:  # noqa: BLE001 - closing a cancelled channel
                    pass

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
            elif message.state == "error":
                view.add_class("-error")
                view.border_subtitle = "failed"
                if not message.text:
                    await view.update(f"*{message.error}*")
        self._show_status(message.error if message.state == "error" else None)
        self.load_conversations(self.conversation_id)

    def _message_widget(self, role: str, text: str, state: str) -> Static | Markdown:
        if role == "prompter":
            widget: Static | Markdown = Static(Text(text), classes="chat-message chat-prompter")
        else:
            widget = Markdown(text, classes="chat-message chat-assistant")
            if state == "cancelled":
                widget.add_class("-cancelled")
                widget.border_subtitle = "stopped"
            elif state == "error":
                widget.add_class("-error")
        return widget

    # -- keys -----------------------------------------------------------------------------------
    def action_cancel(self) -> None:
        if self.streaming:
            self.stop_requested = True
            self.workers.cancel_group(self, "chat")
            return
        if self.screen.maximized is not None:
            self.screen.minimize()
        self._transcript.focus()

    async def action_new_conversation(self) -> None:
        if self.streaming:
            return
        self.conversation_id = None
        self.turns = []
        await self._transcript.remove_children()
        self._listing.highlighted = None
        self._prompt.focus()

    def action_options(self) -> None:
        from oatui.app.widgets.forms import ChatOptions

        def chosen(settings: ChatSettings | None) -> None:
            if settings is not None:
                self.settings = settings
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
