"""The OpenAI Triton kernels for the fused KL-penalised reward + GAE (+ whitening).

First ``_mask_kernel`` reads the mask once: response lengths, and per row whether it holds
anything but 0 and 1 or a 1 after a 0; one small read-back turns those into ValueErrors. Then
three launches, with no host synchronisation between them:

1. ``_rows_kernel``: one program per block of ``ROWS`` rows. It walks each row in chunks of
   ``BLOCK_T`` tokens from the end of the row towards its start, reading logprobs, ref_logprobs
   and values once (any float dtype, upcast to float32 in registers), and writes rewards,
   advantages (not yet whitened), returns and kl_sum. Inside a chunk the reverse recurrence
   A_t = δ_t + γλ·A_{t+1} is a *forward* ``tl.associative_scan`` over the chunk's tokens loaded
   in reverse order (``associative_scan(reverse=True)`` has an open bug on GPUs); between chunks
   a per-row scalar carries A at the chunk's first token to the chunk before it. The scan
   combines pairs (a, b), meaning y -> a·y + b, so no power (γλ)^t is ever formed outside a
   chunk and nothing can overflow or underflow on long rows.
   For whitening it also leaves each row's mean and centred sum of squares of its advantages,
   merged chunk by chunk with Chan's formula (no sum-of-squares cancellation in float32).
2. ``_whitening_stats_kernel``: a single program merges the per-row statistics (again Chan's
   formula, two passes over the rows) into the batch mean and 1/sqrt(var + 1e-8).
3. ``_whiten_kernel``: normalises the advantages in place, response tokens only.

Whether the kernels run compiled or under the interpreter is decided when they are decorated,
and for triton's own library of jit functions (``tl.zeros``, ``tl.sum``, ...) when triton is first
imported: ``TRITON_INTERPRET=1`` must be set before both. ``INTERPRETED`` records whether it was.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .estimators import K3_SERIES_BOUND, K3_SERIES_COEFFICIENTS, estimator_code
from .result import KLRewardGAE
from .validation import not_binary_error, not_prefix_error

#: Longest chunk a program processes at once, and the tile size the launcher aims for.
MAX_BLOCK_T = 1024
TILE_ELEMENTS = 1024
#: Rows per step in the single-program statistics kernel.
STATS_BLOCK_ROWS = 1024
WHITEN_EPS = 1e-8

# Globals read inside @triton.jit functions must be constexpr.
_C2, _C3, _C4, _C5, _C6, _C7, _C8 = (tl.constexpr(c) for c in K3_SERIES_COEFFICIENTS)
_K3_SERIES_BOUND = tl.constexpr(K3_SERIES_BOUND)


@triton.jit
def _affine_combine(a_first, b_first, a_second, b_second):
    # Applying y -> a_first·y + b_first, then y -> a_second·y + b_second.
    return a_first * a_second, b_first * a_second + b_second


@triton.jit
def _kl_estimate(x, ESTIMATOR: tl.constexpr):
    if ESTIMATOR == 0:  # k1
        k = x
    elif ESTIMATOR == 1:  # k2 / mse
        k = 0.5 * x * x
    elif ESTIMATOR == 2:  # k3, series near 0 where the closed form cancels (see estimators.py)
        y = -x
        series = _C8 * y + _C7
        series = series * y + _C6
        series = series * y + _C5
        series = series * y + _C4
        series = series * y + _C3
        series = series * y + _C2
        series = series * y * y
        k = tl.where(tl.abs(x) < _K3_SERIES_BOUND, series, tl.exp(y) - 1.0 + x)
    else:  # abs
        k = tl.abs(x)
    return k


@triton.jit
def _mask_kernel(
    mask_ptr, lengths_ptr, problems_ptr, n_rows, n_tokens, stride_mask,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = row < n_rows
    row_start = mask_ptr + row.to(tl.int64)[:, None] * stride_mask
    count = tl.zeros([ROWS], dtype=tl.int32)
    not_binary = tl.zeros([ROWS], dtype=tl.int32)
    rises = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, n_tokens, BLOCK_T):
        token = (start + tl.arange(0, BLOCK_T))[None, :]
        inside = (token < n_tokens) & row_ok[:, None]
        # Compared in the mask's own dtype: a float64 1 - 1e-12 must not round to 1 first.
        value = tl.load(row_start + token, mask=inside, other=0)
        previous = tl.load(row_start + token - 1, mask=inside & (token > 0), other=1)
        is_set = value != 0
        count += tl.sum(is_set.to(tl.int32), axis=1)
        not_binary = tl.maximum(not_binary, tl.max((is_set & (value != 1)).to(tl.int32), axis=1))
        rises = tl.maximum(rises, tl.max(((previous == 0) & is_set).to(tl.int32), axis=1))
    tl.store(lengths_ptr + row, count, mask=row_ok)
    tl.store(problems_ptr + row, not_binary + 2 * rises, mask=row_ok)


@triton.jit
def _rows_kernel(
    logprobs_ptr, ref_logprobs_ptr, values_ptr, scores_ptr, lengths_ptr,
    rewards_ptr, advantages_ptr, returns_ptr, kl_sum_ptr, row_mean_ptr, row_m2_ptr,
    n_rows, n_tokens,
    stride_logprobs, stride_ref_logprobs, stride_values, stride_out,
    kl_coef, gamma, gamma_lam, kl_clamp, score_clip,
    ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_CLIP: tl.constexpr,
    COMPUTE_STATS: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = row < n_rows
    length = tl.load(lengths_ptr + row, mask=row_ok, other=0)
    score = tl.load(scores_ptr + row, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_CLIP:
        score = tl.minimum(tl.maximum(score, -score_clip), score_clip)
    row64 = row.to(tl.int64)[:, None]
    # Position j of a chunk holds token start + BLOCK_T - 1 - j: the chunk is read backwards.
    backwards = BLOCK_T - 1 - tl.arange(0, BLOCK_T)
    first_token = backwards == 0  # the chunk's first token sits at the end of the scan

    carry = tl.zeros([ROWS], dtype=tl.float32)  # A at the first token of the chunk after this one
    kl_total = tl.zeros([ROWS], dtype=tl.float32)
    count = tl.zeros([ROWS], dtype=tl.float32)
    mean = tl.zeros([ROWS], dtype=tl.float32)
    m2 = tl.zeros([ROWS], dtype=tl.float32)
    discount = tl.full([ROWS, BLOCK_T], gamma_lam, tl.float32)

    n_chunks = tl.cdiv(n_tokens, BLOCK_T)
    for chunk in range(n_chunks):
        start = (n_chunks - 1 - chunk) * BLOCK_T
        token = (start + backwards)[None, :]
        in_row = (token < n_tokens) & row_ok[:, None]
        response = token < length[:, None]  # implies in_row: length <= n_tokens, 0 past n_rows
        next_response = token + 1 < length[:, None]

        logprob = tl.load(logprobs_ptr + row64 * stride_logprobs + token, mask=response, other=0.0)
        ref_logprob = tl.load(ref_logprobs_ptr + row64 * stride_ref_logprobs + token, mask=response, other=0.0)
        value = tl.load(values_ptr + row64 * stride_values + token, mask=response, other=0.0).to(tl.float32)
        next_value = tl.load(values_ptr + row64 * stride_values + token + 1, mask=next_response, other=0.0)
        next_value = next_value.to(tl.float32)

        k = _kl_estimate(logprob.to(tl.float32) - ref_logprob.to(tl.float32), ESTIMATOR)
        if HAS_CLAMP:
            k = tl.minimum(tl.maximum(k, -kl_clamp), kl_clamp)
        k = tl.where(response, k, 0.0)
        kl_total += tl.sum(k, axis=1)
        reward = -kl_coef * k + tl.where(token == length[:, None] - 1, score[:, None], 0.0)
        delta = tl.where(response, reward + gamma * next_value - value, 0.0)

        # Prefix j of the scan is the map y -> a_j·y + b_j taking A after the chunk to A at j.
        a_prefix, b_prefix = tl.associative_scan((discount, delta), 1, _affine_combine)
        advantage = b_prefix + a_prefix * carry[:, None]
        carry = tl.sum(tl.where(first_token[None, :], advantage, 0.0), axis=1)

        out_offsets = row64 * stride_out + token
        tl.store(rewards_ptr + out_offsets, reward, mask=in_row)
        tl.store(advantages_ptr + out_offsets, advantage, mask=in_row)
        tl.store(returns_ptr + out_offsets, tl.where(response, advantage + value, 0.0), mask=in_row)

        if COMPUTE_STATS:
            # Chan et al.: merge this chunk's (count, mean, M2) into the row's running ones.
            chunk_count = tl.sum(response.to(tl.float32), axis=1)
            chunk_mean = tl.sum(advantage, axis=1) / tl.maximum(chunk_count, 1.0)
            deviation = tl.where(response, advantage - chunk_mean[:, None], 0.0)
            chunk_m2 = tl.sum(deviation * deviation, axis=1)
            merged = count + chunk_count
            weight = chunk_count / tl.maximum(merged, 1.0)
            shift = chunk_mean - mean
            mean += shift * weight
            m2 += chunk_m2 + shift * shift * count * weight
            count = merged

    tl.store(kl_sum_ptr + row, kl_total, mask=row_ok)
    if COMPUTE_STATS:
        tl.store(row_mean_ptr + row, mean, mask=row_ok)
        tl.store(row_m2_ptr + row, m2, mask=row_ok)


@triton.jit
def _whitening_stats_kernel(
    lengths_ptr, row_mean_ptr, row_m2_ptr, stats_ptr, n_rows, eps, BLOCK_R: tl.constexpr
):
    offsets = tl.arange(0, BLOCK_R)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    weighted = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_R):
        row = start + offsets
        row_ok = row < n_rows
        count = tl.load(lengths_ptr + row, mask=row_ok, other=0).to(tl.float32)
        total += count
        weighted += count * tl.load(row_mean_ptr + row, mask=row_ok, other=0.0)
    n = tl.sum(total, axis=0)
    mean = tl.sum(weighted, axis=0) / n
    spread = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_R):
        row = start + offsets
        row_ok = row < n_rows
        count = tl.load(lengths_ptr + row, mask=row_ok, other=0).to(tl.float32)
        shift = tl.load(row_mean_ptr + row, mask=row_ok, other=0.0) - mean
        spread += tl.load(row_m2_ptr + row, mask=row_ok, other=0.0) + count * shift * shift
    variance = tl.sum(spread, axis=0) / (n - 1.0)
    tl.store(stats_ptr, mean)
    tl.store(stats_ptr + 1, 1.0 / tl.sqrt_rn(variance + eps))


@triton.jit
def _whiten_kernel(
    advantages_ptr, lengths_ptr, stats_ptr, n_rows, stride,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    token = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T))[None, :]
    length = tl.load(lengths_ptr + row, mask=row < n_rows, other=0)
    response = token < length[:, None]  # outside the mask the advantages are 0 already
    offsets = row.to(tl.int64)[:, None] * stride + token
    mean = tl.load(stats_ptr)
    scale = tl.load(stats_ptr + 1)
    advantage = tl.load(advantages_ptr + offsets, mask=response, other=0.0)
    tl.store(advantages_ptr + offsets, (advantage - mean) * scale, mask=response)


def _is_interpreted(function: object) -> bool:
    return type(function).__name__ == "InterpretedFunction"


#: True when both these kernels and triton's own jit library were decorated for the interpreter.
#: An interpreted kernel calling triton's compiled-mode helpers fails inside the interpreter.
INTERPRETED: bool = _is_interpreted(_rows_kernel) and _is_interpreted(tl.standard.zeros)


def _tile(n_rows: int, n_tokens: int, block_t: int | None) -> tuple[int, int]:
    """(ROWS, BLOCK_T): chunks up to MAX_BLOCK_T tokens; short rows are stacked to fill a tile."""
    if block_t is None:
        block_t = min(triton.next_power_of_2(n_tokens), MAX_BLOCK_T)
    block_t = max(block_t, 16)
    rows = max(1, min(TILE_ELEMENTS // block_t, triton.next_power_of_2(n_rows)))
    return rows, block_t


def _row_major(tensor: torch.Tensor) -> torch.Tensor:
    # Rows may be strided (a slice of a wider buffer); tokens must be adjacent.
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def mask_lengths(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-row response lengths (int32) and their total, after checking that ``mask`` holds only
    0 and 1 with the ones on a contiguous prefix of each row; ValueError otherwise."""
    n_rows, n_tokens = mask.shape
    mask = _row_major(mask)
    lengths = torch.empty(n_rows, dtype=torch.int32, device=mask.device)
    problems = torch.empty_like(lengths)
    rows, block = _tile(n_rows, n_tokens, None)
    _mask_kernel[(triton.cdiv(n_rows, rows),)](
        mask, lengths, problems, n_rows, n_tokens, mask.stride(0),
        ROWS=rows, BLOCK_T=block, num_warps=4 if rows * block >= 512 else 2,
    )
    # The one host synchronisation of the Triton path.
    worst, total = torch.stack([problems.amax().long(), lengths.sum(dtype=torch.int64)]).tolist()
    if worst & 1:
        raise not_binary_error()
    if worst & 2:
        raise not_prefix_error(int(((problems & 2) != 0).nonzero()[0]))
    return lengths, int(total)


