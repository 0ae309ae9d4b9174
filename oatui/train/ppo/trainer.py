"""The PPO loop of the RL stage, top to bottom.

Each step, on every process (rank) at once:

1. rollout: ``rollout_batch_size`` prompts, one sampled response each (left-padded batch
   generation, stopping at EOS); the response mask is 1 up to and including the first EOS;
2. score: the reward model's score of prompt + response (in the RM's own chat format), the
   reference model's log-probs, and the rollout policy's log-probs and values;
3. advantages: ``oatui_kernels.fused_kl_reward_gae`` turns them into KL-penalised rewards, GAE
   advantages and returns; the advantages are whitened over all ranks' tokens (see ``stats``);
4. train: ``ppo_epochs`` passes over shuffled minibatches with the clipped policy loss, the clipped
   value loss and the entropy bonus; gradients clipped; a minibatch whose mean ratio passes
   ``ratio_threshold`` (on any rank) is skipped;
5. the KL coefficient follows the measured KL; metrics, samples, the progress line, checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from oatui.config import RLConfig
from oatui.data.datasets import prompt_mix
from oatui.data.rules import Turn
from oatui.data.sample import held_out_prompts
from oatui.models.loading import load_tokenizer, uses_lora
from oatui.train.common import MetricsWriter, StageContext, StageStopped, save_final, stop_requested_everywhere
from oatui.train.evaluate import generate_answers, judge_answers, summed_kl
from oatui.train.ppo.build import (
    build_actor_critic,
    build_reference,
    build_reward_model,
    make_accelerator,
    make_optimizer,
    resolve_stage_model,
    start_trackers,
    zero_stage,
)
from oatui.train.ppo.checkpoint import Progress, load_checkpoint, restore_rng, rng_snapshot, save_checkpoint
from oatui.train.ppo.kl_control import make_kl_controller
from oatui.train.ppo.losses import entropy_from_logits, masked_mean, policy_loss, value_loss
from oatui.train.ppo.models import response_outputs, rollout_logprobs_and_values
from oatui.train.ppo.rollout import PromptSchedule, Rollout, generate_rollout
from oatui.train.ppo.scoring import RemoteFailure, reference_logprobs, score_rollout, triton_host
from oatui.train.ppo.stats import RunningMoments, all_reduce_max, all_reduce_sum, global_masked_whiten, global_mean_std

if TYPE_CHECKING:
    from accelerate import Accelerator

    from oatui_kernels import KLRewardGAE


class StepTimer:
    """Wall time per phase of one step (``time/generate``, ``time/score``, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):  # noqa: ANN204
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def run_ppo(context: StageContext) -> None:
    """The RL stage's body (``oatui.train.rl``): the loop of the module docstring, then the policy saved."""
    from accelerate.utils import set_seed
    from transformers import AutoConfig

    config = context.config
    assert isinstance(config, RLConfig)

    # --- Inputs, checked before anything heavy is loaded -------------------------------------
    rm_address = triton_host("rm", config.triton_host_rm)
    ref_address = triton_host("ref", config.triton_host_ref)
    sft_path = resolve_stage_model(config.sft_model, "sft", context)
    needs_rm_weights = rm_address is None or config.value_model == "rm"
    rm_path = resolve_stage_model(config.rm_model, "rm", context) if needs_rm_weights or config.rm_model != "latest" else None
    mix = prompt_mix(config.prompts or config.datasets, context.workspace.root, config.seed, config.val_fraction,
                     config.skip_invalid)
    context.log("prompts: " + mix.describe("prompts"))

    accelerator = make_accelerator(config, AutoConfig.from_pretrained(sft_path).hidden_size, context.run)
    start_trackers(accelerator, config, context.run)
    set_seed(config.seed + accelerator.process_index)  # ranks sample differently
    device = accelerator.device
    world = accelerator.num_processes
    schedule = PromptSchedule(mix.train, config.seed, config.rollout_batch_size, accelerator.process_index, world)

    # --- Models ------------------------------------------------------------------------------
    tokenizer = load_tokenizer(sft_path, config.trust_remote_code)
    model = build_actor_critic(config, sft_path, rm_path, tokenizer)
    reference = build_reference(config, model, sft_path, ref_address, device)
    reward_model = build_reward_model(config, rm_path, rm_address, device, tokenizer.eos_token)
    frozen = f" (embeddings and {config.freeze_layer} layers frozen)" if config.freeze_layer else ""
    context.log(f"policy {sft_path}{' (LoRA)' if uses_lora(config) else frozen}; value: {config.value_model}; "
                f"reward: {rm_address or rm_path}; reference: {ref_address or ('the policy without its adapter' if uses_lora(config) else sft_path)}")
    optimizer, scheduler = make_optimizer(model, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    kl_controller = make_kl_controller(config.adaptive_kl, config.init_kl_coef, config.kl_target, config.kl_horizon)
    score_moments = RunningMoments()
    progress = Progress()
    # Kept beside the model and optimizer as JSON, never through accelerate's pickles.
    checkpoint_state = {"scheduler": scheduler, "kl_controller": kl_controller, "score_moments": score_moments,
                        "progress": progress}
    if context.resume_from is not None:
        load_checkpoint(accelerator, context.resume_from, checkpoint_state)
        MetricsWriter(context.run.samples_path, enabled=accelerator.is_main_process).truncate_after(progress.step)
        context.log(f"resumed at step {progress.step} (kl_coef {kl_controller.value:.4g})")
    context.log(f"PPO for {config.total_steps} steps: {config.rollout_batch_size} prompts per step on each of "
                f"{world} process(es), {config.ppo_epochs} epochs of minibatches of {config.mini_batch_size}")

    eval_contexts = evaluation_contexts(config, mix.eval)
    if config.eval_steps and not eval_contexts:
        context.log("no held-out prompts (val_fraction is 0): the policy is not judged during training")

    def judge_policy() -> dict[str, float]:
        """``eval/*``: greedy answers to the held-out prompts, judged by the RM and, where it applies, the gold judge."""
        if not config.eval_steps or not eval_contexts:
            return {}
        return evaluate_during_training(unwrapped.policy, tokenizer, eval_contexts, reward_model, reference, config,
                                        synced_gpus=zero_stage(accelerator) == 3 and world > 1)

    def checkpoint(step: int) -> None:
        path = save_checkpoint(accelerator, context.run.checkpoints, step, config.save_total_limit, checkpoint_state)
        context.log(f"checkpoint: {path.name}")

    def judged(step: int) -> dict[str, float]:
        """:func:`judge_policy`; a Triton server that keeps failing saves the state first, as a step does."""
        try:
            return judge_policy()
        except RemoteFailure:
            checkpoint(step)
            raise

    if progress.step == 0:
        baseline = judged(0)
        if baseline:
            context.metrics.write(0, config.total_steps, baseline)
            accelerator.log(baseline, step=0)

    for step in range(progress.step + 1, config.total_steps + 1):
        if stop_requested_everywhere():
            checkpoint(progress.step)
            raise StageStopped()
        at_step_start = rng_snapshot()
        timer = StepTimer()

        # 1. Rollout ------------------------------------------------------------------------
        with timer("generate"):
            unwrapped.eval()
            rollout = generate_rollout(
                unwrapped.policy, tokenizer, schedule.batch(step),
                max_prompt_length=config.max_prompt_length, max_new_tokens=config.max_new_tokens,
                temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                synced_gpus=zero_stage(accelerator) == 3 and world > 1,
            )
        mask = rollout.response_mask.to(device)

        # 2. Scores, reference log-probs, the rollout policy's log-probs and values ----------
        with timer("score"):
            failure: RemoteFailure | None = None
            try:
                scores = score_rollout(reward_model, rollout).to(device)
                ref_logprobs = reference_logprobs(reference, rollout, config.mini_batch_size).to(device)
            except RemoteFailure as error:
                failure = error
            if all_reduce_max(torch.tensor([float(failure is not None)], device=device)).item() > 0:
                # Back to the state at the start of this step, save it, and end with the server's story.
                restore_rng(at_step_start)
                checkpoint(progress.step)
                raise failure or RemoteFailure("a Triton server failed on another process (see stdout.log)")
            old_logprobs, old_values = rollout_logprobs_and_values(unwrapped, rollout, config.mini_batch_size, device)

        # 3. Rewards, advantages, returns -----------------------------------------------------
        with timer("advantages"):
            raw_scores = scores
            if config.missing_eos_penalty is not None:
                scores = torch.where(rollout.has_eos.to(device), scores, scores - config.missing_eos_penalty)
            if config.whiten_rewards:
                score_moments.update(scores)
                scores = scores / (score_moments.std + 1e-8)
            rewards, advantages, returns, kl_sum = compute_advantages(
                old_logprobs, ref_logprobs, old_values, scores, mask, config, kl_controller.value)

        # 4. PPO epochs -------------------------------------------------------------------------
        with timer("train"):
            model.train()
            batch = Batch.from_rollout(rollout, old_logprobs, old_values, advantages, returns)
            train_stats = ppo_update(accelerator, model, optimizer, scheduler, batch, config, step)

        # 5. KL coefficient, metrics, samples, checkpoint ----------------------------------------
        k1_kl = ((old_logprobs - ref_logprobs) * mask).sum(dim=1)  # ppo/kl is the summed k1 KL, whatever the estimator
        kl_mean, _, n_sequences = global_mean_std(k1_kl)
        kl_coef_used = kl_controller.value
        kl_controller.update(kl_mean, n_sequences)
        progress.step = step
        progress.prompts_consumed = schedule.position_after(step)

        score_mean, score_std, _ = global_mean_std(raw_scores)
        reward_mean, _, _ = global_mean_std(rewards.sum(dim=1))
        length_mean, _, _ = global_mean_std(rollout.response_lengths.float().to(device))
        tokens = float(all_reduce_sum(rollout.response_lengths.sum().float().to(device)).item())
        step_seconds = sum(timer.seconds.values())
        metrics = {
            "ppo/score_mean": score_mean,
            "ppo/score_std": score_std,
            "ppo/reward_mean": reward_mean,
            "ppo/kl": kl_mean,
            "ppo/kl_coef": kl_coef_used,
            "ppo/kl_estimate": global_mean_std(kl_sum)[0],
            **train_stats,
            "ppo/response_length": length_mean,
            "ppo/eos_fraction": global_mean_std(rollout.has_eos.float().to(device))[0],
            "ppo/learning_rate": scheduler.get_last_lr()[0],
            "perf/tokens_per_s": tokens / step_seconds if step_seconds > 0 else 0.0,
            **{f"time/{phase}": seconds for phase, seconds in timer.seconds.items()},
        }
        if config.eval_steps and (step % config.eval_steps == 0 or step == config.total_steps):
            with timer("eval"):
                metrics.update(judged(step))
            metrics["time/eval"] = timer.seconds["eval"]
        context.metrics.write(step, config.total_steps, metrics)
        accelerator.log(metrics, step=step)  # report_to's trackers, with the same names
        if accelerator.is_main_process:
            if step % max(1, config.logging_steps) == 0 or step == 1:
                write_samples(context.run.samples_path, step, rollout, raw_scores, config.samples_per_log)
            print(progress_line(step, config.total_steps, metrics, step_seconds), flush=True)
        if config.save_steps > 0 and step % config.save_steps == 0 and step < config.total_steps:
            checkpoint(step)

    # --- The policy alone, as a normal Hugging Face folder ------------------------------------
    save_policy(accelerator, model, tokenizer, context)
    for tracker in accelerator.trackers:  # not end_training(): that also ends torch.distributed
        tracker.finish()


# ------------------------------------------------------------------------------------------------
# The pieces of a step


def evaluation_contexts(config: RLConfig, held_out: list[Any]) -> list[Any]:
    """The prompts ``eval_steps`` judges the policy on: when every prompt comes from the shipped sample,
    ``eval_prompts`` of the sample's held-out questions (never asked in it, so neither the SFT model nor
    the policy has trained on them, and the ones ``oatui eval`` uses); otherwise the first
    ``eval_prompts`` of the prompts held out of training (``val_fraction``)."""
    specs = config.prompts or config.datasets
    if specs and all(spec.path == "sample" for spec in specs):
        return [(Turn("prompter", prompt),) for prompt in held_out_prompts(config.eval_prompts)]
    return list(held_out[: config.eval_prompts])


def evaluate_during_training(policy: Any, tokenizer: Any, contexts: list[Any], reward_model: Any, reference: Any,
                             config: RLConfig, synced_gpus: bool = False) -> dict[str, float]:
    """The policy judged on fixed held-out prompts: ``eval/proxy`` (the RM), ``eval/gold`` (the sample's
    rules, when the prompts are the sample's), ``eval/eos_fraction`` and ``eval/kl`` (summed k1 to the reference)."""
    answers = generate_answers(policy, tokenizer, contexts, decoding="greedy", max_new_tokens=config.max_new_tokens,
                               max_prompt_length=config.max_prompt_length, batch_size=config.rollout_batch_size,
                               keep_ids=True, synced_gpus=synced_gpus)
    summary = judge_answers(answers, reward_model, "greedy").summary()
    metrics = {"eval/proxy": summary["proxy"], "eval/eos_fraction": summary["eos_fraction"],
               "eval/response_length": summary["mean_length"], "eval/kl": summed_kl(policy, reference, answers)}
    if summary["gold"] is not None:
        metrics.update({"eval/gold": summary["gold"], "eval/on_topic": summary["on_topic"],
                        "eval/proper_ending": summary["proper_ending"]})
    return metrics


def compute_advantages(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    config: RLConfig,
    kl_coef: float,
) -> KLRewardGAE:
    """The kernel's ``(rewards, advantages, returns, kl_sum)``, the advantages whitened over every
    rank's tokens when ``whiten_advantages``."""
    from oatui_kernels import fused_kl_reward_gae

    result = fused_kl_reward_gae(
        logprobs, ref_logprobs, values, scores, mask,
        kl_coef=kl_coef, gamma=config.gamma, lam=config.lam, kl_estimator=config.kl_estimator,
        kl_clamp=config.kl_clamp, score_clip=config.score_clip,
        whiten=False,  # whitened below with statistics of all ranks, not only this one's batch
    )
    if config.whiten_advantages:
        result = result._replace(advantages=global_masked_whiten(result.advantages, mask))
    return result


@dataclass(frozen=True)
class Batch:
    """A rollout with what training needs of it, every field a tensor with one row per sequence."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    """The response mask: 1 on response tokens up to and including the first EOS."""
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @classmethod
    def from_rollout(cls, rollout: Rollout, old_logprobs: torch.Tensor, old_values: torch.Tensor,
                     advantages: torch.Tensor, returns: torch.Tensor) -> "Batch":
        return cls(rollout.input_ids, rollout.attention_mask, rollout.response_ids, rollout.response_mask,
                   old_logprobs, old_values, advantages, returns)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Every field's rows ``index``, on ``device``, by field name."""
        return {field.name: getattr(self, field.name)[index].to(device) for field in fields(self)}


def ppo_update(accelerator: "Accelerator", model: torch.nn.Module, optimizer: Any, scheduler: Any,
               batch: Batch, config: RLConfig, step: int) -> dict[str, float]:
    """``ppo_epochs`` passes over shuffled minibatches; returns the minibatch means of the loss statistics (all ranks)."""
    from accelerate.utils import DistributedType

    device = accelerator.device
    # The minibatch order depends on (seed, step, rank) only: a resumed run shuffles the same way.
    order_generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 1_009 + accelerator.process_index)
    sums: dict[str, float] = defaultdict(float)
    minibatches = skipped = 0
    updates_in_window = 0
    grad_norms: list[float] = []
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(batch), generator=order_generator)
        for start in range(0, len(batch), config.mini_batch_size):
            rows = batch.rows(order[start:start + config.mini_batch_size], device)
            with accelerator.accumulate(model):
                logits, logprobs, values = response_outputs(model, rows["input_ids"], rows["attention_mask"], rows["response_ids"])
                mask = rows["mask"]
                policy = policy_loss(logprobs, rows["old_logprobs"], rows["advantages"], mask, config.cliprange)
                value = value_loss(values, rows["old_values"], rows["returns"], mask, config.cliprange_value)
                if config.ent_coef:
                    entropy = masked_mean(entropy_from_logits(logits), mask)
                else:
                    with torch.no_grad():
                        entropy = masked_mean(entropy_from_logits(logits.detach()), mask)
                loss = policy.loss + config.vf_coef * value.loss - config.ent_coef * entropy
                exploded = all_reduce_max((policy.ratio_mean > config.ratio_threshold).float().reshape(1)).item() > 0
                if exploded:
                    # Every rank still runs backward (gradient sync and DeepSpeed's counters stay aligned),
                    # but with nothing to learn from this minibatch.
                    loss = loss * 0.0
                    skipped += 1
                else:
                    updates_in_window += 1
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if updates_in_window or accelerator.distributed_type == DistributedType.DEEPSPEED:
                        if config.max_grad_norm and config.max_grad_norm > 0:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                            if grad_norm is not None:
                                grad_norms.append(float(grad_norm))
                        optimizer.step()
                        scheduler.step()
                    optimizer.zero_grad()
                    updates_in_window = 0
            minibatches += 1
            sums["ppo/policy_loss"] += float(policy.loss.detach())
            sums["ppo/value_loss"] += float(value.loss.detach())
            sums["ppo/clipfrac"] += float(policy.clipfrac)
            sums["ppo/approx_kl"] += float(policy.approx_kl)
            sums["ppo/ratio"] += float(policy.ratio_mean)
            sums["ppo/entropy"] += float(entropy.detach())
            sums["ppo/value_clipfrac"] += float(value.clipfrac)
            sums["ppo/values_mean"] += float(masked_mean(values.detach(), mask))
    names = sorted(sums)
    local = torch.tensor([sums[name] / minibatches for name in names], dtype=torch.float64, device=device)
    averaged = all_reduce_sum(local) / accelerator.num_processes
    stats = {name: float(value) for name, value in zip(names, averaged.tolist())}
    if grad_norms:
        # Gradients are averaged over the ranks before they are clipped: every rank measures the same norm.
        stats["ppo/grad_norm"] = sum(grad_norms) / len(grad_norms)
    stats["ppo/skipped_minibatches"] = float(skipped)  # decided on all ranks together, so the same everywhere
    return stats


