"""``fused_kl_reward_gae``: checks the inputs, then runs the Triton kernel or the PyTorch path."""

from __future__ import annotations

import importlib
import os

import torch

from .result import KLRewardGAE
from .torch_path import kl_reward_gae_torch
from .validation import check_options, check_tensors, response_lengths, too_few_tokens_error

_TRITON_MODULE = "oatui_kernels.triton_kernel"


def _triton_kernel_module():
    """Import the Triton module on first use: importing triton costs time, and whether kernels
    are interpreted is fixed when they are decorated (see triton_kernel.INTERPRETED)."""
    return importlib.import_module(_TRITON_MODULE)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 in the environment before oatui_kernels.triton_kernel is "
                "imported, or use backend='torch' (or 'auto')"
            )
        if not _triton_kernel_module().INTERPRETED:
            raise RuntimeError(
                "backend='triton' on CPU tensors: TRITON_INTERPRET=1 is set now, but triton or "
                f"{_TRITON_MODULE} was imported before it was, so the kernels were built for a "
                "GPU; set the variable before triton is first imported (e.g. at process start)"
            )
    return backend


def fused_kl_reward_gae(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float | torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    kl_estimator: str = "k1",
    kl_clamp: float | None = None,
    score_clip: float | None = None,
    whiten: bool = True,
    backend: str = "auto",
) -> KLRewardGAE:
    """KL-penalised per-token rewards, GAE advantages and returns for one rollout batch.

    Args:
        logprobs, ref_logprobs, values: B×T, policy and reference log-probs of the sampled tokens
            and the value head's estimates; float16, bfloat16, float32 or float64.
        scores: B, the reward model's score per sequence.
        mask: B×T, 1 on each row's response tokens, which must form a contiguous prefix
            (right padding); bool, integer or float holding only 0 and 1.
        kl_coef: the KL penalty coefficient (a number or a one-element tensor).
        gamma, lam: GAE discount and λ, both in [0, 1].
        kl_estimator: "k1", "k2" (alias "mse"), "k3" or "abs" on x = logprobs - ref_logprobs.
        kl_clamp: clamp the per-token estimate to [-kl_clamp, kl_clamp] when given.
        score_clip: clip the score to [-score_clip, score_clip] when given.
        whiten: standardise the advantages over all response tokens of the batch.
        backend: "auto" (Triton on CUDA tensors, PyTorch otherwise), "triton" or "torch".

    Returns:
        KLRewardGAE(rewards, advantages, returns, kl_sum), float32, 0 outside the mask.

    Raises:
        ValueError: on bad shapes, dtypes, devices, options, a mask that is not a contiguous
            prefix, an empty batch, or fewer than two response tokens when whitening.
        RuntimeError: for backend="triton" on CPU tensors without TRITON_INTERPRET=1.
    """
    options = check_options(
        kl_coef=kl_coef,
        gamma=gamma,
        lam=lam,
        kl_estimator=kl_estimator,
        kl_clamp=kl_clamp,
        score_clip=score_clip,
        whiten=whiten,
        backend=backend,
    )
    check_tensors(logprobs, ref_logprobs, values, scores, mask)
    chosen = _resolve_backend(options.backend, logprobs.device)
    arguments = dict(
        kl_coef=options.kl_coef,
        gamma=options.gamma,
        lam=options.lam,
        kl_estimator=options.estimator,
        kl_clamp=options.kl_clamp,
        score_clip=options.score_clip,
        whiten=options.whiten,
    )
    # The outputs are targets for the PPO losses, never something to differentiate through.
    with torch.no_grad():
        if chosen == "triton":
            kernels = _triton_kernel_module()
            lengths, total_tokens = kernels.mask_lengths(mask)
            if options.whiten and total_tokens < 2:
                raise too_few_tokens_error(total_tokens)
            return kernels.kl_reward_gae_triton(logprobs, ref_logprobs, values, scores, lengths, **arguments)
        returns = torch.empty(logprobs.shape, dtype=torch.float32, device=logprobs.device)
        mask32, lengths, total_tokens = response_lengths(mask, scratch=returns)
        if options.whiten and total_tokens < 2:
            raise too_few_tokens_error(total_tokens)
        return kl_reward_gae_torch(
            logprobs, ref_logprobs, values, scores, mask32, lengths, total_tokens,
            returns=returns, **arguments,
        )
