"""Blind A/B against one real tritonserver serving two tiny policies (`policy-sft` and `policy`, two
different untrained shapes): on the command line (`oatui chat --ab`) and in the chat pane (ctrl+g):
both answers at once, a random order revealed after the choice, each choice one export tree with
both model names, the win rate updated; Esc stops both answers (a third, slower model streams long
enough to be stopped)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import run_oatui
from oatui.chat.ab import pair_tally, win_tallies
from oatui.data.trees import parse_tree
from oatui.netutil import free_ports
from oatui.serve import server
from oatui.serve.record import ServerOptions
from oatui.serve.repository import export_model
from oatui.workspace import Workspace

from test_app import fake_run
from test_app_chat import SLOW_SHAPE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODELS = ("policy-sft", "policy")
#: The run `policy` is exported from (`policy-sft` comes from a plain folder: its run is unknown).
POLICY_RUN = "rl-20261128-000000-ab01"
#: What each served model's answers are named in the trees.
NAMED = {"policy-sft": "policy-sft", "policy": POLICY_RUN}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A workspace whose detached tritonserver serves two different tiny policies."""
    from oatui.models.tiny import TINY_SHAPE, build_tiny_model

    ws = Workspace.open(tmp_path_factory.mktemp("ab") / "ws")
    export_model("policy", build_tiny_model(ws.models / "tiny-a", TINY_SHAPE), ws.triton_repo, name="policy-sft")
    other = {**TINY_SHAPE, "num_hidden_layers": 2}
    run = fake_run(ws.root, POLICY_RUN, stage="rl", metrics=[{"step": 7, "total_steps": 7, "time": 1.0}])
    export_model("policy", build_tiny_model(run / "final", other), ws.triton_repo, name="policy")
    export_model("policy", build_tiny_model(ws.models / "slow-pythia", SLOW_SHAPE), ws.triton_repo, name="slow")
    ports = dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3)))
    info = server.start_detached(ws, ServerOptions(repo=str(ws.triton_repo), **ports))
    yield ws, ports, info.grpc_url
    server.stop(ws)


def _trees(ws: Workspace) -> list[dict]:
    path = ws.feedback_file
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _one_answer(url: str, model: str, prompt: str) -> str:
    from oatui.serve.client import ChatClient

    with ChatClient(url, model=model) as client:
        return "".join(client.stream(turns=[("prompter", prompt)], seed=3, max_new_tokens=12)).strip()


