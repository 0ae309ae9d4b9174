"""The fused KL-penalised reward + GAE: the PyTorch path and the public API against the float64
reference, input checks, dtypes, and the pieces on their own.

The Triton kernel under the interpreter is tested in test_kernel_triton.py.

Relative error, used throughout: for each output, max |ours - reference| / max(1, max |reference|).
The max(1, ·) keeps outputs that are near 0 everywhere (a kl_sum of tiny estimates) from turning
float32 rounding into a large ratio, while outputs of size > 1 are compared relatively.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oatui_kernels
from helpers import TRITON_KERNEL_MODULE, forget_triton_kernel_module
from oatui_kernels import (
    KLRewardGAE,
    discounted_reverse_cumsum,
    fused_kl_reward_gae,
    gae,
    kl_estimate,
    kl_penalized_rewards,
    masked_whiten,
    reference_kl_reward_gae,
)
from oatui_kernels import fused as fused_module
from oatui_kernels import torch_path

TOLERANCE = 1e-5
OUTPUTS = KLRewardGAE._fields


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max(1, max |reference|), in float64."""
    reference = reference.double()
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    return (ours.double() - reference).abs().max().item() / scale if reference.numel() else 0.0


def assert_matches(ours: KLRewardGAE, reference: KLRewardGAE, tolerance: float = TOLERANCE) -> None:
    for name, a, b in zip(OUTPUTS, ours, reference):
        assert a.dtype == torch.float32, f"{name} is {a.dtype}"
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        error = relative_error(a, b)
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


def make_batch(
    lengths: list[int],
    tokens: int,
    *,
    seed: int = 0,
    smooth_values: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Random (logprobs, ref_logprobs, values, scores, mask) with the given response lengths.

    ``smooth_values`` makes the values a slow random walk, as a value head produces, instead of
    independent draws per token.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    logprobs = -3 * torch.rand(batch, tokens, generator=generator)
    ref_logprobs = logprobs + 0.3 * torch.randn(batch, tokens, generator=generator)
    if smooth_values:
        steps = 0.05 * torch.randn(batch, tokens, generator=generator)
        values = torch.randn(batch, 1, generator=generator) + steps.cumsum(dim=1)
    else:
        values = torch.randn(batch, tokens, generator=generator)
    scores = 2 * torch.randn(batch, generator=generator)
    mask = torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]
    return logprobs, ref_logprobs, values, scores, mask


def mixed_lengths(tokens: int, seed: int) -> list[int]:
    """Rows of length T, 0, 1 and in between (two of them random)."""
    rng = np.random.default_rng(seed)
    middle = [int(n) for n in rng.integers(2, max(tokens, 3), size=2)] if tokens > 2 else [tokens, tokens]
    return [tokens, 0, 1, *middle, max(tokens - 1, 0)]


# Row lengths below, equal to and above the torch path's chunk (16), a length that no candidate
# chunk divides (37: padded), and one that needs two levels of chunk starts (300).
GRID_TOKENS = (7, torch_path.CHUNK, 37, 300)
ESTIMATORS = ("k1", "k2", "mse", "k3", "abs")


