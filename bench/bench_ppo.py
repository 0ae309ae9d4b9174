"""Benchmark: where a PPO step's time goes on the tiny model, and the advantage share with and without the kernel.

Runs the RL stage's own pieces (``oatui.train.ppo``) in one process for ``--steps`` steps after
``--warmup`` steps: generate, score (reward model, reference and the policy's log-probs and values),
advantages, train. Each step computes the advantages twice on the same inputs, side by side:
with ``oatui_kernels.fused_kl_reward_gae`` (what the trainer uses) and with the classic per-token
loop of trl's old PPOTrainer (``classic_kl_reward_gae`` from ``bench/bench_kernel.py``), checking
that both agree; training goes on with ours. The table gives the median per-step seconds of each
phase and the share of the step the advantage computation takes either way.

Models: ``--sft`` and ``--rm`` folders (e.g. a workspace's trained runs' ``final/``); by default the
untrained tiny base model serves as both (built in a temporary folder): the time split is the
same, and its responses rarely stop early, so every step generates ``--max-new-tokens`` tokens.

    python bench/bench_ppo.py
    python bench/bench_ppo.py --sft WS/runs/sft-.../final --rm WS/runs/rm-.../final
    python bench/bench_ppo.py --max-new-tokens 256 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


def classic_loop():
    """``classic_kl_reward_gae`` from the kernel's benchmark: trl's old per-sample / per-token loops."""
    spec = importlib.util.spec_from_file_location("bench_kernel", BENCH / "bench_kernel.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.classic_kl_reward_gae


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", help="policy / reference folder (default: the untrained tiny model)")
    parser.add_argument("--rm", help="reward model folder (default: the untrained tiny model)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=32, help="rollout_batch_size (tiny_rl: 32)")
    parser.add_argument("--mini-batch", type=int, default=8)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as tiny_rl sets)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    from oatui.config import RLConfig
    from oatui.data.datasets import prompt_mix
    from oatui.models.loading import load_tokenizer
    from oatui.models.tiny import ensure_tiny_model
    from oatui.train.ppo.build import build_actor_critic, build_reference, build_reward_model, make_optimizer
    from oatui.train.ppo.models import rollout_logprobs_and_values
    from oatui.train.ppo.rollout import PromptSchedule, generate_rollout
    from oatui.train.ppo.scoring import reference_logprobs, score_rollout
    from oatui.train.ppo.trainer import Batch, compute_advantages, ppo_update

    classic_kl_reward_gae = classic_loop()
    scratch = tempfile.TemporaryDirectory(prefix="bench-ppo-")
    tiny = str(ensure_tiny_model(Path(scratch.name))) if not (args.sft and args.rm) else None
    sft, rm = args.sft or tiny, args.rm or tiny
    config = RLConfig(sft_model=sft, rm_model=rm, dtype="float32", rollout_batch_size=args.batch,
                      mini_batch_size=args.mini_batch, ppo_epochs=args.ppo_epochs, max_new_tokens=args.max_new_tokens,
                      max_prompt_length=64, learning_rate=1e-5, lr_scheduler_type="constant",
                      total_steps=args.steps + args.warmup)
    torch.manual_seed(0)
    accelerator = Accelerator()
    device = accelerator.device
    tokenizer = load_tokenizer(sft)
    model = build_actor_critic(config, sft, rm, tokenizer)
    reference = build_reference(config, model, sft, None, device)
    reward_model = build_reward_model(config, rm, None, device, tokenizer.eos_token)
    optimizer, scheduler = make_optimizer(model, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    prompts = prompt_mix(config.datasets, Path(scratch.name), config.seed, config.val_fraction).train
    schedule = PromptSchedule(prompts, config.seed, config.rollout_batch_size)

    phases = ("generate", "score", "advantages", "train")
    seconds: dict[str, list[float]] = {phase: [] for phase in (*phases, "classic")}
    tokens: list[int] = []
    for step in range(1, args.warmup + args.steps + 1):
        times: dict[str, float] = {}
        start = time.perf_counter()
        unwrapped.eval()
        rollout = generate_rollout(unwrapped.policy, tokenizer, schedule.batch(step), max_prompt_length=64,
                                   max_new_tokens=config.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0)
        times["generate"] = time.perf_counter() - start

        start = time.perf_counter()
        scores = score_rollout(reward_model, rollout)
        ref_logprobs = reference_logprobs(reference, rollout, config.mini_batch_size)
        old_logprobs, old_values = rollout_logprobs_and_values(unwrapped, rollout, config.mini_batch_size, device)
        times["score"] = time.perf_counter() - start

        mask = rollout.response_mask
        inputs = (old_logprobs, ref_logprobs, old_values, scores, mask)
        # Side by side on the same inputs: the classic loop (with its own whitening), then ours.
        start = time.perf_counter()
        classic = classic_kl_reward_gae(*(t.float() for t in inputs), kl_coef=config.init_kl_coef,
                                        gamma=config.gamma, lam=config.lam)
        times["classic"] = time.perf_counter() - start
        start = time.perf_counter()
        _, advantages, returns, _ = compute_advantages(*inputs, config, config.init_kl_coef)
        times["advantages"] = time.perf_counter() - start
        error = (advantages - classic[1]).abs().max().item()
        if error > 1e-3 or (returns - classic[2]).abs().max().item() > 1e-3:
            raise SystemExit(f"step {step}: the kernel and the classic loop disagree (advantages off by {error:.2e})")

        start = time.perf_counter()
        model.train()
        ppo_update(accelerator, model, optimizer, scheduler,
                   Batch.from_rollout(rollout, old_logprobs, old_values, advantages, returns), config, step)
        times["train"] = time.perf_counter() - start
        if step > args.warmup:
            for phase, value in times.items():
                seconds[phase].append(value)
            tokens.append(int(rollout.response_lengths.sum()))

    median = {phase: statistics.median(values) for phase, values in seconds.items()}
    step_ours = sum(median[phase] for phase in phases)
    step_classic = step_ours - median["advantages"] + median["classic"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {cpu_name()}, torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load:.2f}; "
          f"policy {Path(sft).name}, rm {Path(rm).name}; batch {args.batch}, max_new_tokens {args.max_new_tokens}, "
          f"ppo_epochs {args.ppo_epochs}, mini_batch {args.mini_batch}; median of {args.steps} steps "
          f"after {args.warmup} warm-up; {statistics.mean(tokens) / args.batch:.1f} response tokens per sequence")
    print()
    print("| phase | seconds per step | share of step |")
    print("|---|---:|---:|")
    for phase in phases:
        print(f"| {phase} | {median[phase]:.3f} | {median[phase] / step_ours:.1%} |")
    print(f"| **step** | {step_ours:.3f} | 100% |")
    print()
    print("| advantages computed by | ms per step | share of step |")
    print("|---|---:|---:|")
    print(f"| classic per-token loop (before) | {median['classic'] * 1e3:.2f} | {median['classic'] / step_classic:.2%} |")
    print(f"| oatui_kernels.fused_kl_reward_gae (after) | {median['advantages'] * 1e3:.2f} | "
          f"{median['advantages'] / step_ours:.2%} |")
    print(f"\nadvantages: {median['classic'] / median['advantages']:.1f}× faster with the kernel")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
