"""An answer stopped with Esc is marked as stopped in the chat pane, and again when its conversation
is opened from the history. A stand-in client streams the answer (no server needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from oatui.app import messages as m
from oatui.app.app import make_app
from oatui.app.widgets.chat_pane import STOPPED_MARK
from oatui.chat.history import ChatHistory
from oatui.workspace import Workspace

from test_app import RECORDING, Recorder, run, screen_text, until


class EndlessClient:
    """Streams words until it is cancelled, as a long answer would."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.url = url

    async def stream(self, **kwargs: Any) -> Any:
        for index in range(10_000):
            await asyncio.sleep(0.02)
            yield f"word{index} "

    async def close(self) -> None:
        pass


class ShortClient(EndlessClient):
    async def stream(self, **kwargs: Any) -> Any:
        for piece in ("All ", "done."):
            yield piece


def _chat(workspace: Path, client: type, monkeypatch: pytest.MonkeyPatch, stop: bool) -> tuple[str, str]:
    """Ask one question, stop the answer with Esc when ``stop``; returns the pane's text and the
    same conversation's text after opening it again from the history."""
    import oatui.serve.client

    monkeypatch.setattr(oatui.serve.client, "AsyncChatClient", client)
    app = make_app(workspace, replay=RECORDING, refresh=3600)
    recorder = Recorder(app)
    shown: dict[str, str] = {}

    async def drive() -> None:
        async with app.run_test(size=(120, 40), message_hook=recorder.hook) as pilot:
            pane = app.chat_pane
            await until(lambda: recorder.of(m.ServerChecked), pilot, what="the server check")
            pane.set_server(SimpleNamespace(grpc_url="127.0.0.1:9", models=("policy",), pid=1, served_label=str,
                                            supervisor_pid=None))
            await pilot.press("c")
            await pilot.press(*"hello", "enter")
            if stop:
                await until(lambda: "word3" in pane.answer_text, pilot, what="the answer streaming")
                await pilot.press("escape")
            await until(lambda: recorder.of(m.AnswerFinished), pilot, what="the end of the answer")
            await pilot.pause(0.3)
            shown["pane"] = screen_text(app)
            conversation = pane.conversation_id
            assert conversation is not None
            await pilot.press("ctrl+n")
            await until(lambda: pane.conversation_id is None, pilot, what="a new conversation")
            pane.open_conversation(conversation)
            await until(lambda: pane.conversation_id == conversation and len(pane.query(".chat-assistant")) == 1,
                        pilot, what="the conversation opened again")
            await pilot.pause(0.3)
            shown["history"] = screen_text(app)

    run(drive())
    return shown["pane"], shown["history"]


def test_an_answer_stopped_with_esc_is_marked_in_the_pane_and_the_history(workspace: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pane, reopened = _chat(workspace, EndlessClient, monkeypatch, stop=True)
    assert STOPPED_MARK in pane
    assert STOPPED_MARK in reopened
    history = ChatHistory(Workspace(workspace).chat_db)
    [conversation] = history.conversations()
    answer = history.messages(conversation.id)[-1]
    # The mark is drawn, not stored: the history keeps the text and says how it ended.
    assert answer.role == "assistant" and answer.state == "cancelled"
    assert answer.text.startswith("word0 ") and STOPPED_MARK not in answer.text


def test_a_finished_answer_is_not_marked(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pane, reopened = _chat(workspace, ShortClient, monkeypatch, stop=False)
    assert "All done." in pane and "All done." in reopened
    assert STOPPED_MARK not in pane and STOPPED_MARK not in reopened
