"""Chained runs (`oatui train STAGE --after RUN`): real detached runs of the tiny stages, a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_oatui

pytestmark = pytest.mark.slow

SFT = ("train", "sft", "--configs", "defaults", "tiny")
RM = ("train", "rm", "--configs", "defaults_rm", "tiny_rm", "--set", "max_steps=3")
RL = ("train", "rl", "--configs", "defaults_rl", "tiny_rl", "--set", "total_steps=2", "--set", "eval_steps=0")


def _detach(*args: str, workspace: Path) -> str:
    return run_oatui(*args, "--detach", workspace=workspace, check=True).stdout.strip().splitlines()[-1]


def _wait(workspace: Path, run_id: str, timeout: float = 180) -> dict:
    from oatui.stages.rundir import RunDir
    from oatui.stages.runs import wait_for_end

    wait_for_end(RunDir(workspace / "runs" / run_id), timeout=timeout)
    return _info(workspace, run_id)


def _info(workspace: Path, run_id: str) -> dict:
    return json.loads((workspace / "runs" / run_id / "run.json").read_text())


def _log(workspace: Path, run_id: str) -> str:
    return (workspace / "runs" / run_id / "stdout.log").read_text(errors="replace")


def test_three_stages_chained_by_stage_name_run_one_after_another(workspace: Path) -> None:
    sft = _detach(*SFT, "--set", "max_steps=3", workspace=workspace)
    rm = _detach(*RM, "--after", "sft", workspace=workspace)
    rl = _detach(*RL, "--after", "rm", workspace=workspace)
    assert (_info(workspace, rm)["after"], _info(workspace, rl)["after"]) == (sft, rm)
    table = run_oatui("runs", workspace=workspace, check=True).stdout
    assert f"after {sft}" in table or _info(workspace, rm)["state"] != "queued"

    infos = {run_id: _wait(workspace, run_id) for run_id in (sft, rm, rl)}
    assert [infos[r]["state"] for r in (sft, rm, rl)] == ["succeeded"] * 3, [infos[r]["error"] for r in (sft, rm, rl)]
    assert infos[rm]["started"] >= infos[sft]["ended"]
    assert infos[rl]["started"] >= infos[rm]["ended"]
    sft_final, rm_final = workspace / "runs" / sft / "final", workspace / "runs" / rm / "final"
    assert f"model_name latest-sft: {sft_final}" in _log(workspace, rm)
    assert f"policy {sft_final}" in _log(workspace, rl) and f"reward: {rm_final}" in _log(workspace, rl)


def test_a_failed_parent_cancels_its_queued_child_and_grandchild(workspace: Path) -> None:
    data = workspace / "data.jsonl"
    data.write_text('{"message_tree_id": "a", "tree_state": "ready_for_export", "prompt": {}}\n')
    sft = _detach(*SFT, "--set", f"datasets=[{{path: {data}}}]", workspace=workspace)
    rm = _detach(*RM, "--after", sft, workspace=workspace)
    rl = _detach(*RL, "--after", rm, workspace=workspace)
    assert _wait(workspace, sft)["state"] == "failed"
    child, grandchild = _wait(workspace, rm), _wait(workspace, rl)
    assert (child["state"], child["error"]) == ("failed", f"parent {sft} ended failed; not started")
    assert (grandchild["state"], grandchild["error"]) == ("failed", f"parent {rm} ended failed; not started")
    for info, run_id in ((child, rm), (grandchild, rl)):
        assert info["started"] is None and info["pid"] is None
        assert "starting:" not in _log(workspace, run_id)
    assert f"parent {sft} ended failed; not started" in _log(workspace, rm)


def test_stopping_a_queued_run_cancels_it_and_stopping_a_parent_cancels_the_rest(workspace: Path) -> None:
    sft = _detach(*SFT, "--set", "max_steps=100000", workspace=workspace)
    rm = _detach(*RM, "--after", sft, workspace=workspace)
    rl = _detach(*RL, "--after", sft, workspace=workspace)
    listed = {row["id"]: row for row in json.loads(run_oatui("runs", "--json", workspace=workspace, check=True).stdout)}
    assert (listed[rm]["state"], listed[rm]["after"]) == ("queued", sft)

    run_oatui("runs", "stop", rm, "--wait", workspace=workspace, check=True)
    info = _info(workspace, rm)
    assert info["state"] == "stopped" and info["started"] is None and "starting:" not in _log(workspace, rm)
    assert _info(workspace, rl)["state"] == "queued"  # still waiting: its supervisor is alive

    run_oatui("runs", "stop", sft, "--wait", workspace=workspace, check=True)
    assert _info(workspace, sft)["state"] == "stopped"
    info = _wait(workspace, rl)
    assert (info["state"], info["error"], info["started"]) == ("failed", f"parent {sft} ended stopped; not started", None)


def test_after_an_unknown_run_is_one_line_and_makes_no_run(workspace: Path) -> None:
    result = run_oatui(*RM, "--after", "nosuchrun", workspace=workspace)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"oatui train: error: --after nosuchrun: no run 'nosuchrun' in {workspace / 'runs'}"]
    assert not list((workspace / "runs").glob("*")) if (workspace / "runs").exists() else True
    result = run_oatui(*RM, "--after", "sft", workspace=workspace)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--after" in run_oatui("train", "--help", check=True).stdout