@pytest.mark.parametrize("tokens", GRID_TOKENS)
@pytest.mark.parametrize(
    "estimator, kl_clamp, score_clip, whiten, gamma, lam",
    list(itertools.product(ESTIMATORS, (None, 0.2), (None, 1.0), (True, False), (1.0, 0.99), (1.0, 0.95))),
)
def test_torch_path_matches_reference(estimator, kl_clamp, score_clip, whiten, gamma, lam, tokens):
    """Every estimator, clamp on/off, clip on/off, whitening on/off, γ ∈ {1, .99}, λ ∈ {1, .95},
    rows of length 0, 1, T and in between: relative error ≤ 1e-5 against float64."""
    seed = zlib.crc32(repr((estimator, kl_clamp, score_clip, whiten, gamma, lam, tokens)).encode())
    inputs = make_batch(mixed_lengths(tokens, seed), tokens, seed=seed)
    options = dict(kl_coef=0.1, gamma=gamma, lam=lam, kl_estimator=estimator, kl_clamp=kl_clamp,
                   score_clip=score_clip, whiten=whiten)
    ours = fused_kl_reward_gae(*inputs, **options, backend="torch")
    assert_matches(ours, reference_kl_reward_gae(*inputs, **options))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    lengths=st.lists(st.integers(0, 90), min_size=1, max_size=7),
    extra=st.integers(0, 40),
    gamma=st.sampled_from([0.0, 0.5, 0.99, 1.0]),
    lam=st.sampled_from([0.0, 0.9, 1.0]),
    estimator=st.sampled_from(ESTIMATORS),
    whiten=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_torch_path_matches_reference_on_random_shapes(lengths, extra, gamma, lam, estimator, whiten, seed):
    """Random batch sizes, row lengths and padding, including γ or λ of 0."""
    tokens = max(lengths) + extra
    if tokens == 0 or (whiten and sum(lengths) < 2):
        return
    inputs = make_batch(lengths, tokens, seed=seed)
    options = dict(kl_coef=0.05, gamma=gamma, lam=lam, kl_estimator=estimator, whiten=whiten)
    assert_matches(fused_kl_reward_gae(*inputs, **options, backend="torch"),
                   reference_kl_reward_gae(*inputs, **options))


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95)])
@pytest.mark.parametrize("whiten", [True, False])
def test_torch_path_long_rows(gamma, lam, whiten):
    """T = 4096 (and rows of 4095, 1 and 0). Values are a smooth walk as a value head gives: with
    independent N(0, 1) values per token, the float32 rounding of δ alone adds up to about 5e-6
    over 4096 tokens, as it does in the classic float32 loop."""
    inputs = make_batch([4096, 4095, 1, 0], 4096, seed=7, smooth_values=True)
    options = dict(kl_coef=0.05, gamma=gamma, lam=lam, kl_estimator="k3", whiten=whiten)
    assert_matches(fused_kl_reward_gae(*inputs, **options, backend="torch"),
                   reference_kl_reward_gae(*inputs, **options))


def test_whitening_cancels_a_large_mean():
    """Advantages with a mean far above their spread still whiten accurately (two-pass variance)."""
    logprobs, ref_logprobs, values, scores, mask = make_batch([64] * 8, 64, seed=11)
    scores = scores + 1000.0
    options = dict(kl_coef=0.01, gamma=1.0, lam=1.0)
    ours = fused_kl_reward_gae(logprobs, ref_logprobs, values, scores, mask, **options, backend="torch")
    reference = reference_kl_reward_gae(logprobs, ref_logprobs, values, scores, mask, **options)
    assert relative_error(ours.advantages, reference.advantages) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_torch_path_accepts_other_float_dtypes(dtype):
    """Inputs are rounded to float32 and computed in float32; outputs are float32."""
    inputs = make_batch([40, 13, 0, 1], 40, seed=5)
    inputs = tuple(t.to(dtype) for t in inputs[:4]) + (inputs[4],)
    options = dict(kl_coef=0.1, gamma=0.99, lam=0.95, kl_estimator="k3")
    ours = fused_kl_reward_gae(*inputs, **options, backend="torch")
    assert_matches(ours, reference_kl_reward_gae(*inputs, **options))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.uint8, torch.float32, torch.float64, torch.float16])