def test_chat_ab_on_the_command_line_saves_the_choice_and_reveals_the_order(served) -> None:  # noqa: ANN001
    ws, _, url = served
    before = len(_trees(ws))
    prompt = "How do I bake bread?"
    result = run_oatui("chat", "--ab", *MODELS, "--url", url, "--seed", "3", "--max-new-tokens", "12", prompt,
                       workspace=ws.root, input_text="x\nb\n", timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.index("--- A ---") < out.index("--- B ---")
    assert "expected one of: a: A is better" in out  # 'x' is asked again
    trees = _trees(ws)
    assert len(trees) == before + 1
    tree = trees[-1]
    parse_tree(tree)
    shown = (tree["ab"]["A"], tree["ab"]["B"])
    assert sorted(shown) == sorted(MODELS) and tree["ab"]["choice"] == "B"
    assert f"A was {shown[0]}, B was {shown[1]}: you chose B ({shown[1]})" in out
    replies = tree["prompt"]["replies"]
    # Each reply names the run behind its model, where the export recorded one.
    assert [(r["model_name"], r["rank"]) for r in replies] == [(NAMED[shown[0]], 1), (NAMED[shown[1]], 0)]
    assert tree["ab"]["runs"] == {"A": NAMED[shown[0]] if shown[0] == "policy" else None,
                                  "B": NAMED[shown[1]] if shown[1] == "policy" else None}
    # Each reply is its model's own answer (same seed, same sampling, asked alone).
    for reply, model in zip(replies, shown):
        assert reply["text"] == _one_answer(url, model, prompt)
    tally = pair_tally(ws.feedback_file, *MODELS)
    assert tally.wins.get(shown[1]) == 1 and f"so far: {tally.describe()}" in out


@pytest.mark.parametrize(("args", "says"), [
    (["--ab", "policy", "policy"], "--ab policy policy: name two different models"),
    (["--ab", "policy", "policy-sft", "--rank", "2"], "--ab and --rank"),
    (["--ab", "policy", "nosuch"], "nosuch"),
])
def test_chat_ab_bad_input_is_one_line_and_exit_2(served, args: list[str], says: str) -> None:  # noqa: ANN001
    ws, _, url = served
    before = _trees(ws)
    result = run_oatui("chat", *args, "--url", url, "Hi", workspace=ws.root, input_text="a\n", timeout=120)
    assert result.returncode == 2
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and _trees(ws) == before


def test_blind_ab_in_the_chat_pane_random_order_choice_saved_win_rate_updated(served, monkeypatch) -> None:  # noqa: ANN001
    import random
    from dataclasses import replace

    from oatui.app.app import make_app
    from oatui.app.widgets.ab_panel import ABModels, ABPanel
    from oatui.app.widgets.round_panel import RoundPhase
    from oatui.chat import ab
    from oatui.data.rules import rm_groups

    from test_app import RECORDING, Recorder, run, screen_text, until

    ws, ports, _ = served
    before = len(_trees(ws))
    tally_before = pair_tally(ws.feedback_file, *MODELS)
    # A seeded draw whose first two rounds come in different orders (the app draws with SystemRandom).
    def orders(seed: int) -> list[tuple[str, str]]:
        rng = random.Random(seed)
        draws = [ab.shown_order(*MODELS, rng) for _ in range(3)]
        return draws + [ab.shown_order("slow", "policy", rng)]

    seed = next(s for s in range(100) if orders(s)[0] != orders(s)[1])
    expected = orders(seed)
    monkeypatch.setattr(ab, "ORDER_RANDOM", random.Random(seed))
    app = make_app(ws.root, replay=RECORDING, refresh=0.5, server_options=ports)
    recorder = Recorder(app)
    shown: list[tuple[str, list[str]]] = []

    async def drive() -> None:
        async with app.run_test(size=(100, 30), message_hook=recorder.hook) as pilot:
            pane = app.chat_pane
            await until(lambda: pane.server is not None and set(MODELS) <= set(pane.models), pilot, timeout=30,
                        what="the app to find the server and both models")
            await pilot.press("c", "ctrl+g")
            dialog = app.screen
            assert isinstance(dialog, ABModels)  # the two models, policy-sft and policy offered first
            await pilot.press("ctrl+s")
            assert pane.ab_models == MODELS and app.screen.maximized is pane
            assert "Blind A/B" in screen_text(app)  # the footer shows the key
            await until(lambda: pane.ab_tally is not None, pilot, what="the win rate so far")
            assert "blind A/B policy-sft vs policy" in str(pane.query_one("#chat-status").render())
            # Long enough answers that both streams overlap even on a busy machine (the tiny models
            # hold 512 positions: later rounds, with the conversation before them, get shorter ones).
            pane.settings = replace(pane.settings, max_new_tokens=120, ignore_eos=True)
            pane.focus_prompt()

            async def one_round(prompt: str, key: str) -> ABPanel:
                finished = len(recorder.of(ABPanel.AnswersFinished))
                await pilot.press(*prompt, "enter")
                panel = pane.round_panel
                assert isinstance(panel, ABPanel) and app.focused is panel
                await until(lambda: len(recorder.of(ABPanel.AnswersFinished)) > finished, pilot, timeout=120,
                            what="both answers")
                assert recorder.of(ABPanel.AnswersFinished)[-1].state == "complete"
                # Blind: the cards say A and B, the screen names no model beside an answer.
                assert [card.border_title for card in panel.cards] == ["A", "B"]
                shown.append((prompt, list(panel.texts)))
                saved = len(recorder.of(ABPanel.Closed))
                await pilot.press(key, "enter")
                await until(lambda: len(recorder.of(ABPanel.Closed)) > saved and pane.ab_reveal is not None, pilot,
                            timeout=30, what="the round to be saved and revealed")
                return panel

            await one_round("How do I bake bread?", "b")
            pane.settings = replace(pane.settings, max_new_tokens=32)
            # Both answers were generated at once: each had sent text before either one ended.
            messages = recorder.messages
            first_end = next(i for i, msg in enumerate(messages) if isinstance(msg, ABPanel.AnswerFinished))
            started = {msg.index for msg in messages[:first_end] if isinstance(msg, ABPanel.PieceReceived)}
            assert started == {0, 1}
            models = expected[0]
            status = str(pane.query_one("#chat-status").render())
            assert f"A was {models[0]}, B was {models[1]}: you chose B ({models[1]})" in status
            assert pane.round_panel is None and pane.phase is RoundPhase.IDLE
            assert [(role, text) for role, text, _ in pane.turns][-1] == ("assistant", shown[0][1][1])
            first_tally = pane.ab_tally
            assert first_tally is not None
            assert first_tally.wins.get(models[1], 0) == tally_before.wins.get(models[1], 0) + 1
            assert first_tally.headline() in status
            assert any(first_tally.describe() in note for note, _ in recorder.notes)
            pane._show_status()  # the status line is drawn again (the server checked, say): the reveal stays
            assert status == str(pane.query_one("#chat-status").render())

            # Round two, the other order: a tie; the conversation went on from the chosen answer.
            await one_round("And rye bread?", "t")
            status = str(pane.query_one("#chat-status").render())
            assert f"A was {expected[1][0]}, B was {expected[1][1]}: you chose a tie" in status
            assert pane.ab_tally is not None and pane.ab_tally.ties == tally_before.ties + 1

            # Esc once both answers are in skips the round: nothing saved, the prompt comes back.
            closed = len(recorder.of(ABPanel.Closed))
            await pilot.press(*"Skip me", "enter")
            await until(lambda: len(recorder.of(ABPanel.AnswersFinished)) == 3,
                        pilot, timeout=120, what="the third round's answers")
            await pilot.press("escape")
            await until(lambda: len(recorder.of(ABPanel.Closed)) > closed and pane._prompt.value == "Skip me", pilot,
                        what="the skip")
            assert recorder.of(ABPanel.Closed)[-1].saved is None
            assert pane.query_one("#chat-prompt").value == "Skip me"
            await pilot.press("ctrl+g")
            assert pane.ab_models is None and app.screen.maximized is None

            # Another pair, picked in the dialog; Esc while both are generated stops them: nothing saved.
            await pilot.press("ctrl+g")
            dialog = app.screen
            assert isinstance(dialog, ABModels)
            dialog.query_one("#ab-first").value = "slow"  # type: ignore[attr-defined]
            await pilot.press("ctrl+s")
            assert pane.ab_models == ("slow", "policy")
            await until(lambda: pane.ab_tally is not None, pilot, what="the new pair's win rate")
            assert "blind A/B slow vs policy: no rounds yet" in str(pane.query_one("#chat-status").render())
            pane.settings = replace(pane.settings, max_new_tokens=1800)
            pane._prompt.value = ""
            pane.focus_prompt()
            closed, ended = len(recorder.of(ABPanel.Closed)), len(recorder.of(ABPanel.AnswerFinished))
            # Esc as soon as the round starts: both answers are being generated (the slow model's
            # 1800 tokens take seconds; the stream is not waited on, as the screen may lag behind it).
            await pilot.press(*"Tell me more.", "enter", "escape")
            await until(lambda: len(recorder.of(ABPanel.Closed)) > closed and pane._prompt.value == "Tell me more.",
                        pilot, timeout=30, what="the stop")
            stopped = recorder.of(ABPanel.Closed)[-1]
            assert stopped.saved is None and stopped.notice == "Answers stopped: nothing saved."
            assert recorder.of(ABPanel.AnswersFinished)[-1].state == "cancelled"
            ends = {msg.index: msg.state for msg in recorder.of(ABPanel.AnswerFinished)[ended:]}
            assert ends.get(expected[3].index("slow"), "cancelled") == "cancelled"  # it cannot have finished
            assert pane.round_panel is None and pane.phase is RoundPhase.IDLE
            await pilot.press("ctrl+g")

    run(drive())

    trees = _trees(ws)
    assert len(trees) == before + 2
    for tree, (prompt, texts), models, choice in zip(trees[-2:], shown, expected, ("B", "tie")):
        parsed = parse_tree(tree)
        assert {key: tree["ab"][key] for key in ("A", "B", "choice")} == {"A": models[0], "B": models[1], "choice": choice}
        replies = tree["prompt"]["replies"] if choice == "B" else tree["prompt"]["replies"][0]["replies"][0]["replies"]
        assert [(r["text"], r["model_name"]) for r in replies] == list(zip(texts, [NAMED[m] for m in models]))
        if choice == "B":
            assert [r["rank"] for r in replies] == [1, 0] and len(rm_groups(parsed)) == 1
        else:
            assert [r["rank"] for r in replies] == [None, None]
    # The tie's tree holds the first round, answered by the chosen model, as its context.
    second = trees[-1]["prompt"]
    assert second["text"] == "How do I bake bread?"
    assert (second["replies"][0]["text"], second["replies"][0]["model_name"]) == (shown[0][1][1], NAMED[expected[0][1]])
    tally = win_tallies(ws.feedback_file)[("policy", "policy-sft")]
    assert tally.rounds == tally_before.rounds + 2 and tally.ties == tally_before.ties + 1
