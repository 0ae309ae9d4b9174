"""The RL stage as real runs on the tiny models: learning, two processes, stop and exact resume, bad input.

Every run here lives in its own workspace and names the trained SFT and RM models by path, so the
tests never see each other's runs.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import pytest
import torch

from helpers import ppo_steps, read_metrics, run_oatui

pytestmark = pytest.mark.slow

PER_STEP_METRICS = {
    "ppo/score_mean", "ppo/score_std", "ppo/reward_mean", "ppo/kl", "ppo/kl_coef", "ppo/clipfrac", "ppo/approx_kl",
    "ppo/entropy", "ppo/value_loss", "ppo/policy_loss", "ppo/response_length", "perf/tokens_per_s",
    "time/generate", "time/score", "time/advantages", "time/train",
}
EVAL_METRICS = {"eval/proxy", "eval/gold", "eval/eos_fraction", "eval/kl", "eval/on_topic", "eval/proper_ending"}
# A few small steps, for the tests that check the machinery rather than the learning.
SMALL = ["--set", "rollout_batch_size=4", "--set", "mini_batch_size=2", "--set", "ppo_epochs=1",
         "--set", "max_new_tokens=8", "--set", "torch_threads=1"]


def models(trained) -> list[str]:  # noqa: ANN001
    return ["--set", f"sft_model={trained.sft_model}", "--set", f"rm_model={trained.rm_model}"]


def only_run(workspace: Path) -> Path:
    (run,) = [p for p in (workspace / "runs").iterdir() if p.name.startswith("rl-")]
    return run


def learning_curve(metrics: list[dict]) -> tuple[float, float]:
    """Mean ``ppo/score_mean`` over the first and the last fifth of the steps."""
    scores = [m["ppo/score_mean"] for m in metrics]
    fifth = max(1, len(scores) // 5)
    return statistics.mean(scores[:fifth]), statistics.mean(scores[-fifth:])


def test_tiny_rl_learns_and_is_judged_while_it_trains(trained, workspace: Path) -> None:  # noqa: ANN001
    """A shortened ``oatui train rl --configs defaults_rl tiny_rl``: the value network learns, the
    policy moves away from the reference with KL bounded, and it is judged on held-out prompts."""
    started = time.monotonic()
    result = run_oatui("train", "rl", "--configs", "defaults_rl", "tiny_rl", *models(trained),
                       "--set", "total_steps=30", workspace=workspace, check=True)
    run = only_run(workspace)
    records = read_metrics(run)
    metrics = ppo_steps(run)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    # The policy is judged on held-out prompts before the first step, every eval_steps and at the end.
    judged = [m for m in records if "eval/gold" in m]
    assert [m["step"] for m in judged] == [0, 10, 20, 30]
    for record in judged:
        assert EVAL_METRICS <= record.keys(), EVAL_METRICS - record.keys()
        assert 0 <= record["eval/gold"] <= 3 and 0 <= record["eval/eos_fraction"] <= 1
    assert judged[0]["eval/kl"] == pytest.approx(0.0, abs=1e-3), "the starting policy is the reference"
    for record in metrics:
        assert PER_STEP_METRICS <= record.keys(), PER_STEP_METRICS - record.keys()
        assert math.isfinite(record["ppo/kl"]) and abs(record["ppo/kl"]) < 50
    # Thirty steps of 32 rollouts are too noisy to show the RM's score rising (a step's mean moves
    # by ±1 with this reward model; the full run in `oatui demo` is checked in tests/test_loop.py).
    # What thirty steps do show: the value network (started from the RM) fits the returns, and the
    # policy leaves the reference while the KL stays small.
    value_loss = [m["ppo/value_loss"] for m in metrics]
    assert statistics.mean(value_loss[-6:]) < 0.5 * statistics.mean(value_loss[:6]), value_loss
    assert 0.05 < statistics.mean(m["ppo/kl"] for m in metrics[-6:]) < 20
    first, last = learning_curve(metrics)
    # What users tail: a progress line per step.
    assert result.stdout.count("[oatui] step ") >= 30 and "score " in result.stdout and "kl " in result.stdout
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "response", "score"} <= samples[0].keys()
    # final/ is the policy alone, a normal Hugging Face folder that the policy export accepts.
    final = run / "final"
    assert (final / "config.json").exists() and (final / "tokenizer.json").exists()
    assert json.loads((final / "config.json").read_text())["architectures"] == ["GPTNeoXForCausalLM"]
    # tiny_rl's freeze_layer: 3 leaves the embeddings and the three lower layers exactly the SFT
    # model's; the top layer, the final norm and the output layer learn.
    from safetensors.torch import load_file

    before, after = load_file(trained.sft_model / "model.safetensors"), load_file(final / "model.safetensors")
    assert before.keys() == after.keys()
    frozen = [name for name in before if name.startswith(("gpt_neox.embed_in.", *(f"gpt_neox.layers.{i}." for i in range(3))))]
    trained_names = [name for name in before if name.startswith(("gpt_neox.layers.3.", "gpt_neox.final_layer_norm.", "embed_out."))]
    assert len(frozen) == 1 + 3 * 12 and len(trained_names) == 12 + 3
    assert all(torch.equal(before[name], after[name]) for name in frozen)
    assert all(not torch.equal(before[name], after[name]) for name in trained_names if name.endswith(".weight"))
    exported = run_oatui("export", "--mode", "policy", "--model", str(final), "--repo", str(workspace / "repo"),
                         workspace=workspace)
    assert exported.returncode == 0, exported.stderr
    print(f"tiny RL, 30 steps: {time.monotonic() - started:.0f} s, score {first:+.2f} -> {last:+.2f}")


def test_two_processes_under_accelerate(trained, workspace: Path) -> None:  # noqa: ANN001
    run_oatui("train", "rl", "--configs", "defaults_rl", "tiny_rl", *models(trained), *SMALL,
              "--set", "total_steps=2", "--set", "save_steps=1", "--launcher", "accelerate", "--num-processes", "2",
              workspace=workspace, check=True)
    run = only_run(workspace)
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "succeeded" and info["num_processes"] == 2
    assert "accelerate.commands.launch" in info["argv"] and "--multi_gpu" in info["argv"]
    log = (run / "stdout.log").read_text()
    assert "4 prompts per step on each of 2 process(es)" in log
    metrics = ppo_steps(run)
    assert [m["step"] for m in metrics] == [1, 2]  # rank 0 writes, once per step
    assert all(math.isfinite(m["ppo/kl"]) for m in metrics)
    checkpoint = run / "checkpoints" / "checkpoint-1"
    # Every rank's RNG states, as JSON: no pickle in a checkpoint (accelerate's is replaced).
    assert (checkpoint / "rng_state_0.json").exists() and (checkpoint / "rng_state_1.json").exists()
    assert not list(checkpoint.rglob("*.pkl"))
    assert (run / "final" / "model.safetensors").exists()


def test_deepspeed_zero2_through_accelerate(trained, workspace: Path) -> None:  # noqa: ANN001
    run_oatui("train", "rl", "--configs", "defaults_rl", "tiny_rl", *models(trained), *SMALL,
              "--set", "total_steps=2", "--set", "save_steps=1", "--set", "deepspeed=zero2",
              workspace=workspace, check=True)
    run = only_run(workspace)
    info = json.loads((run / "run.json").read_text())
    assert info["launcher"] == "deepspeed" and info["state"] == "succeeded"
    assert (run / "checkpoints" / "checkpoint-1" / "pytorch_model").is_dir(), "deepspeed writes its own checkpoint"
    # DeepSpeed unpickles its files on resume: they name only what the resume check lets through.
    from oatui.train.common import check_torch_files

    check_torch_files(run / "checkpoints" / "checkpoint-1")
    assert not list((run / "checkpoints" / "checkpoint-1").rglob("*.pkl"))
    assert [m["step"] for m in ppo_steps(run)] == [1, 2]
    assert (run / "final" / "model.safetensors").exists()


def _comparable(metrics: list[dict]) -> list[dict]:
    """What must be identical between two runs of the same config: everything but clocks."""
    return [{k: v for k, v in m.items() if not k.startswith(("time", "perf/"))} for m in metrics]


def test_stop_then_resume_takes_the_steps_an_uninterrupted_run_takes(trained, tmp_path: Path) -> None:  # noqa: ANN001
    from safetensors.torch import load_file

    from oatui.stages.rundir import RunDir
    from oatui.stages.runs import stop_run, wait_for_end

    options = ["--configs", "defaults_rl", "tiny_rl", *models(trained), *SMALL, "--set", "total_steps=20",
               "--set", "save_steps=5"]
    straight_ws, stopped_ws = tmp_path / "straight", tmp_path / "stopped"
    run_oatui("train", "rl", *options, workspace=straight_ws, check=True)

    run_id = run_oatui("train", "rl", *options, "--detach", workspace=stopped_ws, check=True).stdout.split()[-1]
    run = RunDir(stopped_ws / "runs" / run_id)
    deadline = time.monotonic() + 300
    while not (run.metrics_path.exists() and run.metrics_path.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline, run.log_path.read_text()
        time.sleep(0.05)
    stop_run(run)
    info = wait_for_end(run, timeout=300)
    assert info.state == "stopped", run.log_path.read_text()[-3000:]
    stopped_at = read_metrics(run.path)[-1]["step"]
    assert stopped_at < 20, "the stop came too late to test anything"
    assert (run.checkpoints / f"checkpoint-{stopped_at}").is_dir()
    assert not (run.checkpoints / ".partial").exists()

    resumed = run_oatui("train", "rl", "--resume", run_id, workspace=stopped_ws, check=True)
    assert f"resuming from checkpoint-{stopped_at}" in run.log_path.read_text(), resumed.stdout[-2000:]
    straight = only_run(straight_ws)
    assert _comparable(read_metrics(run.path)) == _comparable(read_metrics(straight))
    ours, theirs = load_file(run.final / "model.safetensors"), load_file(straight / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(bool((ours[k] == theirs[k]).all()) for k in ours)
    samples_steps = [json.loads(line)["step"] for line in run.samples_path.read_text().splitlines()]
    assert samples_steps == sorted(samples_steps), "samples logged after the checkpoint are not repeated"


def test_latest_without_a_succeeded_run_is_one_line(workspace: Path, trained) -> None:  # noqa: ANN001
    result = run_oatui("train", "rl", "--configs", "defaults_rl", "tiny_rl", workspace=workspace)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"oatui train: error: no succeeded sft run in {workspace}; train one with "
        "`oatui train sft --configs defaults tiny` or set sft_model")
    result = run_oatui("train", "rl", "--configs", "defaults_rl", "tiny_rl", "--set", f"sft_model={trained.sft_model}",
                       workspace=workspace)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "no succeeded rm run in " f"{workspace}; train one with `oatui train rm --configs defaults_rm tiny_rm` or set rm_model")
    assert result.stderr.count("\n") == 1, "one line, before any run starts"
    assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir()), "no run folder is left"


def test_bad_triton_addresses_are_one_line(workspace: Path, trained) -> None:  # noqa: ANN001
    result = run_oatui("train", "rl", "--configs", "defaults_rl", "tiny_rl", "--set", "triton_host_rm=localhost/rm",
                       workspace=workspace)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "triton_host_rm: 'localhost/rm' is not host:grpcport/model" in result.stderr.strip().splitlines()[-1]
    assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir())
    result = run_oatui("train", "rl", "--configs", "defaults_rl", "tiny_rl", *models(trained),
                       workspace=workspace, env={"TRITON_HOST_REF": "localhost:99999/ref"})
    assert result.returncode == 2
    assert "$TRITON_HOST_REF: 'localhost:99999/ref' is not host:grpcport/model" in result.stderr.strip().splitlines()[-1]
