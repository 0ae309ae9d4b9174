"""Blind A/B against one real tritonserver serving two tiny policies (`policy-sft` and `policy`, two
different untrained shapes): on the command line (`oatui chat --ab`) and in the chat pane (ctrl+g):
both answers at once, a random order revealed after the choice, each choice one export tree with
both model names, the win rate updated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import run_oatui
from oatui.chat.ab import pair_tally, win_tallies
from oatui.data.trees import parse_tree
from oatui.serve import server
from oatui.serve.repository import export_model
from oatui.stages.launcher import free_port
from oatui.workspace import Workspace

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODELS = ("policy-sft", "policy")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A workspace whose detached tritonserver serves two different tiny policies."""
    from oatui.models.tiny import TINY_SHAPE, build_tiny_model

    ws = Workspace.open(tmp_path_factory.mktemp("ab") / "ws")
    export_model("policy", build_tiny_model(ws.models / "tiny-a", TINY_SHAPE), ws.triton_repo, name="policy-sft")
    other = {**TINY_SHAPE, "num_hidden_layers": 2}
    export_model("policy", build_tiny_model(ws.models / "tiny-b", other), ws.triton_repo, name="policy")
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    info = server.start_detached(ws, server.ServerOptions(repo=str(ws.triton_repo), **ports))
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
    assert [(r["model_name"], r["rank"]) for r in replies] == [(shown[0], 1), (shown[1], 0)]
    # Each reply is its model's own answer (same seed, same sampling, asked alone).
    for reply in replies:
        assert reply["text"] == _one_answer(url, reply["model_name"], prompt)
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
