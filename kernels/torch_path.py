"""The vectorised PyTorch implementation of the KL-penalised reward + GAE, piece by piece.

No Python loop runs per token. The reverse recurrence y_t = x_t + d·y_{t+1} is solved in chunks
of about ``CHUNK`` tokens: inside a chunk one matmul with the upper-triangular discount matrix
d^(j-i); between chunks the same problem again, one level up, on the chunk starts with discount
d^chunk (so log_chunk(T) matmuls in all, and no Python loop over chunks either). Every power of d
that appears is at most 1, so nothing overflows however long the row: there is no division by
d^t, and powers too small for float32 are flushed to 0 before they become slow denormals.

Speed on CPU comes from a few choices, each measured on the 2-core benchmark machine:
- masks are float 0/1 and applied by multiplying: torch's bool kernels (``where``,
  ``masked_fill``) run about 20 times slower than a float multiply there;
- few passes over memory, in place or into the output buffers (``out=``), with no B×T
  temporaries: a fresh buffer is zeroed by the kernel page by page on first touch, which for an
  8 MiB tensor costs more (about 1.4 ms there) than the arithmetic on it. Working through the
  batch in cache-sized blocks of rows was tried as well and measured no faster.
"""

from __future__ import annotations

import functools

import torch

from .estimators import canonical_estimator, kl_estimate_
from .result import KLRewardGAE

#: Preferred tokens per chunk. The matmul costs 2·chunk flops per token and each level shrinks
#: the problem chunk-fold; 16 measured fastest (8, 32 and 64 slower) on the benchmark machine.
CHUNK = 16

#: Chunk for the levels above the first: they are small, so fewer, larger matmuls cost less
#: than more Python-level steps.
_UPPER_CHUNK = 64

#: Other chunk sizes tried, in order, when CHUNK does not divide the row length, to avoid padding.
_CHUNK_FALLBACKS = (32, 24, 20, 12, 28, 8, 40, 48)

#: Whitening's variance floor, as in trl's masked_whiten.
WHITEN_EPS = 1e-8

#: Powers of the discount below this are set to 0: they cannot move a float32 sum whose terms
#: are not themselves below 1e-30, and as denormals they would slow the matmul down a lot.
_FLUSH_BELOW = 1e-30


def _fp32_matmul_is_exact(device: torch.device) -> bool:
    """False when torch may run float32 matmuls as TF32/bf16 (set_float32_matmul_precision)."""
    try:
        if device.type == "cuda":
            setting = torch.backends.cuda.matmul.fp32_precision
        else:
            setting = torch.backends.mkldnn.matmul.fp32_precision
    except (AttributeError, RuntimeError):
        return False
    return setting in ("none", "ieee")


