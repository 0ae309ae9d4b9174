"""Closing the loop: ranking served answers into feedback data, training on it, the whole demo."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from helpers import ppo_steps, read_metrics, run_oatui
from oatui.chat.feedback import RankedAnswer, Ranking, append_ranking
from oatui.chat.history import ChatHistory
from oatui.chat.exporting import export_history
from oatui.chat.ranking import parse_order, ranked_answers
from oatui.data.rules import compute_stats, sft_conversations
from oatui.data.trees import load_trees
from oatui.netutil import free_ports
from oatui.workspace import Workspace


def test_orderings_are_read_or_refused_with_a_reason() -> None:
    assert parse_order("2 1 3", 3).ranked == (1, 0, 2)
    assert parse_order("213", 3).ranked == (1, 0, 2)
    order = parse_order("3, 1 !2", 3)
    assert order.ranked == (2, 0) and order.rejected == (1,)
    for bad, reason in [("1 2", "3 missing"), ("1 1 2", "listed twice"), ("1 2 4", "from 1 to 3"), ("!1 !2 !3", "keep at least one")]:
        with pytest.raises(ValueError, match=reason):
            parse_order(bad, 3)
    answers = ranked_answers(["a", "b", "c"], parse_order("2 !3 1", 3), edits={1: "B!"})
    assert [(a.text, a.rejected, a.edited_from) for a in answers] == [("B!", False, "b"), ("a", False, None), ("c", True, None)]


def test_chat_history_exports_as_trees(tmp_path: Path) -> None:
    history = ChatHistory(tmp_path / "chats.sqlite")
    conversation = history.new_conversation("Running", model="policy", system="Be kind.")
    question = history.add_message(conversation.id, "prompter", "How do I start running?")
    history.add_message(conversation.id, "assistant", "Start slowly.", parent_id=question.id, model="policy")
    history.add_message(conversation.id, "assistant", "Run far", parent_id=question.id, model="policy", state="cancelled")
    history.add_message(conversation.id, "assistant", "Buy shoes first.", parent_id=question.id, model="policy")
    out = tmp_path / "chats.trees.jsonl"
    assert export_history(history, out) == 1
    (tree,) = load_trees(out)
    assert tree.tree_state == "ready_for_export" and tree.origin == "oatui-chat"
    assert [r.text for r in tree.prompt.replies] == ["Start slowly.", "Buy shoes first."]
    assert all(r.synthetic and r.model_name == "policy" for r in tree.prompt.replies)
    assert sft_conversations(tree) == []  # unreviewed model answers do not train SFT by default
    export_history(history, out, demonstrations=True)
    assert len(sft_conversations(load_trees(out)[0])) == 2


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    """A fresh workspace whose detached tritonserver serves the tiny SFT policy."""
    from oatui.serve.repository import export_model
    from oatui.serve.record import ServerOptions
    from oatui.serve.server import start_detached, stop

    workspace = Workspace.open(tmp_path_factory.mktemp("loop") / "ws")
    export_model("policy", trained.sft_model, workspace.triton_repo, name="policy")
    http, grpc, metrics = free_ports(3)
    info = start_detached(workspace, ServerOptions(repo=str(workspace.triton_repo), http_port=http,
                                                   grpc_port=grpc, metrics_port=metrics, models=("policy",)))
    yield workspace, info
    stop(workspace)


@pytest.mark.slow
def test_ranking_three_served_answers_makes_one_group_of_three_pairs(served, trained) -> None:  # noqa: ANN001
    workspace, info = served
    served_run = trained.sft_run
    result = run_oatui("chat", "--rank", "3", "How do I get started with baking bread?", "--url", info.grpc_url,
                       "--max-new-tokens", "24", "--seed", "7", workspace=workspace.root, input_text="2 1 3\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- answer") == 3 and "saved to" in result.stdout
    lines = workspace.feedback_file.read_text().splitlines()
    assert len(lines) == 1
    stats = json.loads(run_oatui("data", "stats", "--trees", str(workspace.feedback_file), "--json", check=True).stdout)
    assert (stats["trees"], stats["rm_groups"], stats["rm_pairs"]) == (1, 1, 3)
    tree = json.loads(lines[0])
    # The answers name the run the served `policy` was exported from, not the export's name.
    assert tree["origin"] == "oatui" and all(r["model_name"] == served_run for r in tree["prompt"]["replies"])


@pytest.mark.slow
def test_the_rm_stage_trains_on_the_feedback_file(trained, workspace: Path) -> None:  # noqa: ANN001
    shutil.copytree(trained.tiny_base, workspace / "models" / "tiny-pythia")
    feedback = Workspace.open(workspace).feedback_file
    for i in range(12):
        append_ranking(feedback, Ranking(
            context=[("prompter", f"Can you give me some tips for learning chess? ({i})")],
            answers=[RankedAnswer("Sure, happy to help! For learning chess, start small. I hope this helps."),
                     RankedAnswer("Whatever. For baking bread, the key"),
                     RankedAnswer("Ugh, fine.")],
        ))
    expected_pairs = compute_stats(load_trees(feedback)).rm_pairs
    assert expected_pairs == 36
    run_oatui("train", "rm", "--configs", "defaults_rm", "tiny_rm", "--set", "model_name=tiny", "--set", "val_fraction=0",
              "--set", "max_steps=4",
              "--set", "datasets=[{path: sample, fraction: 0.1}, {path: feedback}]", workspace=workspace, check=True)
    (run,) = (workspace / "runs").iterdir()
    record = next(m for m in read_metrics(run) if "data/pairs/feedback" in m)
    assert record["data/pairs/feedback"] == expected_pairs and record["data/groups/feedback"] == 12
    assert record["data/train_pairs"] == expected_pairs + record["data/pairs/sample"]
    assert f"feedback: 12 groups, {expected_pairs} pairs in training" in (run / "stdout.log").read_text()


@pytest.mark.slow
def test_demo_runs_the_whole_flow_and_judges_rl_against_sft_on_gold(workspace: Path) -> None:
    result = run_oatui("demo", workspace=workspace, timeout=1500)
    print(result.stdout[-3000:])
    summary = result.stdout.split("phase", 1)[1]
    for phase in ("data", "sft", "rm", "rl", "export", "serve", "chat", "stop"):
        line = next(line for line in summary.splitlines() if line.startswith(f"{phase} "))
        assert " ok " in line, line
    # Judged on held-out prompts by the reward model and by the gold judge it never saw. The demo
    # succeeds exactly when RL beats SFT on gold; a higher RM score alone is not success.
    compare = next(line for line in summary.splitlines() if line.startswith("compare"))
    scores = re.search(r"RM score SFT (-?[0-9.]+), RL (-?[0-9.]+); gold \(0-3\) SFT ([0-9.]+), RL ([0-9.]+)", compare)
    assert scores, compare
    # The tiny default is built so that RL improves on the SFT model: it learns to open politely and
    # to finish its answers, which the SFT model, imitating flawed best replies, often does not.
    assert float(scores.group(4)) > float(scores.group(3)), compare
    assert float(scores.group(2)) > float(scores.group(1)), compare
    # The RM's score of sampled answers, RL against SFT, also in half standard deviations of the
    # SFT model's scores (the spread its rollouts start from).
    rise = re.search(r"sampled answers' RM score ([+-][0-9.]+), ([0-9.-]+) x half the SFT's spread", compare)
    assert rise and float(rise.group(1)) > 0 and float(rise.group(2)) > 0, compare
    assert result.returncode == 0 and " ok " in compare, (result.returncode, compare)
    runs = json.loads(run_oatui("runs", "--json", workspace=workspace, check=True).stdout)
    assert sorted(r["stage"] for r in runs) == ["rl", "rm", "sft"] and all(r["state"] == "succeeded" for r in runs)
    # The demo's RL stage is `oatui train rl --configs defaults_rl tiny_rl` on the tiny SFT and RM
    # models: the RM's score of the rollouts rises over the run, KL stays bounded, and the policy was
    # judged on held-out prompts as it trained.
    (rl_run,) = (workspace / "runs").glob("rl-*")
    metrics = ppo_steps(rl_run)
    scores = [m["ppo/score_mean"] for m in metrics]
    fifth = len(scores) // 5
    first, last = sum(scores[:fifth]) / fifth, sum(scores[-fifth:]) / fifth
    assert last > first, (first, last, metrics[0]["ppo/score_std"])
    assert all(abs(m["ppo/kl"]) < 50 for m in metrics)
    assert [m["step"] for m in read_metrics(rl_run) if "eval/gold" in m] == [0, 10, 20, 30, 40]
    from oatui.serve.server import status

    assert status(Workspace.open(workspace)) is None, "the demo stops its server"


def test_ctrl_c_stops_the_demo_its_run_and_nothing_keeps_going(workspace: Path) -> None:
    """SIGINT while the demo's SFT run trains: the run saves and ends `stopped`, the later phases are
    skipped, the stop phase still runs, and the command exits 130."""
    import signal
    import subprocess
    import time

    from helpers import OATUI

    process = subprocess.Popen([OATUI, "demo", "--workspace", str(workspace)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 300
        runs = workspace / "runs"
        while time.monotonic() < deadline:
            if runs.is_dir() and any((run / "metrics.jsonl").is_file() for run in runs.iterdir()):
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "stopping: the running stage saves a checkpoint" in stderr
    summary = stdout.split("phase", 1)[1]
    assert "sft: FAILED" in stdout and " stopped" in stdout.split("sft: FAILED", 1)[1].splitlines()[0]
    for phase in ("rm", "rl", "export", "serve", "chat", "compare"):
        assert any(line.startswith(phase) and "skipped" in line for line in summary.splitlines()), summary
    assert "no server was started" in summary
    runs_listed = json.loads(run_oatui("runs", "--json", workspace=workspace, check=True).stdout)
    assert [(r["stage"], r["state"]) for r in runs_listed] == [("sft", "stopped")]
