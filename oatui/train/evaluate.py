"""Judging policies on held-out prompts: the reward model's score (the proxy) and the gold judge.

The reward model is what the RL stage optimises, so its score alone cannot tell a policy that got
better from one that learnt to please it (reward over-optimisation). Beside it stands a gold judge
the training never sees: for the shipped sample, the sample's own rules
(:func:`oatui.data.sample.judge`, 0-3 points). ``oatui eval`` and the RL stage's ``eval/*`` metrics
both come from here.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from oatui.data.datasets import rm_text
from oatui.data.rules import Turn
from oatui.data.sample import FEATURES, feature_pairs, judge
from oatui.models.loading import load_for_inference
from oatui.models.scoring import token_logprobs
from oatui.train.ppo.rollout import generate_rollout
from oatui.train.ppo.scoring import LocalRewardModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from oatui.train.ppo.scoring import Reference, RewardModel

Context = tuple[Turn, ...]
DECODINGS = ("greedy", "sample")


@dataclass
class Answers:
    """One answer per context, with what the judges and the KL need of it."""

    contexts: list[Context]
    texts: list[str]
    ended: list[bool]
    """The answer ended with EOS (not cut off at ``max_new_tokens``)."""
    lengths: list[int]
    """Response tokens, the EOS included."""
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """With ``keep_ids``: each generation batch's (ids, attention mask), prompt left-padded, response right-padded."""


