"""The result type shared by every implementation of the fused KL reward + GAE."""

from __future__ import annotations

from typing import NamedTuple

import torch


class KLRewardGAE(NamedTuple):
    """What :func:`oatui_kernels.fused_kl_reward_gae` returns; all float32.

    rewards:    B×T, -kl_coef·k on response tokens plus the score on the last one, 0 elsewhere.
    advantages: B×T, GAE advantages (whitened over the batch's response tokens when asked), 0 elsewhere.
    returns:    B×T, advantages + values taken before whitening (the value targets), 0 elsewhere.
    kl_sum:     B, the sum of the per-token KL estimate over each row's response tokens.
    """

    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl_sum: torch.Tensor
