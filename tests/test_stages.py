"""The SFT and RM stages as real runs: learning, run directories, launchers, bad input."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from helpers import read_metrics, run_oatui

pytestmark = pytest.mark.slow


def _seed_tiny_model(trained, workspace: Path) -> None:  # noqa: ANN001
    """Reuse the session's tiny base model instead of building it again."""
    shutil.copytree(trained.tiny_base, workspace / "models" / "tiny-pythia")


def test_tiny_sft_learns_and_writes_its_run_directory(trained) -> None:  # noqa: ANN001
    run = trained.root / "runs" / trained.sft_run
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "succeeded" and info["exit_code"] == 0 and info["stage"] == "sft"
    assert info["configs"] == ["defaults", "tiny"]
    assert info["argv"][1:3] == ["-m", "oatui.train.sft"]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["max_length"] == 128 and resolved["model_name"] == "tiny"
    metrics = read_metrics(run)
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) >= 10
    assert statistics.mean(losses[-3:]) < 0.5 * losses[0], losses
    assert all({"step", "total_steps", "time"} <= m.keys() for m in metrics)
    assert metrics[-1]["step"] == metrics[-1]["total_steps"]
    assert any("perf/tokens_per_s" in m for m in metrics)
    evals = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert evals and evals[-1] < losses[0]
    assert (run / "final" / "config.json").exists() and (run / "final" / "tokenizer.json").exists()
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    print(f"tiny SFT: {info['ended'] - info['started']:.1f} s, loss {losses[0]:.2f} -> {losses[-1]:.2f}")


def test_tiny_sft_model_answers_in_the_chat_format(trained) -> None:  # noqa: ANN001
    import torch

    from oatui.data.format import format_conversation
    from oatui.models.loading import load_for_inference

    model, tokenizer = load_for_inference(str(trained.sft_model), "policy")
    prompt = format_conversation([("prompter", "How do I get started with baking bread?")], tokenizer.eos_token,
                                 add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**ids, max_new_tokens=60, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    reply = out[0, ids["input_ids"].shape[1]:]
    assert tokenizer.eos_token_id in reply.tolist(), "the SFT model learnt to end its answer"
    text = tokenizer.decode(reply, skip_special_tokens=True)
    # The tiny model has learnt the shape of an answer (an opener, advice, an ending), not always its topic.
    assert len(text.split()) >= 5 and "<|prompter|>" not in text and "<|assistant|>" not in text


def test_tiny_rm_ranks_held_out_groups(trained) -> None:  # noqa: ANN001
    run = trained.root / "runs" / trained.rm_run
    metrics = read_metrics(run)
    accuracy = [m["rm/accuracy"] for m in metrics if "rm/accuracy" in m]
    # Chance is 0.5. The held-out pairs include near misses, which differ in the topic alone: the
    # tiny reward model ends between 0.76 and 0.90 over runs.
    assert accuracy and accuracy[-1] >= 0.7, accuracy
    # tiny_rm's K-wise loss: whole groups, each reply scored once, and the share of held-out groups
    # whose best reply scores highest.
    top1 = [m["rm/top1_accuracy"] for m in metrics if "rm/top1_accuracy" in m]
    assert top1 and top1[-1] > 0.5, top1
    data = next(m for m in metrics if "data/train_pairs" in m)
    assert data["data/train_pairs"] > 1000 and data["data/eval_pairs"] > 50
    assert data["data/train_groups"] > 400 and data["data/train_replies"] < data["data/train_pairs"] * 2
    info = json.loads((run / "run.json").read_text())
    print(f"tiny RM: {info['ended'] - info['started']:.1f} s, held-out accuracy {accuracy[-1]:.3f}")


def test_runs_lists_both_runs_as_json(trained) -> None:  # noqa: ANN001
    listed = json.loads(run_oatui("runs", "--json", workspace=trained.root, check=True).stdout)
    by_id = {run["id"]: run for run in listed}
    for run_id in (trained.sft_run, trained.rm_run):
        entry = by_id[run_id]
        assert {"id", "stage", "state", "step", "total_steps", "pid", "started", "ended"} <= entry.keys()
        assert entry["state"] == "succeeded" and entry["step"] == entry["total_steps"] > 0
    table = run_oatui("runs", workspace=trained.root, check=True).stdout
    assert trained.sft_run in table and "succeeded" in table


def test_deepspeed_launcher_trains_with_zero2_on_cpu(trained, workspace: Path) -> None:  # noqa: ANN001
    _seed_tiny_model(trained, workspace)
    result = run_oatui("train", "sft", "--configs", "defaults", "tiny", "--launcher", "deepspeed",
                       "--set", "deepspeed=zero2", "--set", "max_steps=3", "--set", "save_steps=3",
                       "--set", "val_fraction=0", workspace=workspace, check=True)
    (run,) = (workspace / "runs").iterdir()
    info = json.loads((run / "run.json").read_text())
    assert info["launcher"] == "deepspeed" and "deepspeed.launcher.runner" in info["argv"]
    assert info["state"] == "succeeded", result.stderr
    checkpoint = run / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "global_step3").is_dir(), "ZeRO optimizer states are written by deepspeed"
    assert "zero_optimization" in (checkpoint / "global_step3").iterdir().__next__().name or any(
        "optim_states" in p.name for p in (checkpoint / "global_step3").iterdir())
    assert (run / "final" / "config.json").exists()