def kl_reward_gae_triton(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    lengths: torch.Tensor,
    *,
    kl_coef: float,
    gamma: float,
    lam: float,
    kl_estimator: str,
    kl_clamp: float | None,
    score_clip: float | None,
    whiten: bool,
    block_t: int | None = None,
) -> KLRewardGAE:
    """Launch the kernels on validated inputs; ``lengths`` are the per-row response lengths.

    ``block_t`` (a power of two, at least 16) overrides the chunk length; tests use it to run
    rows longer than one chunk with small shapes.
    """
    n_rows, n_tokens = logprobs.shape
    device = logprobs.device
    logprobs, ref_logprobs, values = (_row_major(t) for t in (logprobs, ref_logprobs, values))
    scores = scores.contiguous()
    lengths = lengths.to(device=device, dtype=torch.int32).contiguous()
    rewards, advantages, returns = (
        torch.empty(n_rows, n_tokens, dtype=torch.float32, device=device) for _ in range(3)
    )
    kl_sum = torch.empty(n_rows, dtype=torch.float32, device=device)
    row_mean = torch.empty(n_rows if whiten else 1, dtype=torch.float32, device=device)
    row_m2 = torch.empty_like(row_mean)

    rows, block = _tile(n_rows, n_tokens, block_t)
    num_warps = 4 if rows * block >= 512 else 2
    _rows_kernel[(triton.cdiv(n_rows, rows),)](
        logprobs, ref_logprobs, values, scores, lengths,
        rewards, advantages, returns, kl_sum, row_mean, row_m2,
        n_rows, n_tokens,
        logprobs.stride(0), ref_logprobs.stride(0), values.stride(0), rewards.stride(0),
        float(kl_coef), float(gamma), float(gamma * lam),
        float(kl_clamp or 0.0), float(score_clip or 0.0),
        ESTIMATOR=estimator_code(kl_estimator),
        HAS_CLAMP=kl_clamp is not None,
        HAS_CLIP=score_clip is not None,
        COMPUTE_STATS=whiten,
        ROWS=rows,
        BLOCK_T=block,
        num_warps=num_warps,
    )
    if whiten:
        stats = torch.empty(2, dtype=torch.float32, device=device)
        _whitening_stats_kernel[(1,)](
            lengths, row_mean, row_m2, stats, n_rows, WHITEN_EPS,
            BLOCK_R=min(STATS_BLOCK_ROWS, triton.next_power_of_2(n_rows)),
            num_warps=4,
        )
        _whiten_kernel[(triton.cdiv(n_rows, rows), triton.cdiv(n_tokens, block))](
            advantages, lengths, stats, n_rows, advantages.stride(0),
            ROWS=rows, BLOCK_T=block, num_warps=num_warps,
        )
    return KLRewardGAE(rewards, advantages, returns, kl_sum)
