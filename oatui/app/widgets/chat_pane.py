"""The chat pane: streams the served policy's answers into Markdown, keeps conversations in SQLite.

Answers stream in an async worker (``AsyncChatClient`` on the app's event loop); pieces are
gathered and posted as ``TokenReceived`` at most ``FLUSH_INTERVAL`` apart, and a ``MarkdownStream``
coalesces them further, so a fast model never floods the screen. Esc cancels the worker, which
cancels the gRPC call, which makes the server stop generating. Conversations and their messages
go to ``oatui.chat.history`` (``WORKSPACE/state/chats.sqlite``) from worker threads.

Rank mode (ctrl+r): each prompt gets K answers (seeds S, S+1, ...), streamed at the same time
into a :class:`RankPanel`, where the person puts them in order, edits one into a better
demonstration or rejects some. Enter appends the ranking to ``WORKSPACE/data/feedback.trees.jsonl``
(``oatui.chat.feedback``, in a thread) and the conversation goes on from the best answer; only that
answer is kept in the chat history. Esc stops the sampling, or skips a round: nothing is saved.

Blind A/B mode (ctrl+g): each prompt goes to two models at once, their answers shown as A and B in
a random order revealed after the choice (``oatui.app.widgets.ab_panel``, mixed in as ``ABMode``).

A failed answer (the server went away mid-answer, say) leaves one line in the status bar until
the next prompt, with ctrl+t to restart the server.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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
    RankAnswerFinished,
    RankingFailed,
    RankingSaved,
    RankPieceReceived,
    RankSamplingFinished,
    TokenReceived,
)
from oatui.app.widgets.ab_panel import ABMode
from oatui.app.widgets.rank_panel import RankPanel

if TYPE_CHECKING:
    from textual.widgets.markdown import MarkdownStream

    from oatui.chat.history import ChatHistory
    from oatui.chat.ranking import Order
    from oatui.serve.record import ServerInfo

#: Seconds between two batches of streamed text sent to the screen.
FLUSH_INTERVAL = 1 / 20
_DECOUPLED = re.compile(r"decoupled\s*:\s*true", re.IGNORECASE)
#: Seconds the client waits for each piece of an answer before it gives up on the server.
ANSWER_TIMEOUT = 60.0
#: The conversation list shows beside the transcript from this width of the pane (zoomed, or a wide terminal).
CONVERSATIONS_WIDTH = 100
PROMPT_HINT = "Ask the policy (Enter sends · Esc stops · ctrl+o options · ctrl+r rank mode)"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


async def stream_in_batches(client: Any, context: list[tuple[str, str]], settings: ChatSettings,
                            pieces: list[str], emit: Callable[[str], None], **extra: Any) -> None:
    """Stream one answer into ``pieces``; ``emit`` gets the new text at most every ``FLUSH_INTERVAL``
    and whatever is left when the stream ends, however it ends (errors and cancellation propagate)."""
    pending: list[str] = []
    last_flush = 0.0
    try:
        async for piece in client.stream(turns=context, system=settings.system or None, **extra,
                                         **settings.sampling()):
            pieces.append(piece)
            pending.append(piece)
            now = time.monotonic()
            if now - last_flush >= FLUSH_INTERVAL:
                emit("".join(pending))
                pending.clear()
                last_flush = now
    finally:
        if pending:
            emit("".join(pending))


STOPPED_MARK = "— stopped"


def stopped_answer(text: str) -> str:
    """An answer stopped with Esc as the pane shows it: marked, so that it does not look finished.
    The mark is only drawn; the history keeps the text and the state ``cancelled``."""
    return f"{text}\n\n*{STOPPED_MARK}*" if text.strip() else f"*{STOPPED_MARK}*"


async def close_quietly(client: Any) -> None:
    """Close a chat client even while the worker is being cancelled."""
    if client is None:
        return
    try:
        await asyncio.shield(client.close())
    except BaseException:  # noqa: BLE001 - closing a cancelled channel
        pass


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
        #: The last answer's failure (one line), shown until the next prompt or a new server.
        self.failure: str | None = None
        self.rank_mode = False
        self.ranking = False  # a rank round is open (sampling or waiting for the person)
        self.rank_panel: RankPanel | None = None
        self._rank_context: list[tuple[str, str]] = []
        self._rank_settings = self.settings
        self._rank_model_name = self.settings.model
        self._zoomed_for_rank = False
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
        if self.streaming or self.ranking or event.option.id is None:
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
        if self.streaming:
            self._show_status("An answer is still streaming: Esc stops it.")
            return
        if self.ranking:
            self._show_status("Finish the ranking first: Enter saves it, Esc skips it.")
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

    # -- rank mode --------------------------------------------------------------------------------
    def action_toggle_rank(self) -> None:
        if self.ranking:
            self._show_status("Finish the ranking first: Enter saves it, Esc skips it.")
            return
        if self.streaming:
            self._show_status("An answer is still streaming: Esc stops it.")
            return
        if not self.rank_mode and self.ab_models is not None:
            self.leave_ab_mode()  # one mode at a time
        self.rank_mode = not self.rank_mode
        self.set_class(self.rank_mode, "-rank-mode")
        self._prompt.placeholder = self._placeholder()
        screen = self.screen
        if self.rank_mode and screen.maximized is None:
            # Side by side needs the width: the pane takes the screen (ctrl+r or Esc gives it back).
            self._zoomed_for_rank = screen.maximize(self, container=False)
        elif not self.rank_mode and self._zoomed_for_rank and screen.maximized is self:
            screen.minimize()
        if not self.rank_mode:
            self._zoomed_for_rank = False
        self._show_status()
        self._prompt.focus()

    def ranked_model_name(self, model: str) -> str:
        """The name a ranking records for the answers of ``model``: the run it was exported from, when
        the server knows it (the export name says little once it has been replaced), else the name."""
        source = self.server.model_source(model) if self.server is not None else None
        return source.run_id if source is not None and source.run_id else model

    def _placeholder(self) -> str:
        if self.ab_models is not None:
            return self.ab_placeholder()
        if self.rank_mode:
            return (f"Rank mode: ask for {self.settings.rank_count} answers to put in order "
                    "(Enter samples · ctrl+r leaves rank mode)")
        return PROMPT_HINT

    async def _start_rank_round(self, prompt: str) -> None:
        count = self.settings.rank_count
        base = random.randrange(0, 2**31)
        seeds = [base + i for i in range(count)]
        self._rank_context = [(role, text) for role, text, _ in self.turns] + [("prompter", prompt)]
        self._rank_settings = self.settings
        self._rank_model_name = self.ranked_model_name(self.settings.model)
        panel = RankPanel(prompt, seeds, id="rank-panel")
        self.rank_panel = panel
        self.ranking = True
        self.add_class("-ranking")
        self.add_class("-streaming")
        await self._body.mount(panel)
        panel.focus()
        self._show_status()
        self.sample_answers(list(self._rank_context), self.settings, self.server.grpc_url, seeds)  # type: ignore[union-attr]

    @work(exclusive=True, group="chat-rank")
    async def sample_answers(self, context: list[tuple[str, str]], settings: ChatSettings, url: str,
                             seeds: list[int]) -> None:
        """Stream one answer per seed, all at once (one client each: the server decodes them together);
        whatever way it ends, one ``RankSamplingFinished`` is posted. An answer that fails stops the others."""
        state, error = "complete", None
        clients: list[Any] = []
        try:
            from oatui.serve.client import AsyncChatClient, RemoteError, ServerUnavailable

            async def sample(index: int, seed: int) -> None:
                client = AsyncChatClient(url, model=settings.model, timeout=ANSWER_TIMEOUT, retries=2)
                clients.append(client)
                pieces: list[str] = []
                answer_state, answer_error = "complete", None
                try:
                    def emit(text: str) -> None:
                        self.post_message(RankPieceReceived(index, text))

                    await stream_in_batches(client, context, settings, pieces, emit, seed=seed)
                except (ServerUnavailable, RemoteError, ValueError) as failure:
                    answer_state, answer_error = "error", str(failure)
                    raise
                except asyncio.CancelledError:
                    answer_state = "cancelled"
                    raise
                finally:
                    self.post_message(RankAnswerFinished(index, "".join(pieces), answer_state, answer_error))

            tasks = [asyncio.create_task(sample(index, seed)) for index, seed in enumerate(seeds)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            state = "cancelled"
            raise
        except (ServerUnavailable, RemoteError, ValueError) as failure:
            state, error = "error", str(failure)
        except Exception as failure:  # noqa: BLE001 - shown in the pane, never a traceback
            state, error = "error", f"{type(failure).__name__}: {failure}"
        finally:
            self.post_message(RankSamplingFinished(state, error))
            for client in clients:
                await close_quietly(client)

    @on(RankPieceReceived)
    def _rank_piece(self, message: RankPieceReceived) -> None:
        if self.rank_panel is not None and self.rank_panel.is_attached:
            self.rank_panel.add_text(message.index, message.text)

    @on(RankAnswerFinished)
    def _rank_answer_finished(self, message: RankAnswerFinished) -> None:
        if self.rank_panel is not None and self.rank_panel.is_attached:
            self.rank_panel.finish_answer(message.index, message.text, message.state)

    @on(RankSamplingFinished)
    async def _rank_sampling_finished(self, message: RankSamplingFinished) -> None:
        self.remove_class("-streaming")
        panel = self.rank_panel
        if message.state == "complete" and panel is not None:
            panel.sampling_finished("complete")
            self._show_status()
            return
        prompt = panel.prompt if panel is not None else ""
        if message.state == "error":
            self.failure = one_line(message.error or "sampling failed")
            await self._end_rank_round(prompt)
        else:
            await self._end_rank_round(prompt, "Sampling stopped: nothing saved.")

    async def _end_rank_round(self, restore_prompt: str | None = None, notice: str | None = None) -> None:
        """Close the round's panel; the prompt goes back into the input when nothing was saved."""
        self.ranking = False
        self.remove_class("-ranking")
        self.remove_class("-streaming")
        panel, self.rank_panel = self.rank_panel, None
        if panel is not None and panel.is_attached:
            await panel.remove()
        if restore_prompt and not self._prompt.value:
            self._prompt.value = restore_prompt
        self._show_status(notice)
        self._prompt.focus()

    @on(RankPanel.StopRequested)
    def _rank_stop(self, event: RankPanel.StopRequested) -> None:
        event.stop()
        self.workers.cancel_group(self, "chat-rank")

    @on(RankPanel.Skipped)
    async def _rank_skipped(self, event: RankPanel.Skipped) -> None:
        event.stop()
        prompt = self.rank_panel.prompt if self.rank_panel is not None else None
        await self._end_rank_round(prompt, "Skipped: nothing saved.")

    @on(RankPanel.EditRequested)
    def _rank_edit(self, event: RankPanel.EditRequested) -> None:
        from oatui.app.widgets.forms import EditAnswer

        event.stop()
        panel = self.rank_panel

        def edited(text: str | None) -> None:
            if panel is not None and panel.is_attached:
                if text is not None:
                    panel.set_edit(event.index, text)
                panel.focus()

        self.app.push_screen(EditAnswer(event.index + 1, event.text), edited)

    @on(RankPanel.Confirmed)
    def _rank_confirmed(self, event: RankPanel.Confirmed) -> None:
        event.stop()
        panel = self.rank_panel
        if panel is None:
            return
        parent = self.turns[-1][2] if self.turns else None
        self.save_ranking(list(self._rank_context), list(panel.texts), event.order, event.edits, list(panel.seeds),
                          self._rank_settings, self.conversation_id, parent, self._rank_model_name)

    @work(thread=True, exclusive=True, group="chat-rank-save")
    def save_ranking(self, context: list[tuple[str, str]], texts: list[str], order: Order, edits: dict[int, str],
                     seeds: list[int], settings: ChatSettings, conversation_id: int | None,
                     parent: int | None, model_name: str) -> None:
        """Append the ranking to the feedback file (its answers' ``model_name``: ``model_name``), then keep
        the prompt and the best answer in the history."""
        from oatui.chat.feedback import Ranking, append_ranking
        from oatui.chat.ranking import ranked_answers
        from oatui.workspace import Workspace

        feedback = Workspace(self.workspace).feedback_file
        try:
            ranking = Ranking(context=context, answers=ranked_answers(texts, order, edits, seeds),
                              model_name=model_name, system=settings.system or None)
            tree = append_ranking(feedback, ranking)
        except (ValueError, OSError) as error:
            self.post_message(RankingFailed(f"not saved: {one_line(str(error))}"))
            return
        except Exception as error:  # noqa: BLE001 - shown in the panel, never a traceback
            self.post_message(RankingFailed(f"not saved: {type(error).__name__}: {one_line(str(error))}"))
            return
        prompt = context[-1][1]
        best = order.ranked[0]
        best_text = edits.get(best, texts[best])
        turns: list[tuple[str, str, int | None]] = [("prompter", prompt, None), ("assistant", best_text, None)]
        history_error = None
        try:
            history = self.history()
            if conversation_id is None:
                conversation_id = history.new_conversation(prompt, model=settings.model, system=settings.system or None,
                                                           params=settings.sampling()).id
            asked = history.add_message(conversation_id, "prompter", prompt, parent_id=parent)
            answer = history.add_message(
                conversation_id, "assistant", best_text, parent_id=asked.id,
                model=None if best in edits else settings.model,
                params={**settings.sampling(), "seed": seeds[best]})
            turns = [("prompter", prompt, asked.id), ("assistant", best_text, answer.id)]
        except Exception as error:  # noqa: BLE001 - the ranking is saved; the store's problem is shown
            history_error = one_line(str(error))
        self.post_message(RankingSaved(feedback, tree["message_tree_id"], order.ranked, order.rejected, best_text,
                                       conversation_id, turns, history_error))

    @on(RankingFailed)
    def _ranking_failed(self, message: RankingFailed) -> None:
        if self.rank_panel is not None and self.rank_panel.is_attached:
            self.rank_panel.saving_failed(message.error)

    @on(RankingSaved)
    async def _ranking_saved(self, message: RankingSaved) -> None:
        self.conversation_id = message.conversation_id
        self.turns.extend(message.turns)
        await self._end_rank_round()
        transcript = self._transcript
        await transcript.mount_all([self._message_widget(role, text, "complete") for role, text, _ in message.turns])
        transcript.scroll_end(animate=False)
        order = " › ".join(str(index + 1) for index in message.ranked)
        rejected = f", {len(message.rejected)} rejected" if message.rejected else ""
        note = f"Saved the ranking ({order}{rejected}) to {message.path}"
        if message.history_error:
            note += f"; chat history: {message.history_error}"
        self._show_saved(note)
        self.notify(note, timeout=6)
        self.load_conversations(self.conversation_id)

    def _show_saved(self, note: str) -> None:
        text = Text()
        text.append("✓ saved ", style="bold green")
        text.append(note.removeprefix("Saved "))
        self._status.update(text)

    # -- keys -----------------------------------------------------------------------------------
    def action_cancel(self) -> None:
        if self.streaming:
            self.stop_requested = True
            self.workers.cancel_group(self, "chat")
            return
        if self.ranking and self.ab_cancel():
            return
        if self.ranking and self.rank_panel is not None:
            if self.rank_panel.sampling:
                self.rank_panel.action_stop()
            else:
                self.rank_panel.focus()
            return
        if self.screen.maximized is not None:
            self.screen.minimize()
        self._transcript.focus()

    async def action_new_conversation(self) -> None:
        if self.streaming or self.ranking:
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
