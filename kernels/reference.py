"""A plain float64 reference for the fused KL reward + GAE, written for reading, not speed.

Python loops over rows and tokens, exactly as DESIGN.md states the maths. Tests compare every
other implementation against it.
"""

from __future__ import annotations

import math

import torch

from .estimators import canonical_estimator
from .result import KLRewardGAE


def reference_kl(x: float, estimator: str, clamp: float | None) -> float:
    """One token's KL estimate in float64."""
    name = canonical_estimator(estimator)
    if name == "k1":
        k = x
    elif name == "k2":
        k = x * x / 2
    elif name == "k3":
        k = math.expm1(-x) + x
    else:
        k = abs(x)
    if clamp is not None:
        k = min(max(k, -clamp), clamp)
    return k


def reference_kl_reward_gae(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    gamma: float = 1.0,
    lam: float = 0.95,
    kl_estimator: str = "k1",
    kl_clamp: float | None = None,
    score_clip: float | None = None,
    whiten: bool = True,
) -> KLRewardGAE:
    """The contract of ``fused_kl_reward_gae``, in float64 on the CPU, without input checks."""
    logprob_rows = logprobs.double().cpu().tolist()
    ref_rows = ref_logprobs.double().cpu().tolist()
    value_rows = values.double().cpu().tolist()
    score_list = scores.double().cpu().tolist()
    lengths = [int(row.sum()) for row in (mask != 0).cpu()]
    batch, tokens = logprobs.shape

    rewards = [[0.0] * tokens for _ in range(batch)]
    advantages = [[0.0] * tokens for _ in range(batch)]
    returns = [[0.0] * tokens for _ in range(batch)]
    kl_sum = [0.0] * batch
    for b in range(batch):
        length = lengths[b]
        for t in range(length):
            k = reference_kl(logprob_rows[b][t] - ref_rows[b][t], kl_estimator, kl_clamp)
            kl_sum[b] += k
            rewards[b][t] = -kl_coef * k
        if length > 0:
            score = score_list[b]
            if score_clip is not None:
                score = min(max(score, -score_clip), score_clip)
            rewards[b][length - 1] += score
        following_advantage = 0.0
        for t in reversed(range(length)):
            next_value = value_rows[b][t + 1] if t + 1 < length else 0.0
            delta = rewards[b][t] + gamma * next_value - value_rows[b][t]
            following_advantage = delta + gamma * lam * following_advantage
            advantages[b][t] = following_advantage
            returns[b][t] = following_advantage + value_rows[b][t]

    if whiten:
        masked = [advantages[b][t] for b in range(batch) for t in range(lengths[b])]
        n = len(masked)
        if n < 2:
            raise ValueError(f"whitening needs at least two masked tokens, got {n}")
        mean = math.fsum(masked) / n
        variance = math.fsum((a - mean) ** 2 for a in masked) / (n - 1)
        scale = 1.0 / math.sqrt(variance + 1e-8)
        for b in range(batch):
            for t in range(lengths[b]):
                advantages[b][t] = (advantages[b][t] - mean) * scale

    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    return KLRewardGAE(as_tensor(rewards), as_tensor(advantages), as_tensor(returns), as_tensor(kl_sum))