@torch.no_grad()
def generate_answers(
    policy: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    contexts: Sequence[Context],
    *,
    decoding: str,
    max_new_tokens: int,
    max_prompt_length: int = 512,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    keep_ids: bool = False,
    synced_gpus: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Answers:
    """Answers in left-padded batches; ``decoding`` is ``greedy`` or ``sample`` (seeded, at ``temperature``)."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}")
    was_training = policy.training
    policy.eval()
    answers = Answers([], [], [], [])
    for start in range(0, len(contexts), batch_size):
        batch = list(contexts[start:start + batch_size])
        # Seeded per batch, without touching the caller's random state (the RL stage's rollouts).
        devices = [policy.device] if getattr(policy, "device", None) is not None and policy.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 1_000_003 + start)
            rollout = generate_rollout(
                policy, tokenizer, batch, max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens,
                temperature=temperature, top_k=0, top_p=1.0, do_sample=decoding == "sample",
                synced_gpus=synced_gpus,
            )
        answers.contexts.extend(batch)
        answers.texts.extend(text.strip() for text in rollout.response_texts)
        answers.ended.extend(bool(value) for value in rollout.has_eos.tolist())
        answers.lengths.extend(int(value) for value in rollout.response_lengths.tolist())
        if keep_ids:
            answers.batches.append((rollout.input_ids, rollout.attention_mask))
        if progress is not None:
            progress(len(batch))
    policy.train(was_training)
    return answers


@dataclass
class Judged:
    """Per-answer scores of one policy under one decoding, and their means."""

    decoding: str
    proxy: list[float]
    gold: list[int | None]
    polite: list[bool | None]
    on_topic: list[bool | None]
    proper_ending: list[bool | None]
    ended: list[bool]
    lengths: list[int]
    texts: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def mean(values: Sequence[Any]) -> float | None:
            present = [float(value) for value in values if value is not None]
            return statistics.fmean(present) if present else None

        return {
            "decoding": self.decoding,
            "answers": len(self.proxy),
            "proxy": mean(self.proxy),
            # How widely the reward model's scores of these answers spread (population standard deviation).
            "proxy_std": statistics.pstdev(self.proxy) if len(self.proxy) > 1 else None,
            "gold": mean(self.gold),
            "polite": mean(self.polite),
            "on_topic": mean(self.on_topic),
            "proper_ending": mean(self.proper_ending),
            "eos_fraction": mean(self.ended),
            "mean_length": mean(self.lengths),
        }


def judge_answers(answers: Answers, reward_model: "RewardModel", decoding: str) -> Judged:
    """The reward model's score of every answer, and the gold judge's where its rules apply."""
    texts = [rm_text(context, text, reward_model.eos_token) for context, text in zip(answers.contexts, answers.texts)]
    proxy = reward_model.score(texts) if texts else []
    gold_scores = [judge(context[-1].text, text) for context, text in zip(answers.contexts, answers.texts)]
    return Judged(
        decoding=decoding,
        proxy=[float(value) for value in proxy],
        gold=[score.total if score else None for score in gold_scores],
        polite=[score.polite if score else None for score in gold_scores],
        on_topic=[score.on_topic if score else None for score in gold_scores],
        proper_ending=[score.proper_ending if score else None for score in gold_scores],
        ended=list(answers.ended),
        lengths=list(answers.lengths),
        texts=list(answers.texts),
    )


def win_rate(mine: Sequence[float | None], theirs: Sequence[float | None]) -> float | None:
    """The share of prompts where ``mine`` scores higher, a tie counting half; None when nothing compares."""
    pairs = [(a, b) for a, b in zip(mine, theirs) if a is not None and b is not None]
    if not pairs:
        return None
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


@torch.no_grad()
def summed_kl(policy: "PreTrainedModel", reference: "Reference", answers: Answers) -> float:
    """Mean over answers of Σ (log π − log π_ref) on their response tokens (the k1 estimate, as ``ppo/kl``).

    Needs answers generated with ``keep_ids``.
    """
    device = next(policy.parameters()).device
    totals: list[float] = []
    offset = 0
    for ids, mask in answers.batches:
        delta = token_logprobs(policy, ids.to(device), mask.to(device)).float().cpu() - reference.logprobs(ids, mask)
        lengths = answers.lengths[offset:offset + ids.shape[0]]
        offset += ids.shape[0]
        for row, length in enumerate(lengths):
            # delta[t] scores token t+1; a row's response tokens are its last ``length`` attended ones.
            positions = mask[row, 1:].nonzero().flatten()
            totals.append(float(delta[row, positions[-length:]].sum()) if length else 0.0)
    return statistics.fmean(totals) if totals else 0.0


# --------------------------------------------------------------------------------------------
# Comparing policies (``oatui eval``, the demo's compare phase)


@dataclass
class PolicyResult:
    name: str
    path: str
    judged: dict[str, Judged] = field(default_factory=dict)
    """Per decoding."""


def load_scorer(reward_model_path: str, batch_size: int = 32) -> "RewardModel":
    """The reward model in-process, as the RL stage scores with it."""
    rm, rm_tokenizer = load_for_inference(reward_model_path, "rm")
    return LocalRewardModel(rm, rm_tokenizer, batch_size=batch_size)


def answers_per_context(decoding: str, samples: int) -> int:
    """How many answers :func:`evaluate_policies` asks of each context: one greedy, ``samples`` sampled."""
    return samples if decoding == "sample" else 1


def evaluate_policies(
    policies: Sequence[tuple[str, str]],
    scorer: "RewardModel",
    contexts: Sequence[Context],
    *,
    decodings: Sequence[str] = DECODINGS,
    max_new_tokens: int = 48,
    max_prompt_length: int = 512,
    seed: int = 0,
    samples: int = 1,
    batch_size: int = 32,
    progress: Callable[[str, int], None] | None = None,
) -> list[PolicyResult]:
    """Each (name, folder) policy answers every context under each decoding; the RM and the gold judge score them.

    Sampled, each context is answered ``samples`` times (the contexts over and over, in the same
    order for every policy, so that answers compare prompt by prompt). ``progress(what, answered)``
    is told of every finished batch.
    """
    if samples < 1:
        raise ValueError("samples must be at least 1")
    results = []
    for name, path in policies:
        policy, tokenizer = load_for_inference(path, "causal")
        result = PolicyResult(name, path)
        for decoding in decodings:
            answers = generate_answers(
                policy, tokenizer, list(contexts) * answers_per_context(decoding, samples), decoding=decoding,
                max_new_tokens=max_new_tokens,
                max_prompt_length=max_prompt_length, seed=seed, batch_size=batch_size,
                progress=(lambda count, what=f"{name} {decoding}": progress(what, count)) if progress else None,
            )
            result.judged[decoding] = judge_answers(answers, scorer, decoding)
        results.append(result)
        del policy
    return results


def comparison(mine: PolicyResult, theirs: PolicyResult) -> dict[str, dict[str, float | None]]:
    """Per decoding: the share of answers where ``mine``'s beats ``theirs``' (prompt by prompt) by the RM and by gold
    (ties half); how far ``mine``'s mean RM score is above ``theirs``' (``proxy_rise``), and that rise
    in units of half the spread of ``theirs``' scores (``proxy_rise_half_spreads``: for RL against
    its SFT model under sampling, 1 means the policy's answers gained half a standard deviation of
    what the SFT model's rollouts scored)."""
    out: dict[str, dict[str, float | None]] = {}
    for decoding, judged in mine.judged.items():
        other = theirs.judged.get(decoding)
        if other is None:
            continue
        mine_summary, their_summary = judged.summary(), other.summary()
        rise = half = None
        if mine_summary["proxy"] is not None and their_summary["proxy"] is not None:
            rise = mine_summary["proxy"] - their_summary["proxy"]
            half = (their_summary["proxy_std"] or 0.0) / 2
        out[decoding] = {"win_rate_proxy": win_rate(judged.proxy, other.proxy),
                         "win_rate_gold": win_rate(judged.gold, other.gold),
                         "proxy_rise": rise,
                         "proxy_rise_half_spreads": rise / half if rise is not None and half else None}
    return out


def averaged(result: PolicyResult, key: str) -> float | None:
    """A summary value averaged over the decodings (what the demo's verdict and the acceptance bar use)."""
    values = [judged.summary()[key] for judged in result.judged.values()]
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def rm_feature_accuracy(reward_model: "RewardModel", prompts: Sequence[str], seed: int = 0) -> dict[str, float]:
    """Per rule of the sample, the share of held-out reply pairs differing in that rule alone that the
    reward model orders right (a polite opener, the prompt's topic, a proper ending)."""
    rng = random.Random(f"{seed}:feature-pairs")
    texts: dict[str, list[str]] = {feature: [] for feature in FEATURES}
    for prompt in prompts:
        context = (Turn("prompter", prompt),)
        for feature, (good, bad) in feature_pairs(prompt, rng).items():
            texts[feature] += [rm_text(context, good, reward_model.eos_token), rm_text(context, bad, reward_model.eos_token)]
    accuracy = {}
    for feature, pairs in texts.items():
        scores = reward_model.score(pairs)
        wins = [good > bad for good, bad in zip(scores[0::2], scores[1::2])]
        accuracy[feature] = sum(wins) / len(wins) if wins else float("nan")
    return accuracy