@functools.lru_cache(maxsize=64)
def _discount_matrices(
    discount: float, size: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, tail) with M[j, i] = d^(j-i) for j >= i (0 below), tail[i] = d^(size-i).

    ``chunk @ M`` sums each position's discounted future within the chunk; ``tail`` carries the
    value at the start of the next chunk back to each position. Built in float64, then cast.
    """
    steps = torch.arange(size, dtype=torch.float64)
    exponent = steps[:, None] - steps[None, :]  # j - i
    powers = torch.where(exponent >= 0, discount ** exponent.clamp(min=0), 0.0)
    tail = discount ** (size - steps)
    powers[powers < _FLUSH_BELOW] = 0.0
    tail[tail < _FLUSH_BELOW] = 0.0
    return powers.to(device=device, dtype=dtype), tail.to(device=device, dtype=dtype)


def _chunk_size(length: int, preferred: int) -> int:
    if length <= preferred:
        return length
    for size in (preferred, *_CHUNK_FALLBACKS):
        if length % size == 0:
            return size
    return preferred  # no divisor found: the row gets padded


def discounted_reverse_cumsum(
    x: torch.Tensor, discount: float, chunk: int = CHUNK, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y[..., t] = x[..., t] + discount · y[..., t + 1] along the last dimension (0 past the end).

    With x = δ and discount = γλ this is GAE. Returns y in x's dtype, written into ``out`` (a
    contiguous tensor of x's shape and dtype, not x itself) when given.
    """
    *leading, length = x.shape
    rows = x.reshape(-1, length)
    size = _chunk_size(length, chunk)
    n_chunks = -(-length // size)
    padded = n_chunks * size
    if padded != length:
        # Zeros at the end of a row add nothing to the values before them.
        rows = torch.nn.functional.pad(rows, (0, padded - length))
    exact = _fp32_matmul_is_exact(x.device) or x.dtype == torch.float64
    matmul_dtype = x.dtype if exact else torch.float64
    within, tail = _discount_matrices(float(discount), size, x.device, matmul_dtype)
    blocks = rows.view(-1, n_chunks, size)
    if out is not None and exact and padded == length:
        result = torch.matmul(blocks, within, out=out.view(-1, n_chunks, size))
    else:
        result = torch.matmul(blocks.to(matmul_dtype), within).to(x.dtype)
    if n_chunks > 1:
        # The value at each chunk start obeys the same recurrence one level up, with d^size.
        starts = discounted_reverse_cumsum(result[:, :, 0], float(discount) ** size, _UPPER_CHUNK)
        next_start = torch.nn.functional.pad(starts[:, 1:], (0, 1))
        result.addcmul_(next_start.unsqueeze(-1), tail.to(x.dtype))
    result = result.view(-1, padded)
    if padded != length:
        result = result[:, :length]
    if out is not None:
        if result.data_ptr() != out.data_ptr():
            out.view(-1, length).copy_(result)
        return out
    return result.contiguous().view(*leading, length)


def float_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as float32 0/1. Masks are applied by multiplying with it because on CPU torch's
    bool kernels (where, masked_fill) run an order of magnitude slower than float arithmetic."""
    return mask if mask.dtype == torch.float32 else mask.to(torch.float32)


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    # Round every input to float32 first, as the Triton kernel does, so both paths agree.
    return tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)


def _finite_or_selected(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x itself when all finite, else x with its padded entries replaced by 0.

    Masking multiplies by 0/1, and inf·0 is NaN: garbage in padded positions (an inf logprob,
    k3 overflowing on a padded token) would leak into the row. One cheap sum tells whether any
    entry is not finite, and only then the slower select runs.
    """
    if bool(torch.isfinite(x.sum())):
        return x
    return torch.where(mask != 0, x, 0.0)


def _response_lengths(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(dim=1).round_().long()


def _empty_like_rows(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)


def _kl_rewards_into(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    lengths: torch.Tensor,
    rewards: torch.Tensor,
    kl_sum: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: str,
    kl_clamp: float | None,
    score_clip: float | None,
) -> None:
    """Rewards and kl_sum into the given float32 buffers; ``mask`` float32, ``lengths`` its row sums."""
    x = torch.sub(_as_float32(logprobs), _as_float32(ref_logprobs), out=rewards)
    k = _finite_or_selected(kl_estimate_(x, kl_estimator, kl_clamp), mask)
    if k is not rewards:
        rewards.copy_(k)  # k3 and the select fallback build new tensors
    rewards.mul_(mask)
    torch.sum(rewards, dim=1, out=kl_sum)
    rewards.mul_(-kl_coef)
    score = _as_float32(scores)
    if score_clip is not None:
        score = score.clamp(-score_clip, score_clip)
    # Rows with no response get nothing; index 0 there only keeps scatter in bounds.
    last = (lengths - 1).clamp_(min=0).unsqueeze(1)
    rewards.scatter_add_(1, last, torch.where(lengths > 0, score, 0.0).unsqueeze(1))


def _gae_into(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> None:
    """Advantages (not whitened) and returns into the given buffers, for float32 rewards that are
    0 outside the float32 ``mask``. The returns buffer holds δ until the advantages are known."""
    values = _finite_or_selected(_as_float32(values), mask)
    # δ_t = r_t - V_t + γ·V_{t+1}, with V taken as 0 from each row's length on (V_L = 0).
    delta = torch.addcmul(rewards, values, mask, value=-1.0, out=returns)
    delta[:, :-1].addcmul_(values[:, 1:], mask[:, 1:], value=gamma)
    discounted_reverse_cumsum(delta, gamma * lam, out=advantages)
    torch.addcmul(advantages, values, mask, out=returns)


def _whiten_(advantages: torch.Tensor, mask: torch.Tensor, count: int, eps: float) -> torch.Tensor:
    """Whiten in place; entries outside the mask must be 0 and stay 0."""
    mean = advantages.sum() / count
    # Subtracting mean·mask leaves the zeros outside the mask alone.
    centered = advantages.addcmul_(mask, mean, value=-1.0)
    flat = centered.view(-1)
    # Two passes (mean, then squared deviations): a large mean cannot cancel the variance away.
    variance = torch.dot(flat, flat) / (count - 1)
    return centered.mul_(torch.rsqrt(variance + eps))


def kl_penalized_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: str = "k1",
    kl_clamp: float | None = None,
    score_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards B×T, kl_sum B) in float32.

    rewards = -kl_coef·k on the response tokens (``mask``, a contiguous prefix per row), plus the
    score, clipped to ±score_clip when given, on each row's last response token; 0 elsewhere.
    """
    mask = float_mask(mask)
    rewards = _empty_like_rows(logprobs)
    kl_sum = torch.empty(logprobs.shape[0], dtype=torch.float32, device=logprobs.device)
    _kl_rewards_into(
        logprobs, ref_logprobs, scores, mask, _response_lengths(mask), rewards, kl_sum,
        kl_coef=kl_coef, kl_estimator=canonical_estimator(kl_estimator),
        kl_clamp=kl_clamp, score_clip=score_clip,
    )
    return rewards, kl_sum


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) B×T in float32, 0 outside the mask; returns = advantages + values.

    δ_t = r_t + γ·V_{t+1} - V_t with V_L = 0 past a row's last response token, and
    A_t = δ_t + γλ·A_{t+1}. ``mask`` must be a contiguous prefix per row.
    """
    mask = float_mask(mask)
    rewards = _finite_or_selected(_as_float32(rewards), mask) * mask
    advantages, returns = _empty_like_rows(rewards), _empty_like_rows(rewards)
    _gae_into(rewards, values, mask, advantages, returns, gamma=gamma, lam=lam)
    return advantages, returns


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (var with Bessel's correction), 0 elsewhere.

    Fewer than two masked entries is a ValueError.
    """
    mask = float_mask(mask)
    count = int(mask.sum())
    if count < 2:
        raise ValueError(f"whitening needs at least two masked tokens, got {count}")
    selected = _finite_or_selected(_as_float32(x), mask) * mask
    return _whiten_(selected, mask, count, eps)


def kl_reward_gae_torch(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    lengths: torch.Tensor,
    total_tokens: int,
    *,
    kl_coef: float,
    gamma: float,
    lam: float,
    kl_estimator: str,
    kl_clamp: float | None,
    score_clip: float | None,
    whiten: bool,
    returns: torch.Tensor | None = None,
) -> KLRewardGAE:
    """The whole computation on validated inputs: ``mask`` float32 0/1 with contiguous prefixes,
    ``lengths`` its row sums (int64) and ``total_tokens`` their total. ``returns``, when given,
    is the float32 B×T buffer to write the returns into.

    Every B×T intermediate lives in one of the three output buffers; the only fresh memory is
    theirs.
    """
    rewards, advantages = _empty_like_rows(logprobs), _empty_like_rows(logprobs)
    if returns is None:
        returns = _empty_like_rows(logprobs)
    kl_sum = torch.empty(logprobs.shape[0], dtype=torch.float32, device=logprobs.device)
    _kl_rewards_into(
        logprobs, ref_logprobs, scores, mask, lengths, rewards, kl_sum,
        kl_coef=kl_coef, kl_estimator=kl_estimator, kl_clamp=kl_clamp, score_clip=score_clip,
    )
    _gae_into(rewards, values, mask, advantages, returns, gamma=gamma, lam=lam)
    if whiten:
        _whiten_(advantages, mask, total_tokens, WHITEN_EPS)
    return KLRewardGAE(rewards, advantages, returns, kl_sum)
