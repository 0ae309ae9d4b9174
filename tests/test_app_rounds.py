"""Rank mode's and blind A/B's rounds in the chat pane, driven by stand-in clients (no server
needed): saved, stopped with Esc, failed. The served tests (test_app_served, test_ab_served) run
the same rounds against a real tritonserver."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from oatui.app import messages as m
from oatui.app.app import make_app
from oatui.app.widgets.ab_panel import ABModels, ABPanel
from oatui.app.widgets.rank_panel import RankPanel
from oatui.app.widgets.round_panel import RoundPhase
from oatui.serve.client import ServerUnavailable
from oatui.workspace import Workspace

from test_app import RECORDING, Recorder, run, screen_text, until


class WordsClient:
    """Answers with a few words naming its model and seed."""

    def __init__(self, url: str, model: str = "policy", **kwargs: Any) -> None:
        self.model = model

    async def stream(self, seed: int = 0, **kwargs: Any) -> Any:
        for piece in (f"{self.model} ", f"answer {seed % 1000}", "."):
            await asyncio.sleep(0.01)
            yield piece

    async def close(self) -> None:
        pass


class EndlessClient(WordsClient):
    async def stream(self, **kwargs: Any) -> Any:
        for index in range(10_000):
            await asyncio.sleep(0.02)
            yield f"word{index} "


class FailingClient(WordsClient):
    async def stream(self, **kwargs: Any) -> Any:
        yield "half an "
        raise ServerUnavailable("the server went away")


def _use(monkeypatch: pytest.MonkeyPatch, client: type) -> None:
    import oatui.serve.client

    monkeypatch.setattr(oatui.serve.client, "AsyncChatClient", client)


def _app(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Recorder]:
    _use(monkeypatch, WordsClient)
    app = make_app(workspace, replay=RECORDING, refresh=3600)
    return app, Recorder(app)


async def _chat_with_a_server(app: Any, recorder: Recorder, pilot: Any) -> Any:
    """The chat pane, focused, its server a stand-in (the stand-in clients answer)."""
    pane = app.chat_pane
    await until(lambda: recorder.of(m.ServerChecked), pilot, what="the server check")
    pane.set_server(SimpleNamespace(grpc_url="127.0.0.1:9", models=("policy", "policy-sft"), pid=1,
                                    served_label=str, supervisor_pid=None))
    await pilot.press("c")
    return pane


def test_a_rank_round_is_saved_stopped_or_fails_in_its_own_panel(workspace: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    app, recorder = _app(workspace, monkeypatch)

    async def drive() -> None:
        async with app.run_test(size=(120, 40), message_hook=recorder.hook) as pilot:
            pane = await _chat_with_a_server(app, recorder, pilot)
            await pilot.press("ctrl+r")
            assert pane.rank_mode and pane.phase is RoundPhase.IDLE
            await pilot.press(*"Bread?", "enter")
            panel = pane.round_panel
            assert isinstance(panel, RankPanel) and app.focused is panel
            await until(lambda: recorder.of(m.RankSamplingFinished), pilot, what="three answers")
            assert recorder.of(m.RankSamplingFinished)[0].state == "complete"
            assert pane.phase is RoundPhase.RANKING and not pane.has_class("-streaming")
            assert panel.texts == [f"policy answer {seed % 1000}." for seed in panel.seeds]
            await pilot.press("3", "enter")
            await until(lambda: recorder.of(m.RankingSaved), pilot, what="the ranking")
            await until(lambda: pane.round_panel is None, pilot, what="the round to close")
            assert pane.phase is RoundPhase.IDLE and not pane.has_class("-ranking")
            assert [(role, text) for role, text, _ in pane.turns] == [("prompter", "Bread?"),
                                                                      ("assistant", panel.texts[2])]
            assert "saved" in str(pane.query_one("#chat-status").render())

            # Esc while the answers stream: nothing saved, the prompt comes back.
            _use(monkeypatch, EndlessClient)
            await pilot.press(*"And rye?", "enter")
            await until(lambda: recorder.of(m.RankPieceReceived) and pane.phase is RoundPhase.GENERATING
                        and "word" in "".join(pane.round_panel.texts), pilot, what="the answers streaming")
            await pilot.press("escape")
            await until(lambda: len(recorder.of(m.RankSamplingFinished)) == 2 and pane.round_panel is None, pilot,
                        what="the stop")
            assert recorder.of(m.RankSamplingFinished)[1].state == "cancelled"
            assert pane.query_one("#chat-prompt").value == "And rye?"
            assert "nothing saved" in str(pane.query_one("#chat-status").render())

            # A failed answer ends the round with one line in the status bar.
            _use(monkeypatch, FailingClient)
            await pilot.press("enter")
            await until(lambda: len(recorder.of(m.RankSamplingFinished)) == 3 and pane.round_panel is None, pilot,
                        what="the failure")
            assert recorder.of(m.RankSamplingFinished)[2].state == "error"
            assert pane.failure == "the server went away" and pane.phase is RoundPhase.IDLE
            assert "the server went away" in str(pane.query_one("#chat-status").render())
            assert pane.query_one("#chat-prompt").value == "And rye?"

    run(drive())
    lines = Workspace.open(workspace).feedback_file.read_text().splitlines()
    assert len(lines) == 1
    replies = json.loads(lines[0])["prompt"]["replies"]
    assert replies[0]["rank"] == 0 and {reply["model_name"] for reply in replies} == {"policy"}


def test_an_ab_round_is_saved_and_revealed_or_skipped(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, recorder = _app(workspace, monkeypatch)

    async def drive() -> None:
        async with app.run_test(size=(120, 40), message_hook=recorder.hook) as pilot:
            pane = await _chat_with_a_server(app, recorder, pilot)
            pane.models = ["policy", "policy-sft"]
            await pilot.press("ctrl+g")
            assert isinstance(app.screen, ABModels)
            await pilot.press("ctrl+s")
            assert pane.ab_models == ("policy-sft", "policy")
            await pilot.press(*"Bread?", "enter")
            panel = pane.round_panel
            assert isinstance(panel, ABPanel) and app.focused is panel
            await until(lambda: recorder.of(ABPanel.AnswersFinished), pilot, what="both answers")
            assert recorder.of(ABPanel.AnswersFinished)[0].state == "complete"
            assert [text.split()[0] for text in panel.texts] == list(panel.models)
            await pilot.press("enter")  # no choice yet
            assert "choose first" in panel.note and pane.phase is RoundPhase.RANKING
            await pilot.press("b", "enter")
            await until(lambda: pane.round_panel is None and pane.ab_reveal is not None, pilot, what="the reveal")
            status = str(pane.query_one("#chat-status").render())
            assert f"A was {panel.models[0]}, B was {panel.models[1]}: you chose B ({panel.models[1]})" in status
            assert pane.turns[-1][:2] == ("assistant", panel.texts[1])

            await pilot.press(*"Skip me", "enter")
            await until(lambda: len(recorder.of(ABPanel.AnswersFinished)) == 2, pilot, what="the answers")
            await pilot.pause(0.05)
            await pilot.press("escape")
            await until(lambda: pane.round_panel is None, pilot, what="the skip")
            closed = recorder.of(ABPanel.Closed)[-1]
            assert closed.saved is None and closed.notice == "Skipped: nothing saved."
            assert pane.query_one("#chat-prompt").value == "Skip me" and "Skipped" in screen_text(app)

    run(drive())
    lines = Workspace.open(workspace).feedback_file.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["ab"]["choice"] == "B"
