"""The app against one tritonserver serving the tiny SFT policy (and a slower model): rank mode
(three streamed answers put in order and saved as an export tree; an edit, a rejection, Esc while
sampling), two apps on one workspace chatting at once, and the server killed while an answer
streams (one line in the pane, then ctrl+t restarts it)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from dataclasses import replace
from typing import Any

import pytest

from helpers import run_oatui
from oatui.app import messages as m
from oatui.app.app import make_app
from oatui.app.widgets.forms import ChatOptions, EditAnswer
from oatui.app.widgets.rank_panel import RankPanel
from oatui.app.widgets.round_panel import RoundPhase
from oatui.chat.history import ChatHistory
from oatui.data.rules import compute_stats, sft_conversations
from oatui.data.trees import parse_tree
from oatui.netutil import free_ports
from oatui.serve import server
from oatui.serve.record import ServerOptions
from oatui.serve.repository import export_model
from oatui.workspace import Workspace

from test_app import RECORDING, Recorder, live_run, run, screen_text, sleeper, until  # noqa: F401 - a fixture
from test_app_chat import SLOW_SHAPE

# The first test to need `trained` also builds it (a minute on an idle machine, more on a busy one).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

TOKENS = 24


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory: pytest.TempPathFactory) -> Any:  # noqa: ANN001
    """A workspace whose detached tritonserver serves the tiny SFT policy and a slower model."""
    from oatui.models.tiny import build_tiny_model

    ws = Workspace.open(tmp_path_factory.mktemp("served") / "ws")
    export_model("policy", trained.sft_model, ws.triton_repo)
    export_model("policy", build_tiny_model(ws.models / "slow-pythia", SLOW_SHAPE), ws.triton_repo, name="slow")
    ports = dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3)))
    server.start_detached(ws, ServerOptions(repo=str(ws.triton_repo), **ports))
    yield ws, ports
    server.stop(ws)


def _app(ws: Workspace, ports: dict[str, int]) -> Any:
    return make_app(ws.root, replay=RECORDING, refresh=0.5, server_options=ports)


def _feedback_lines(ws: Workspace) -> list[str]:
    path = ws.feedback_file
    return path.read_text().splitlines() if path.exists() else []


async def _ready(app: Any, pilot: Any) -> None:
    await until(lambda: app.chat_pane.server is not None and "policy" in app.chat_pane.models, pilot, timeout=30,
                what="the app to find the server")


def test_rank_mode_ranks_three_streamed_answers_into_one_export_tree(served, trained) -> None:  # noqa: ANN001
    ws, ports = served
    before = _feedback_lines(ws)
    app = _app(ws, ports)
    recorder = Recorder(app)
    prompt = "How do I get started with baking bread?"
    answers: list[str] = []
    seeds: list[int] = []

    async def drive() -> None:
        async with app.run_test(size=(120, 40), message_hook=recorder.hook) as pilot:
            pane = app.chat_pane
            await _ready(app, pilot)
            await pilot.press("c", "ctrl+r")
            assert pane.rank_mode and app.screen.maximized is pane  # ranking takes the width
            assert "rank mode: 3 answers" in screen_text(app)
            # K and the answer length come from the options form.
            await pilot.press("ctrl+o")
            options = app.screen
            assert isinstance(options, ChatOptions)
            assert options.query_one("#options-rank-count").value == "3"
            options.query_one("#options-max-new-tokens").value = str(TOKENS)
            await pilot.press("ctrl+s")
            assert pane.settings.rank_count == 3 and pane.settings.max_new_tokens == TOKENS
            pane.focus_prompt()
            await pilot.press(*prompt, "enter")
            panel = pane.round_panel
            assert isinstance(panel, RankPanel) and app.focused is panel
            await until(lambda: recorder.of(m.RankSamplingFinished), pilot, timeout=120, what="three answers")
            assert recorder.of(m.RankSamplingFinished)[0].state == "complete"
            finished = sorted(recorder.of(m.RankAnswerFinished), key=lambda message: message.index)
            assert [(message.index, message.state) for message in finished] == [(0, "complete"), (1, "complete"),
                                                                               (2, "complete")]
            for message in finished:  # streamed: the pieces make the answer
                pieces = "".join(p.text for p in recorder.of(m.RankPieceReceived) if p.index == message.index)
                assert pieces == message.text and message.text.strip()
            assert len(set(panel.seeds)) == 3
            assert panel.has_class("-side-by-side") and all(card.display for card in panel.cards)
            answers[:] = panel.texts
            seeds[:] = panel.seeds
            for answer in answers:  # side by side: the start of each answer is on the screen
                assert answer.split()[0] in screen_text(app)
            await pilot.press("2", "1", "3")
            assert panel.order == [1, 0, 2] and panel.rejected == []
            assert "Best first: 2 › 1 › 3" in screen_text(app)
            await pilot.press("enter")
            await until(lambda: recorder.of(m.RankingSaved), pilot, timeout=30, what="the ranking to be saved")
            saved = recorder.of(m.RankingSaved)[0]
            assert saved.path == ws.feedback_file and saved.ranked == (1, 0, 2)
            await pilot.pause(0.1)
            status = str(pane.query_one("#chat-status").render())
            assert "saved" in status and "feedback.trees.jsonl" in status
            assert pane.round_panel is None and pane.phase is RoundPhase.IDLE
            # The conversation goes on from the best answer.
            assert [(role, text) for role, text, _ in pane.turns] == [("prompter", prompt), ("assistant", answers[1])]
            await pilot.press("ctrl+r")
            assert not pane.rank_mode
            await pilot.press(*"Thanks, and then?", "enter")
            await until(lambda: recorder.of(m.AnswerFinished), pilot, timeout=60, what="the next answer")
            assert recorder.of(m.AnswerFinished)[0].state == "complete"

    run(drive())

    lines = _feedback_lines(ws)
    assert lines[: len(before)] == before and len(lines) == len(before) + 1
    tree = json.loads(lines[-1])
    parse_tree(tree)  # the export schema
    replies = tree["prompt"]["replies"]
    assert [(reply["text"], reply["rank"]) for reply in replies] == [(answers[1], 0), (answers[0], 1), (answers[2], 2)]
    # The answers are named for the run the served policy was exported from, not the export's name.
    assert tree["prompt"]["text"] == prompt and all(reply["model_name"] == trained.sft_run for reply in replies)
    single = ws.root / "one-ranking.jsonl"
    single.write_text(lines[-1] + "\n")
    stats = json.loads(run_oatui("data", "stats", "--trees", str(single), "--json", check=True).stdout)
    assert (stats["trees"], stats["rm_groups"], stats["rm_pairs"]) == (1, 1, 3)

    history = ChatHistory(ws.chat_db)
    conversation = next(c for c in history.conversations() if c.title == prompt)
    thread = history.thread(conversation.id)
    assert [(message.role, message.text) for message in thread][:2] == [("prompter", prompt), ("assistant", answers[1])]
    assert [message.role for message in thread] == ["prompter", "assistant", "prompter", "assistant"]
    assert thread[1].params["seed"] == seeds[1] and thread[1].model == "policy"


def test_rank_mode_at_80x24_edit_reject_and_esc(served) -> None:  # noqa: ANN001
    ws, ports = served
    before = _feedback_lines(ws)
    app = _app(ws, ports)
    recorder = Recorder(app)
    prompt = "Can you give me some tips for learning chess?"
    better = "Learn how each piece moves, then play many short games and review them."
    answers: list[str] = []

    async def drive() -> None:
        async with app.run_test(size=(80, 24), message_hook=recorder.hook) as pilot:
            pane = app.chat_pane
            await _ready(app, pilot)
            await pilot.press("c", "ctrl+r")
            assert pane.rank_mode and app.screen.maximized is pane
            # Esc while the answers stream stops the round: nothing saved, the prompt is back.
            pane.settings = replace(pane.settings, max_new_tokens=1500, ignore_eos=True, model="slow")
            await pilot.press(*prompt, "enter")
            await until(lambda: recorder.of(m.RankPieceReceived), pilot, timeout=60, what="the first answer")
            await pilot.press("escape")
            await until(lambda: recorder.of(m.RankSamplingFinished), pilot, timeout=30, what="the stop")
            assert recorder.of(m.RankSamplingFinished)[0].state == "cancelled"
            assert recorder.of(m.RankAnswerFinished)[0].state == "cancelled"
            assert pane.round_panel is None and pane.phase is RoundPhase.IDLE and pane.rank_mode
            assert pane.query_one("#chat-prompt").value == prompt
            assert "nothing saved" in str(pane.query_one("#chat-status").render())

            pane.settings = replace(pane.settings, max_new_tokens=TOKENS, ignore_eos=False, model="policy")
            await pilot.press("enter")
            await until(lambda: len(recorder.of(m.RankSamplingFinished)) == 2, pilot, timeout=120,
                        what="three answers")
            assert recorder.of(m.RankSamplingFinished)[1].state == "complete"
            panel = pane.round_panel
            assert panel is not None and app.focused is panel
            # 80 columns: one answer at a time, under tabs.
            assert panel.has_class("-tabs") and [card.display for card in panel.cards] == [True, False, False]
            assert "Best first: 1 › 2 › 3" in screen_text(app)
            await pilot.press("right", "x")  # answer 2 is unusable
            assert panel.selected == 1 and panel.rejected == [1] and panel.order == [0, 2]
            assert [card.display for card in panel.cards] == [False, True, False]
            await pilot.press("right", "up")  # answer 3 is better than 1
            assert panel.order == [2, 0]
            await pilot.press("e")
            editor = app.screen
            assert isinstance(editor, EditAnswer)
            assert editor.query_one("#edit-text").text == panel.texts[2]
            editor.query_one("#edit-text").text = better
            await pilot.press("ctrl+s")
            assert panel.edits == {2: better} and app.focused is panel
            text = screen_text(app)
            assert "Best first: 3✎ › 1" in text and "rejected: 2" in text
            answers[:] = panel.texts
            await pilot.press("enter")
            await until(lambda: recorder.of(m.RankingSaved), pilot, timeout=30, what="the ranking to be saved")
            assert pane.turns[-1][:2] == ("assistant", better)

    run(drive())

    lines = _feedback_lines(ws)
    assert lines[: len(before)] == before and len(lines) == len(before) + 1
    tree = parse_tree(json.loads(lines[-1]))
    replies = json.loads(lines[-1])["prompt"]["replies"]
    assert [(reply["text"], reply["rank"], reply["review_result"]) for reply in replies] == [
        (better, 0, True), (answers[2], 1, True), (answers[0], 2, True), (answers[1], None, False)]
    assert replies[0]["model_name"] is None and replies[0]["labels"] == {"edited": 1.0}
    stats = compute_stats([tree])
    assert (stats.rm_groups, stats.rm_pairs) == (1, 3)  # the rejected answer is dropped
    assert better in [conversation.turns[-1].text for conversation in sft_conversations(tree)]
    history = ChatHistory(ws.chat_db)
    conversation = next(c for c in history.conversations() if c.title == prompt)
    thread = history.thread(conversation.id)
    assert [(message.role, message.text, message.model) for message in thread] == [
        ("prompter", prompt, None), ("assistant", better, None)]


def test_two_apps_on_one_workspace_see_the_same_runs_and_chat_at_once(served, sleeper) -> None:  # noqa: ANN001
    ws, ports = served
    live_run(ws.root, "sft-shared", sleeper)
    first, second = _app(ws, ports), _app(ws, ports)
    rounds = 3

    async def chat(app: Any, pilot: Any, name: str) -> None:
        pane = app.chat_pane
        pane.settings = replace(pane.settings, max_new_tokens=TOKENS)
        await pilot.press("c")
        for number in range(rounds):
            await pilot.press(*f"{name} asks {number}", "enter")
            await until(lambda: not pane.streaming and len(pane.turns) == 2 * (number + 1), pilot, timeout=60,
                        what=f"{name}'s answer {number}")

    async def drive() -> None:
        async with first.run_test(size=(120, 40)) as one, second.run_test(size=(120, 40)) as two:
            await _ready(first, one)
            await _ready(second, two)
            await until(lambda: "sft-shared" in first.run_list.runs and "sft-shared" in second.run_list.runs, one,
                        what="the shared run in both apps")
            assert first.run_list.runs["sft-shared"].state == second.run_list.runs["sft-shared"].state == "running"
            await asyncio.gather(chat(first, one, "first"), chat(second, two, "second"))
            # A run that appears now shows in both.
            live_run(ws.root, "rm-later", sleeper, stage="rm")
            await until(lambda: "rm-later" in first.run_list.runs and "rm-later" in second.run_list.runs, two,
                        what="the new run in both apps")

    run(drive())

    connection = sqlite3.connect(ws.chat_db)
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    connection.close()
    history = ChatHistory(ws.chat_db)
    for name in ("first", "second"):
        conversation = next(c for c in history.conversations() if c.title == f"{name} asks 0")
        messages = history.messages(conversation.id)
        assert conversation.message_count == len(messages) == 2 * rounds
        assert [message.text for message in messages if message.role == "prompter"] == [
            f"{name} asks {number}" for number in range(rounds)]
        assert all(message.state == "complete" for message in messages)
        assert [message.role for message in messages] == ["prompter", "assistant"] * rounds


def test_server_killed_mid_answer_shows_one_line_and_ctrl_t_restarts_it(served) -> None:  # noqa: ANN001
    ws, ports = served
    app = _app(ws, ports)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=(120, 40), message_hook=recorder.hook) as pilot:
            pane = app.chat_pane
            await _ready(app, pilot)
            pane.settings = replace(pane.settings, model="slow", max_new_tokens=1500, ignore_eos=True)
            await pilot.press("c", *"Tell me a very long story.", "enter")
            await until(lambda: recorder.of(m.TokenReceived), pilot, timeout=60, what="the answer to start")
            info = server.status(ws)
            assert info is not None
            os.kill(info.pid, signal.SIGKILL)
            killed = time.monotonic()
            await until(lambda: recorder.of(m.AnswerFinished), pilot, timeout=70, what="the broken answer")
            assert time.monotonic() - killed < 60  # the client timeout at most
            broken = recorder.of(m.AnswerFinished)[0]
            assert broken.state == "error" and broken.error and "\n" not in broken.error
            await until(lambda: pane.server is None, pilot, timeout=30, what="the app to see the server gone")
            await pilot.pause(0.1)
            status = str(pane.query_one("#chat-status").render())
            assert status.startswith("✗ ") and "ctrl+t restarts it" in status and "\n" not in status
            assert "Traceback" not in screen_text(app)
            assert pane.query(".chat-assistant").last().has_class("-error")

            await pilot.press("ctrl+t")  # from the prompt
            await until(lambda: recorder.of(m.ServerStarted), pilot, timeout=120, what="the restart")
            assert pane.server is not None and pane.failure is None
            assert "✗" not in str(pane.query_one("#chat-status").render())
            pane.settings = replace(pane.settings, model="policy", max_new_tokens=TOKENS, ignore_eos=False)
            await pilot.press(*"Are you back?", "enter")
            await until(lambda: len(recorder.of(m.AnswerFinished)) == 2, pilot, timeout=60, what="a new answer")
            assert recorder.of(m.AnswerFinished)[1].state == "complete"

    run(drive())
    assert server.status(ws) is not None