def test_accelerate_launcher_runs_two_processes(trained, workspace: Path) -> None:  # noqa: ANN001
    _seed_tiny_model(trained, workspace)
    run_oatui("train", "sft", "--configs", "defaults", "tiny", "--launcher", "accelerate", "--num-processes", "2",
              "--set", "max_steps=3", "--set", "val_fraction=0", workspace=workspace, check=True)
    (run,) = (workspace / "runs").iterdir()
    info = json.loads((run / "run.json").read_text())
    assert info["launcher"] == "accelerate" and info["num_processes"] == 2 and info["state"] == "succeeded"
    assert "accelerate.commands.launch" in info["argv"] and "--multi_gpu" in info["argv"]
    assert "training for 3 steps on 2 process(es)" in (run / "stdout.log").read_text()


def test_a_broken_data_line_fails_the_run_with_one_line(trained, workspace: Path) -> None:  # noqa: ANN001
    _seed_tiny_model(trained, workspace)
    data = workspace / "data.jsonl"
    data.write_text('{"message_tree_id": "a", "tree_state": "ready_for_export", "prompt": {}}\n')
    result = run_oatui("train", "sft", "--configs", "defaults", "tiny", "--set", f"datasets=[{{path: {data}}}]",
                       workspace=workspace)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"oatui train: error: {data}:1: prompt.message_id: missing"
    (run,) = (workspace / "runs").iterdir()
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "failed" and info["error"] == f"{data}:1: prompt.message_id: missing"


def test_a_relative_hostfile_reaches_the_launcher_as_an_absolute_path(workspace: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage starts in its run folder, so `--hostfile hosts.txt` must not stay relative (deepspeed
    would quietly fall back to this machine alone)."""
    from oatui.stages.launcher import LaunchRequest, prepare
    from oatui.workspace import Workspace

    (tmp_path / "hosts.txt").write_text("localhost slots=1\n")
    monkeypatch.chdir(tmp_path)
    run = prepare(LaunchRequest(stage="sft", configs=["defaults", "tiny"], hostfile="hosts.txt"),
                  Workspace.open(workspace))
    info = run.read_info()
    assert info.launcher == "deepspeed" and info.hostfile == str(tmp_path / "hosts.txt")
    assert info.argv[info.argv.index("--hostfile") + 1] == str(tmp_path / "hosts.txt")
