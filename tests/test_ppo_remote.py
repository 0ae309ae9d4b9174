"""The RL stage scoring on a real tritonserver: the same rewards as in-process, and a clear end when it is gone."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from helpers import ppo_steps, run_oatui
from oatui.netutil import free_ports

pytestmark = pytest.mark.slow

SMALL = ["--set", "rollout_batch_size=4", "--set", "mini_batch_size=2", "--set", "ppo_epochs=1",
         "--set", "max_new_tokens=8", "--set", "torch_threads=1"]


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001
    """A tritonserver with the trained RM (``rm``) and the SFT model as reference (``ref``); yields its gRPC url."""
    from oatui.serve.record import ServerOptions
    from oatui.serve.server import TritonServer
    from oatui.workspace import Workspace

    repo = tmp_path_factory.mktemp("rl-serve") / "repo"
    for mode, model in (("rm", trained.rm_model), ("ref", trained.sft_model)):
        result = run_oatui("export", "--mode", mode, "--model", str(model), "--repo", str(repo), "--max-batch", "4",
                           workspace=trained.root)
        assert result.returncode == 0, result.stderr
    http, grpc, metrics = free_ports(3)
    server = TritonServer(Workspace.open(tmp_path_factory.mktemp("rl-serve-ws") / "ws"),
                          ServerOptions(repo=str(repo), http_port=http, grpc_port=grpc, metrics_port=metrics))
    server.start()
    yield server.info().grpc_url
    server.stop()


def test_remote_and_in_process_scoring_give_the_same_rewards(served: str, trained) -> None:  # noqa: ANN001
    from oatui.config import RLConfig
    from oatui.data.rules import Turn
    from oatui.models.loading import load_for_inference
    from oatui.train.ppo.rollout import generate_rollout
    from oatui.train.ppo.scoring import (
        LocalReference,
        LocalRewardModel,
        RemoteReference,
        RemoteRewardModel,
        reference_logprobs,
        score_rollout,
    )
    from oatui.train.ppo.trainer import compute_advantages

    policy, tokenizer = load_for_inference(str(trained.sft_model), "policy")
    rm, rm_tokenizer = load_for_inference(str(trained.rm_model), "rm")
    contexts = [(Turn("prompter", text),) for text in (
        "How do I get started with baking bread?", "What is the most common mistake with fixing a bike?",
        "¿Qué debo saber sobre dormir mejor?", "Can you give me some tips for learning Python?",
        "I want to try growing tomatoes. Where do I begin?")]
    torch.manual_seed(0)
    rollout = generate_rollout(policy, tokenizer, contexts, max_prompt_length=64, max_new_tokens=48,
                               temperature=1.0, top_k=0, top_p=1.0)
    assert len(set(rollout.response_lengths.tolist())) > 1, "rows of several lengths exercise the padding"

    local = LocalRewardModel(rm, rm_tokenizer), LocalReference(policy)
    remote = (RemoteRewardModel(f"{served}/rm", rm_tokenizer.eos_token, attempts=2, timeout=60),
              RemoteReference(f"{served}/ref", attempts=2, timeout=60))
    config = RLConfig(init_kl_coef=0.2)
    # The same stand-in for the policy's own log-probs and values on both sides: only scoring differs.
    mask = rollout.response_mask
    results = []
    for reward_model, reference in (local, remote):
        scores = score_rollout(reward_model, rollout)
        ref_logprobs = reference_logprobs(reference, rollout, chunk=3)
        logprobs = torch.where(mask.bool(), ref_logprobs.detach() + 0.05, 0.0)
        values = torch.linspace(-1, 1, mask.shape[1]).expand_as(logprobs).contiguous()
        rewards, advantages, returns, kl_sum = compute_advantages(logprobs, ref_logprobs, values, scores, mask, config, 0.2)
        results.append((scores, ref_logprobs * mask, rewards, advantages, returns))
    for name, here, there in zip(("scores", "ref log-probs", "rewards", "advantages", "returns"), *results):
        assert torch.allclose(here, there, atol=1e-4, rtol=0), (name, (here - there).abs().max())
    assert results[0][0].std() > 0.01, "the scores say something"


def test_a_run_scoring_on_triton_matches_the_in_process_run(served: str, trained, tmp_path: Path) -> None:  # noqa: ANN001
    options = ["--configs", "defaults_rl", "tiny_rl", "--set", f"sft_model={trained.sft_model}",
               "--set", f"rm_model={trained.rm_model}", *SMALL, "--set", "total_steps=2"]
    remote_ws, local_ws = tmp_path / "remote", tmp_path / "local"
    run_oatui("train", "rl", *options, "--set", f"triton_host_rm={served}/rm", workspace=remote_ws, check=True,
              env={"TRITON_HOST_REF": f"{served}/ref"})  # the variable, as in Open-Assistant
    run_oatui("train", "rl", *options, workspace=local_ws, check=True)
    (remote_run,) = (remote_ws / "runs").iterdir()
    (local_run,) = (local_ws / "runs").iterdir()
    log = (remote_run / "stdout.log").read_text()
    assert f"reward: {served}/rm; reference: {served}/ref" in log
    # Step 1's rollouts are the same tokens (same seed, same policy): the same scores, KL and rewards.
    remote_first, local_first = ppo_steps(remote_run)[0], ppo_steps(local_run)[0]
    for key in ("ppo/score_mean", "ppo/score_std", "ppo/kl", "ppo/reward_mean", "ppo/response_length"):
        assert math.isclose(remote_first[key], local_first[key], abs_tol=1e-4), key
    assert (remote_run / "final" / "model.safetensors").exists()


def test_an_unreachable_server_saves_a_checkpoint_and_fails_with_one_line(trained, tmp_path: Path) -> None:  # noqa: ANN001
    (port,) = free_ports(1)
    started = time.monotonic()
    result = run_oatui("train", "rl", "--configs", "defaults_rl", "tiny_rl", "--set", f"sft_model={trained.sft_model}",
                       "--set", f"rm_model={trained.rm_model}", *SMALL, "--set", f"triton_host_rm=127.0.0.1:{port}/rm",
                       "--set", "remote_retries=2", workspace=tmp_path / "ws")
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert f"reward model on 127.0.0.1:{port}/rm: no answer after 2 attempts" in message
    (run,) = (tmp_path / "ws" / "runs").iterdir()
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "failed" and "no answer after 2 attempts" in info["error"]
    assert (run / "error.txt").read_text().count("\n") == 1
    assert (run / "checkpoints" / "checkpoint-0" / "model.safetensors").exists(), "state saved before failing"
    assert time.monotonic() - started < 120