def test_mask_dtypes_agree(mask_dtype):
    inputs = make_batch([20, 5, 0, 19], 20, seed=2)
    expected = fused_kl_reward_gae(*inputs, kl_coef=0.1, backend="torch")
    ours = fused_kl_reward_gae(*inputs[:4], inputs[4].to(mask_dtype), kl_coef=0.1, backend="torch")
    for name, a, b in zip(OUTPUTS, ours, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_outputs_are_zero_outside_the_mask_and_fresh_float32():
    logprobs, ref_logprobs, values, scores, mask = make_batch([30, 4, 0], 30, seed=9)
    logprobs.requires_grad_(True)
    out = fused_kl_reward_gae(logprobs, ref_logprobs, values, scores, mask, kl_coef=0.1)
    for name, tensor in zip(("rewards", "advantages", "returns"), out[:3]):
        assert tensor.dtype == torch.float32 and tensor.is_contiguous(), name
        assert not tensor.requires_grad, name
        assert (tensor[~mask] == 0).all(), name
    assert out.kl_sum[2] == 0
    whitened = out.advantages[mask]
    assert abs(whitened.mean().item()) < 1e-5
    assert abs(whitened.std().item() - 1) < 1e-4


def test_score_lands_on_the_last_response_token():
    """The score is added on token L-1 itself (not the slot after it), clipped when asked."""
    tokens = 6
    zeros = torch.zeros(3, tokens)
    mask = torch.arange(tokens)[None, :] < torch.tensor([6, 2, 0])[:, None]
    scores = torch.tensor([5.0, -7.0, 3.0])
    out = fused_kl_reward_gae(zeros, zeros, zeros, scores, mask, kl_coef=0.1, score_clip=4.0, whiten=False,
                              gamma=1.0, lam=1.0)
    expected = torch.zeros(3, tokens)
    expected[0, 5] = 4.0
    expected[1, 1] = -4.0
    torch.testing.assert_close(out.rewards, expected)
    # With γ = λ = 1 and zero values, a response token's advantage is its row's clipped score.
    expected_advantages = torch.zeros(3, tokens)
    expected_advantages[0] = 4.0
    expected_advantages[1, :2] = -4.0
    torch.testing.assert_close(out.advantages, expected_advantages)


@pytest.mark.parametrize("garbage", [math.inf, -math.inf, math.nan, 1e30, -1e30])
@pytest.mark.parametrize("where", ["logprobs", "ref_logprobs", "values"])
def test_padding_garbage_does_not_leak(garbage, where):
    """inf, NaN or huge numbers in the padded positions of one input change nothing (k3 would
    overflow on them, and inf·0 is NaN)."""
    inputs = dict(zip(("logprobs", "ref_logprobs", "values", "scores", "mask"), make_batch([25, 10, 0, 3], 25, seed=4)))
    expected = fused_kl_reward_gae(**inputs, kl_coef=0.1, kl_estimator="k3")
    inputs[where][~inputs["mask"]] = garbage
    out = fused_kl_reward_gae(**inputs, kl_coef=0.1, kl_estimator="k3")
    for name, a, b in zip(OUTPUTS, out, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_kl_coef_may_be_a_tensor_or_an_int():
    inputs = make_batch([12, 7], 12, seed=1)
    as_float = fused_kl_reward_gae(*inputs, kl_coef=2.0)
    for coef in (torch.tensor(2.0), torch.tensor([2.0]), 2, np.float32(2.0)):
        for a, b in zip(fused_kl_reward_gae(*inputs, kl_coef=coef), as_float):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_backend_uses_torch_for_cpu_tensors(monkeypatch):
    def no_triton():
        raise AssertionError("backend='auto' imported the Triton module for CPU tensors")

    monkeypatch.setattr(fused_module, "_triton_kernel_module", no_triton)
    inputs = make_batch([10, 3], 10)
    out = fused_kl_reward_gae(*inputs, kl_coef=0.1, backend="auto")
    expected = fused_kl_reward_gae(*inputs, kl_coef=0.1, backend="torch")
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fused_module._resolve_backend("auto", torch.device("cpu")) == "torch"
    assert fused_module._resolve_backend("auto", torch.device("cuda", 0)) == "triton"


def test_triton_on_cpu_without_the_interpreter_says_so(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_kl_reward_gae(*make_batch([4, 2], 4), kl_coef=0.1, backend="triton")


def test_triton_imported_before_the_interpreter_variable_says_so(monkeypatch):
    """TRITON_INTERPRET=1 set after triton was imported cannot work (triton's own jit library is
    already built for GPUs): a clear RuntimeError, not a failure deep inside the interpreter."""
    triton = pytest.importorskip("triton")
    if type(triton.language.standard.zeros).__name__ == "InterpretedFunction":
        pytest.skip("triton was imported under TRITON_INTERPRET=1 in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(sys.modules, TRITON_KERNEL_MODULE, raising=False)
    try:
        with pytest.raises(RuntimeError, match="imported before"):
            fused_kl_reward_gae(*make_batch([4, 2], 4), kl_coef=0.1, backend="triton")
    finally:
        forget_triton_kernel_module()  # built half for the interpreter: nobody else should get it


# --- input checks ------------------------------------------------------------------------------

def _good() -> tuple[torch.Tensor, ...]:
    return make_batch([5, 3, 1], 5)


def _call(*inputs: torch.Tensor, **options) -> KLRewardGAE:
    return fused_kl_reward_gae(*inputs, **{"kl_coef": 0.1, **options})


@pytest.mark.parametrize("position, name", [(1, "ref_logprobs"), (2, "values"), (4, "mask")])
def test_shape_mismatch_names_the_argument_and_both_shapes(position, name):
    inputs = list(_good())
    inputs[position] = inputs[position][:, :4]
    with pytest.raises(ValueError, match=rf"{name} has shape \(3, 4\) but logprobs has shape \(3, 5\)"):
        _call(*inputs)


def test_scores_shape_is_checked():
    logprobs, ref_logprobs, values, scores, mask = _good()
    with pytest.raises(ValueError, match=r"scores has shape \(3, 1\) but logprobs has shape \(3, 5\)"):
        _call(logprobs, ref_logprobs, values, scores[:, None], mask)
    with pytest.raises(ValueError, match=r"scores has shape \(2,\)"):
        _call(logprobs, ref_logprobs, values, scores[:2], mask)


def test_logprobs_must_be_two_dimensional():
    logprobs, ref_logprobs, values, scores, mask = _good()
    with pytest.raises(ValueError, match=r"logprobs must be 2-D"):
        _call(logprobs[0], ref_logprobs[0], values[0], scores, mask[0])


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_batch(shape):
    empty = torch.zeros(shape)
    with pytest.raises(ValueError, match="empty batch"):
        _call(empty, empty, empty, torch.zeros(shape[0]), empty, whiten=False)


@pytest.mark.parametrize(
    "rows, row",
    [
        ([[0, 1, 1, 1, 1]], 0),  # left padding
        ([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0]], 1),  # a hole
        ([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 1]], 2),  # a stray last token
    ],
)
def test_mask_must_be_a_contiguous_prefix(rows, row):
    mask = torch.tensor(rows)
    batch = mask.shape[0]
    inputs = make_batch([5] * batch, 5)[:4]
    with pytest.raises(ValueError, match=rf"contiguous prefix.*row {row} has a 1 after a 0"):
        _call(*inputs, mask)


@pytest.mark.parametrize("bad", [2.0, 0.5, -1.0, math.nan])
def test_mask_must_be_binary(bad):
    logprobs, ref_logprobs, values, scores, mask = _good()
    mask = mask.float()
    mask[0, 0] = bad
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        _call(logprobs, ref_logprobs, values, scores, mask)


def test_float64_mask_just_below_one_is_not_binary():
    logprobs, ref_logprobs, values, scores, mask = _good()
    mask = mask.double()
    mask[0, 0] = 1 - 1e-12  # would round to 1.0 in float32
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        _call(logprobs, ref_logprobs, values, scores, mask)


@pytest.mark.parametrize("lengths", [[0, 0, 0], [1, 0, 0]])
def test_whitening_needs_two_tokens(lengths):
    inputs = make_batch(lengths, 4)
    with pytest.raises(ValueError, match="at least two response tokens"):
        _call(*inputs)
    out = _call(*inputs, whiten=False)  # without whitening a near-empty batch is fine
    assert out.rewards.shape == (3, 4)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(kl_estimator="k4"), "unknown kl_estimator 'k4'"),
        (dict(backend="cuda"), "unknown backend 'cuda'"),
        (dict(gamma=1.5), r"gamma must be in \[0, 1\]"),
        (dict(gamma=-0.1), r"gamma must be in \[0, 1\]"),
        (dict(lam=1.01), r"lam must be in \[0, 1\]"),
        (dict(lam=math.nan), "lam must be finite"),
        (dict(kl_clamp=-1.0), "kl_clamp must be >= 0"),
        (dict(score_clip=-0.5), "score_clip must be >= 0"),
        (dict(kl_coef=math.inf), "kl_coef must be finite"),
        (dict(kl_coef="high"), "kl_coef must be a number"),
        (dict(kl_coef=torch.ones(2)), "kl_coef must be a number or a one-element tensor"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        _call(*_good(), **options)


def test_integer_logprobs_are_refused():
    logprobs, ref_logprobs, values, scores, mask = _good()
    with pytest.raises(ValueError, match="logprobs must be float16, bfloat16, float32 or float64"):
        _call(logprobs.long(), ref_logprobs, values, scores, mask)


def test_devices_must_match():
    logprobs, ref_logprobs, values, scores, mask = _good()
    with pytest.raises(ValueError, match="values is on meta but logprobs is on cpu"):
        _call(logprobs, ref_logprobs, values.to("meta"), scores, mask)


# --- the pieces ----------------------------------------------------------------------------------

def test_kl_estimators_by_formula():
    x = torch.linspace(-3, 3, 61, dtype=torch.float64).float()
    xd = x.double()
    torch.testing.assert_close(kl_estimate(x, "k1"), x)
    torch.testing.assert_close(kl_estimate(x, "k2"), x * x / 2)
    torch.testing.assert_close(kl_estimate(x, "mse"), x * x / 2)
    torch.testing.assert_close(kl_estimate(x, "k3").double(), torch.expm1(-xd) + xd, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(kl_estimate(x, "abs"), x.abs())
    torch.testing.assert_close(kl_estimate(x, "k1", clamp=0.5), x.clamp(-0.5, 0.5))
    assert kl_estimate(x, "k3").min() >= 0
    assert torch.equal(x, torch.linspace(-3, 3, 61, dtype=torch.float64).float())  # input untouched


def test_k3_is_accurate_when_the_policy_is_close_to_the_reference():
    """exp(-x) - 1 + x in float32 loses everything near 0; the series keeps ~float32 precision."""
    x = torch.tensor([1e-6, -1e-5, 3e-4, -2e-3, 0.05, -0.3, 0.49, -0.51, 0.7, 4.0])
    exact = torch.expm1(-x.double()) + x.double()
    relative = ((kl_estimate(x, "k3").double() - exact) / exact).abs().max().item()
    assert relative < 1e-5


def test_unknown_estimator_in_kl_estimate():
    with pytest.raises(ValueError, match="unknown kl_estimator"):
        kl_estimate(torch.zeros(3), "kl")


def _reverse_cumsum_loop(x: torch.Tensor, discount: float) -> torch.Tensor:
    out = torch.zeros_like(x, dtype=torch.float64)
    running = torch.zeros(x.shape[:-1], dtype=torch.float64)
    for t in reversed(range(x.shape[-1])):
        running = x[..., t].double() + discount * running
        out[..., t] = running
    return out


@pytest.mark.parametrize("discount", [0.0, 0.3, 0.9405, 0.999, 1.0])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 255, 256, 257, 1000])
def test_discounted_reverse_cumsum(discount, length):
    x = torch.randn(3, length, generator=torch.Generator().manual_seed(length))
    ours = discounted_reverse_cumsum(x, discount)
    assert ours.shape == x.shape and ours.is_contiguous()
    assert relative_error(ours, _reverse_cumsum_loop(x, discount)) < TOLERANCE


def test_discounted_reverse_cumsum_on_very_long_rows_stays_finite():
    """No power (γλ)^t is ever divided by: 100k tokens at a small discount stay exact."""
    x = torch.randn(2, 100_000, generator=torch.Generator().manual_seed(0))
    for discount in (0.5, 0.95):
        ours = discounted_reverse_cumsum(x, discount)
        assert torch.isfinite(ours).all()
        assert relative_error(ours, _reverse_cumsum_loop(x, discount)) < TOLERANCE


def test_discounted_reverse_cumsum_keeps_leading_dimensions():
    x = torch.randn(2, 3, 40)
    torch.testing.assert_close(discounted_reverse_cumsum(x, 0.9), discounted_reverse_cumsum(x.view(6, 40), 0.9).view(2, 3, 40))


def test_pieces_compose_to_the_fused_result():
    inputs = make_batch([33, 20, 1, 0], 33, seed=21)
    logprobs, ref_logprobs, values, scores, mask = inputs
    options = dict(kl_coef=0.07, kl_estimator="abs", kl_clamp=0.4, score_clip=1.5)
    rewards, kl_sum = kl_penalized_rewards(logprobs, ref_logprobs, scores, mask, **options)
    advantages, returns = gae(rewards, values, mask, gamma=0.99, lam=0.9)
    whitened = masked_whiten(advantages, mask)
    fused = fused_kl_reward_gae(*inputs, **options, gamma=0.99, lam=0.9)
    for name, a, b in zip(OUTPUTS, (rewards, whitened, returns, kl_sum), fused):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_whitening_variance_floor_is_1e_minus_8():
    """(A - mean)/sqrt(var + 1e-8) with Bessel's var: at var = 5e-9 the floor decides the scale
    (±0.41; without it ±0.71, with the population variance ±0.45)."""
    zeros = torch.zeros(2, 1)
    inputs = (zeros, zeros, zeros, torch.tensor([0.0, 1e-4]), torch.ones(2, 1))
    options = dict(kl_coef=0.1, gamma=1.0, lam=1.0)
    expected = torch.tensor([[-0.5e-4], [0.5e-4]]) / math.sqrt(0.5e-8 + 1e-8)
    for out in (fused_kl_reward_gae(*inputs, **options, backend="torch"), reference_kl_reward_gae(*inputs, **options)):
        torch.testing.assert_close(out.advantages.float(), expected, rtol=1e-3, atol=0)
    torch.testing.assert_close(masked_whiten(torch.tensor([[0.0, 1e-4]]), torch.ones(1, 2)), expected.view(1, 2),
                               rtol=1e-3, atol=0)


def test_masked_whiten_matches_its_definition():
    x = torch.randn(4, 9, dtype=torch.float64) * 3 + 10
    mask = torch.arange(9)[None, :] < torch.tensor([9, 4, 0, 2])[:, None]
    selected = x[mask]
    expected = torch.zeros_like(x)
    expected[mask] = (selected - selected.mean()) / torch.sqrt(selected.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(masked_whiten(x.float(), mask).double(), expected, rtol=1e-5, atol=1e-5)
    single = torch.zeros_like(mask)
    single[0, 0] = True
    with pytest.raises(ValueError, match="at least two masked tokens"):
        masked_whiten(x, single)


def test_public_names():
    for name in oatui_kernels.__all__:
        assert hasattr(oatui_kernels, name), name


def test_importing_the_package_does_not_import_triton():
    """The Triton module loads on first use: importing triton is slow, and TRITON_INTERPRET is
    read when its kernels are decorated, so an early import would fix the mode too soon."""
    code = "import sys, oatui_kernels; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