def write_samples(path: Any, step: int, rollout: Rollout, scores: torch.Tensor, count: int) -> None:
    """A few prompt / response / score triples for people to read next to the curves."""
    with open(path, "a", encoding="utf-8") as handle:
        for context, response, score, ended in list(zip(rollout.contexts, rollout.response_texts, scores.tolist(),
                                                        rollout.has_eos.tolist()))[:count]:
            record = {"step": step, "prompt": context[-1].text, "turns": len(context), "response": response,
                      "score": round(float(score), 4), "ended_with_eos": bool(ended)}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def progress_line(step: int, total: int, metrics: dict[str, float], seconds: float) -> str:
    def value(name: str) -> float:
        number = metrics.get(name, float("nan"))
        return number if isinstance(number, float) and math.isfinite(number) else float("nan")

    return (f"[oatui] step {step}/{total}  score {value('ppo/score_mean'):+.3f} (std {value('ppo/score_std'):.3f})  "
            f"kl {value('ppo/kl'):.3f}  kl_coef {value('ppo/kl_coef'):.4f}  len {value('ppo/response_length'):.1f}  "
            f"{seconds:.1f}s (generate {value('time/generate'):.1f}, score {value('time/score'):.1f}, "
            f"advantages {value('time/advantages'):.2f}, train {value('time/train'):.1f})")


