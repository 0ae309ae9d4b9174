"""The PPO losses, as small functions of tensors: clipped policy loss, clipped value loss, entropy.

Every tensor here is B×T over response tokens (right padded); ``mask`` is 1 on the tokens that
count. Means are taken over the masked tokens of the minibatch (token-level averaging).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is set (0 when none is)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., tokens]`` in float32: the same maths as ``oatui.models.scoring.token_logprobs``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution given by ``logits`` (…×V → …), float32."""
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


class PolicyLoss(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor
    """Share of tokens where the clipped objective was the one taken."""
    approx_kl: torch.Tensor
    """½·mean((logπ − logπ_old)²): how far this minibatch has moved from the rollout policy."""
    ratio_mean: torch.Tensor


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> PolicyLoss:
    """PPO's clipped surrogate: mean over tokens of max(−A·r, −A·clip(r, 1−ε, 1+ε)), r = π/π_old."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
        ratio_mean = masked_mean(ratio.detach(), mask)
    return PolicyLoss(loss, clipfrac, approx_kl, ratio_mean)


class ValueLoss(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor
    """Share of tokens where the clipped prediction gave the larger error."""


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> ValueLoss:
    """½·mean over tokens of max((V − R)², (V_clipped − R)²), V_clipped within ±ε of the rollout's V."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).float(), mask)
    return ValueLoss(loss, clipfrac)
