"""Statistics over every rank's rollouts: masked whitening and running moments.

The kernel (``oatui_kernels.fused_kl_reward_gae``) whitens the advantages of the batch it is given,
which on several processes is one rank's share. The trainer therefore calls it with
``whiten=False`` and whitens here with the mean and variance of all ranks' response tokens
(sums all-reduced), so that N processes × B sequences whiten like one process with N·B. With one
process the result equals the kernel's own whitening.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

WHITEN_EPS = 1e-8

Reduce = Callable[[torch.Tensor], torch.Tensor]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (itself with one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def global_masked_whiten(x: torch.Tensor, mask: torch.Tensor, reduce_sum: Reduce = all_reduce_sum) -> torch.Tensor:
    """(x − mean)/sqrt(var + 1e-8) with mean and var (Bessel) over the masked entries of all ranks; 0 off the mask.

    Two passes, as the kernel does: the mean first, then the squared deviations from it.
    """
    is_set = mask != 0
    x = x.float()
    totals = reduce_sum(torch.stack([torch.where(is_set, x, 0.0).sum(), is_set.sum().float()]).double())
    total, count = float(totals[0]), float(totals[1])
    if count < 2:
        raise ValueError(f"whitening needs at least two masked tokens over all ranks, got {int(count)}")
    mean = total / count
    centered = torch.where(is_set, x - mean, 0.0)
    squares = reduce_sum((centered.double() ** 2).sum().reshape(1))
    variance = float(squares[0]) / (count - 1)
    return centered * (1.0 / math.sqrt(variance + WHITEN_EPS))


def global_mean_std(values: torch.Tensor, reduce_sum: Reduce = all_reduce_sum) -> tuple[float, float, int]:
    """(mean, standard deviation with Bessel's correction, count) of a 1-D tensor over all ranks."""
    values = values.double().reshape(-1)
    totals = reduce_sum(torch.stack([values.sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                                 device=values.device)]))
    count = int(totals[1])
    mean = float(totals[0]) / max(count, 1)
    squares = float(reduce_sum(((values - mean) ** 2).sum().reshape(1))[0])
    std = math.sqrt(squares / (count - 1)) if count > 1 else 0.0
    return mean, std, count


class RunningMoments:
    """Mean and variance of every value seen so far, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, values: torch.Tensor, reduce_sum: Reduce = all_reduce_sum) -> None:
        """Merge in a batch (the batch of all ranks, through ``reduce_sum``)."""
        batch_mean, batch_std, batch_count = global_mean_std(values, reduce_sum)
        if batch_count == 0:
            return
        batch_var = batch_std**2 if batch_count > 1 else 0.0
        total = self.count + batch_count
        delta = batch_mean - self.mean
        if self.count == 0:
            self.mean, self.var = batch_mean, batch_var
        else:
            # Sums of squared deviations (not variances) merge exactly.
            m2 = self.var * max(self.count - 1, 0) + batch_var * (batch_count - 1) + delta**2 * self.count * batch_count / total
            self.mean += delta * batch_count / total
            self.var = m2 / (total - 1)
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