class _GatheredPolicy:
    """The policy with weights gathered from every rank (ZeRO-3), for ``save_final``."""

    def __init__(self, policy: Any, state_dict: dict[str, torch.Tensor]) -> None:
        self.policy = policy
        self.state_dict = state_dict

    def save_pretrained(self, path: Any, **options: Any) -> None:
        self.policy.save_pretrained(path, state_dict=self.state_dict, **options)


def save_policy(accelerator: "Accelerator", model: torch.nn.Module, tokenizer: Any, context: StageContext) -> None:
    """``final/``: the policy alone (LoRA merged in), with its tokenizer, as ``oatui export --mode policy`` reads it."""
    gathered = accelerator.get_state_dict(model) if zero_stage(accelerator) == 3 else None  # a collective
    if accelerator.is_main_process:
        policy = accelerator.unwrap_model(model).policy
        policy.config.use_cache = True
        if hasattr(policy, "merge_and_unload"):
            policy = policy.merge_and_unload()
        elif gathered is not None:
            prefix = "policy."
            policy = _GatheredPolicy(policy, {k[len(prefix):]: v for k, v in gathered.items() if k.startswith(prefix)})
        save_final(policy, tokenizer, context.run.final)
        context.log(f"final model: {context.run.final}")
    accelerator.wait_for_everyone()
