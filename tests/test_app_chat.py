"""The chat pane against a real tritonserver serving the tiny SFT policy: a streamed answer, a second
one (from a second, slower streaming model picked in the options) cancelled with Esc while it streams
(the server logs it as cancelled), the conversation kept in SQLite, the answer copied, and the
server stopped and started again with the s key."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from oatui.app import messages as m
from oatui.app.app import make_app
from oatui.app.widgets.forms import ChatOptions
from oatui.chat.history import ChatHistory
from oatui.netutil import free_ports
from oatui.serve import server
from oatui.serve.record import ServerOptions
from oatui.serve.repository import export_model
from oatui.workspace import Workspace

from test_app import RECORDING, Recorder, run, until

# The first test to need `trained` also builds it (a minute on an idle machine, more on a busy one).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


# The tiny policy writes a whole answer in a fraction of a second; Esc needs a stream that lasts.
SLOW_SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "intermediate_size": 1536,
              "max_position_embeddings": 2048, "vocab_size": 2048}


def test_chat_streams_the_served_policy_and_esc_cancels_the_second_answer(trained, workspace: Path) -> None:  # noqa: ANN001
    from oatui.models.tiny import build_tiny_model

    ws = Workspace.open(workspace)
    export_model("policy", trained.sft_model, ws.triton_repo)
    slow = build_tiny_model(ws.models / "slow-pythia", SLOW_SHAPE)
    export_model("policy", slow, ws.triton_repo, name="slow")
    ports = dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3)))
    info = server.start_detached(ws, ServerOptions(repo=str(ws.triton_repo), **ports))
    app = make_app(workspace, replay=RECORDING, refresh=0.5, server_options=ports)
    recorder = Recorder(app)
    try:
        async def chat() -> None:
            async with app.run_test(size=(120, 40), message_hook=recorder.hook) as pilot:
                pane = app.chat_pane
                await until(lambda: pane.server is not None and pane.models == ["policy", "slow"], pilot,
                            what="the app to find the server and both streaming models")
                await pilot.press("c")
                await pilot.press(*"How do I bake bread?", "enter")
                await until(lambda: recorder.of(m.AnswerFinished), pilot, timeout=120, what="the first answer")
                first = recorder.of(m.AnswerFinished)[0]
                assert first.state == "complete" and first.error is None and first.text.strip()
                streamed = "".join(message.text for message in recorder.of(m.TokenReceived))
                assert streamed == first.text
                markdown = pane.query(".chat-assistant").last()
                assert first.text.split()[0] in markdown.source  # type: ignore[attr-defined]

                # A long second answer from the slow model: ignore EOS, many tokens; Esc once text arrives.
                await pilot.press("ctrl+o")
                options = app.screen
                assert isinstance(options, ChatOptions)
                options.query_one("#options-model").value = "slow"
                options.query_one("#options-max-new-tokens").value = "1800"
                options.query_one("#options-ignore-eos").value = True
                await pilot.press("ctrl+s")
                assert pane.settings.model == "slow"
                assert pane.settings.ignore_eos and pane.settings.max_new_tokens == 1800
                pane.focus_prompt()
                before = len(recorder.of(m.TokenReceived))
                await pilot.press(*"Tell me more.", "enter")
                await until(lambda: len(recorder.of(m.TokenReceived)) > before, pilot, timeout=60,
                            what="the second answer to start")
                await pilot.press("escape")
                await until(lambda: len(recorder.of(m.AnswerFinished)) == 2, pilot, timeout=30,
                            what="the cancelled answer")
                assert not pane.streaming and pane.has_class("-streaming") is False
                cancelled = recorder.of(m.AnswerFinished)[-1]
                assert cancelled.state == "cancelled" and cancelled.error is None, (cancelled.state, cancelled.error)
                assert "stopped" in str(pane.query(".chat-assistant").last().border_subtitle)

                await pilot.press("ctrl+y")
                assert app.clipboard == pane.last_answer() == cancelled.text

                # s stops the server (once the question is answered) and starts it again (the pane follows).
                await pilot.press("escape")
                await pilot.press("s")
                await pilot.press("y")
                await until(lambda: recorder.of(m.ServerStopped), pilot, timeout=60, what="the server to stop")
                assert pane.server is None and server.status(ws) is None
                await pilot.press("s")
                await until(lambda: recorder.of(m.ServerStarted), pilot, timeout=120, what="the server to start")
                assert pane.server is not None and server.status(ws) is not None

        run(chat())

        # The server was told: the slow model logs a cancelled request, well before the ~450 tokens its
        # 512-token context leaves for a full answer.
        log = Path(info.log)
        deadline = time.monotonic() + 20
        while "(cancelled)" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.2)
        [line] = [line for line in log.read_text(errors="replace").splitlines() if "(cancelled)" in line]
        assert "oatui policy slow" in line and int(line.split(" generated")[0].rsplit(" ", 1)[1]) < 400

        history = ChatHistory(ws.chat_db)
        [conversation] = history.conversations()
        assert conversation.title == "How do I bake bread?" and conversation.model == "policy"
        messages = history.thread(conversation.id)
        assert [(message.role, message.state) for message in messages] == [
            ("prompter", "complete"), ("assistant", "complete"), ("prompter", "complete"), ("assistant", "cancelled")]
        assert messages[1].model == "policy" and messages[3].model == "slow"
        assert messages[1].params["max_new_tokens"] == 256 and messages[3].params["ignore_eos"] is True
    finally:
        server.stop(ws)

