"""The Triton kernel under the interpreter (TRITON_INTERPRET=1), against the float64 reference.

The variable must be set before triton itself is first imported, not only before the kernels
are: triton's own jit library (``tl.zeros``, ``tl.sum``, ...) is decorated at that import, and
an interpreted kernel cannot call compiled-mode helpers. In a test session triton is often
imported already (bitsandbytes, peft and transformers' GPT-NeoX import it), and switching it
over in place would leak into every later test. So ``test_kernel_under_the_interpreter`` runs
the cases below, the functions named ``case_*``, in a child pytest that starts with the variable
set, and reports the child's failures; the parent never collects the cases itself. To run them
directly: ``TRITON_INTERPRET=1 pytest tests/test_kernel_triton.py -o python_functions='case_*'``.

The interpreter runs the kernel's custom-combine scan one element at a time in Python, so the
shapes are small; rows longer than one chunk come from forcing 16-token chunks (``block_t``).

Relative error: for each output, max |ours - reference| / max(1, max |reference|).
"""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
import zlib
from pathlib import Path

import pytest
import torch

from helpers import TRITON_KERNEL_MODULE, forget_triton_kernel_module
from oatui_kernels import KLRewardGAE, fused_kl_reward_gae, reference_kl_reward_gae

TOLERANCE = 1e-5
OUTPUTS = KLRewardGAE._fields
#: The child run must have run at least this many cases (guards against collecting nothing).
MIN_CASES = 250


@pytest.mark.interpret
def test_kernel_under_the_interpreter(tmp_path: Path):
    """Every case_* below, in a child pytest process started with TRITON_INTERPRET=1."""
    report = tmp_path / "cases.xml"
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-o", "python_functions=case_*", "-q",
         f"--junitxml={report}"],
        capture_output=True, text=True, env=env, timeout=540,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, f"cases failed under the interpreter:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    suite = ElementTree.parse(report).getroot().iter("testsuite").__next__()
    ran = int(suite.get("tests")) - int(suite.get("skipped"))
    assert ran >= MIN_CASES, f"only {ran} cases ran under the interpreter:\n{result.stdout[-3000:]}"


@pytest.fixture(scope="module")
def kernel_module():
    """The kernel module, interpreted: only in a process started with TRITON_INTERPRET=1."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("the case_* functions run in a process started with TRITON_INTERPRET=1")
    module = importlib.import_module(TRITON_KERNEL_MODULE)
    assert module.INTERPRETED, "triton was imported before TRITON_INTERPRET=1 was set"
    return module


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    scale = max(1.0, reference.abs().max().item())
    return (ours.double() - reference).abs().max().item() / scale


def assert_matches(ours: KLRewardGAE, reference: KLRewardGAE, tolerance: float = TOLERANCE) -> None:
    for name, a, b in zip(OUTPUTS, ours, reference):
        assert a.dtype == torch.float32, f"{name} is {a.dtype}"
        assert a.shape == b.shape, name
        error = relative_error(a, b)
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


def make_batch(lengths: list[int], tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    logprobs = -3 * torch.rand(batch, tokens, generator=generator)
    ref_logprobs = logprobs + 0.3 * torch.randn(batch, tokens, generator=generator)
    values = torch.randn(batch, tokens, generator=generator)
    scores = 2 * torch.randn(batch, generator=generator)
    mask = torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]
    return logprobs, ref_logprobs, values, scores, mask


def run_kernel(module, inputs, *, block_t=None, **options) -> KLRewardGAE:
    """The launcher directly, to choose the chunk length; lengths from the mask as the API does."""
    logprobs, ref_logprobs, values, scores, mask = inputs
    full = dict(kl_coef=0.1, gamma=1.0, lam=0.95, kl_estimator="k1", kl_clamp=None, score_clip=None, whiten=True)
    full.update(options)
    full["kl_estimator"] = {"mse": "k2"}.get(full["kl_estimator"], full["kl_estimator"])
    return module.kl_reward_gae_triton(
        logprobs, ref_logprobs, values, scores, mask.sum(dim=1), block_t=block_t, **full
    )


# With 16-token chunks: rows shorter than a chunk (5), exactly one (16) and three chunks (40).
@pytest.mark.parametrize("tokens", [5, 16, 40])
@pytest.mark.parametrize(
    "estimator, bounded, whiten, gamma, lam",
    list(itertools.product(("k1", "k2", "mse", "k3", "abs"), (False, True), (True, False), (1.0, 0.99), (1.0, 0.95))),
)
def case_kernel_matches_reference(kernel_module, estimator, bounded, whiten, gamma, lam, tokens):
    """Every estimator, clamp and clip on/off, whitening on/off, γ ∈ {1, .99}, λ ∈ {1, .95}, rows
    of length 0, 1, T and in between, T below, equal to and above the chunk: ≤ 1e-5."""
    seed = zlib.crc32(repr((estimator, bounded, whiten, gamma, lam, tokens)).encode())
    lengths = [tokens, 0, 1, max(tokens // 2, 2), tokens - 1]
    inputs = make_batch(lengths, tokens, seed=seed)
    options = dict(kl_coef=0.1, gamma=gamma, lam=lam, kl_estimator=estimator, whiten=whiten,
                   kl_clamp=0.2 if bounded else None, score_clip=1.0 if bounded else None)
    assert_matches(run_kernel(kernel_module, inputs, block_t=16, **options),
                   reference_kl_reward_gae(*inputs, **options))


def case_public_api_runs_the_kernel(kernel_module, monkeypatch):
    """backend='triton' through fused_kl_reward_gae, with the launcher's own tile choice, on rows
    longer than its largest chunk (1024) so that the carry between chunks is exercised."""
    calls = []
    launcher = kernel_module.kl_reward_gae_triton
    monkeypatch.setattr(kernel_module, "kl_reward_gae_triton", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    inputs = make_batch([1100, 1025, 3], 1100, seed=8)
    options = dict(kl_coef=0.05, gamma=0.99, lam=0.95, kl_estimator="k3")
    assert_matches(fused_kl_reward_gae(*inputs, **options, backend="triton"),
                   reference_kl_reward_gae(*inputs, **options))
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def case_kernel_reads_other_float_dtypes(kernel_module, dtype):
    """fp16/bf16/fp64 are read as they are and upcast in the kernel. (bf16 is said to read as
    zeros under some interpreter versions; triton 3.9 reads these loads correctly, and the
    comparison with the reference would catch zeros.)"""
    inputs = make_batch([20, 7, 0, 1], 20, seed=6)
    inputs = tuple(t.to(dtype) for t in inputs[:4]) + (inputs[4],)
    options = dict(kl_coef=0.1, gamma=0.99, lam=0.95, kl_estimator="k3")
    ours = fused_kl_reward_gae(*inputs, **options, backend="triton")
    assert_matches(ours, reference_kl_reward_gae(*inputs, **options))
    assert ours.rewards.abs().sum() > 0


def case_kernel_agrees_with_the_torch_path(kernel_module):
    inputs = make_batch([48, 30, 0, 47, 1, 12, 48, 2], 48, seed=12)
    for whiten in (True, False):
        options = dict(kl_coef=0.3, gamma=0.97, lam=0.9, kl_estimator="k2", kl_clamp=1.0, whiten=whiten)
        triton_out = run_kernel(kernel_module, inputs, block_t=16, **options)
        torch_out = fused_kl_reward_gae(*inputs, **options, backend="torch")
        for name, a, b in zip(OUTPUTS, triton_out, torch_out):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def case_whitening_variance_floor_is_1e_minus_8(kernel_module):
    """At var = 5e-9 (Bessel) the 1e-8 floor decides the scale: ±0.41."""
    zeros = torch.zeros(2, 1)
    inputs = (zeros, zeros, zeros, torch.tensor([0.0, 1e-4]), torch.ones(2, 1))
    out = fused_kl_reward_gae(*inputs, kl_coef=0.1, gamma=1.0, lam=1.0, backend="triton")
    expected = torch.tensor([[-0.5e-4], [0.5e-4]]) / (0.5e-8 + 1e-8) ** 0.5
    torch.testing.assert_close(out.advantages, expected, rtol=1e-3, atol=0)


def case_kernel_ignores_padding_garbage(kernel_module):
    """Padded positions are never read (masked loads), so inf/NaN there cannot leak."""
    inputs = make_batch([20, 9, 0], 20, seed=13)
    expected = run_kernel(kernel_module, inputs, block_t=16, kl_estimator="k3")
    logprobs, ref_logprobs, values, scores, mask = (t.clone() for t in inputs)
    logprobs[~mask] = float("nan")
    ref_logprobs[~mask] = float("inf")
    values[~mask] = float("-inf")
    out = run_kernel(kernel_module, (logprobs, ref_logprobs, values, scores, mask), block_t=16, kl_estimator="k3")
    for name, a, b in zip(OUTPUTS, out, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def case_kernel_reads_strided_rows(kernel_module):
    """Rows that are slices of a wider buffer are read in place through their stride."""
    wide = make_batch([30, 30, 30], 30, seed=14)
    narrow = tuple(t[:, :20] for t in (wide[0], wide[1], wide[2])) + (wide[3], wide[4][:, :20])
    assert not narrow[0].is_contiguous()
    contiguous = tuple(t.contiguous() for t in narrow)
    for a, b in zip(run_kernel(kernel_module, narrow, block_t=16), run_kernel(kernel_module, contiguous, block_t=16)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float16, torch.float32, torch.float64])
def case_mask_kernel_reads_every_mask_dtype(kernel_module, mask_dtype):
    inputs = make_batch([9, 0, 4, 1], 9, seed=15)
    lengths, total = kernel_module.mask_lengths(inputs[4].to(mask_dtype))
    assert lengths.tolist() == [9, 0, 4, 1] and total == 14
    expected = fused_kl_reward_gae(*inputs, kl_coef=0.1, backend="torch")
    ours = fused_kl_reward_gae(*inputs[:4], inputs[4].to(mask_dtype), kl_coef=0.1, backend="triton")
    for name, a, b in zip(OUTPUTS, ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], "row 1 has a 1 after a 0"),
        ([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 1]], "row 2 has a 1 after a 0"),
        ([[1, 1, 2, 0, 0]], "only 0 and 1"),
        ([[1, 0.5, 0, 0, 0]], "only 0 and 1"),
        ([[1, 1, float("nan"), 0, 0]], "only 0 and 1"),
    ],
)
def case_mask_kernel_refuses_bad_masks(kernel_module, rows, message):
    mask = torch.tensor(rows, dtype=torch.float32)
    inputs = make_batch([5] * mask.shape[0], 5)[:4]
    with pytest.raises(ValueError, match=message):
        fused_kl_reward_gae(*inputs, mask, kl_coef=0.1, backend="triton")


def case_mask_kernel_checks_float64_before_rounding(kernel_module):
    mask = torch.ones(2, 5, dtype=torch.float64)
    mask[1, 2] = 1 - 1e-12
    with pytest.raises(ValueError, match="only 0 and 1"):
        fused_kl_reward_gae(*make_batch([5, 5], 5)[:4], mask, kl_coef=0.1, backend="triton")


def case_triton_path_whitening_needs_two_tokens(kernel_module):
    inputs = make_batch([1, 0], 4)
    with pytest.raises(ValueError, match="at least two response tokens"):
        fused_kl_reward_gae(*inputs, kl_coef=0.1, backend="triton")
    out = fused_kl_reward_gae(*inputs, kl_coef=0.1, backend="triton", whiten=False)
    assert out.rewards[1].abs().sum() == 0 and out.kl_sum[1] == 0


def case_kernel_imported_before_the_variable_is_refused(monkeypatch):
    """Setting TRITON_INTERPRET after the module was imported (compiled for a GPU) is an error
    that says so, not a crash inside Triton."""
    forget_triton_kernel_module()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    try:
        compiled = importlib.import_module(TRITON_KERNEL_MODULE)
        assert not compiled.INTERPRETED
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(RuntimeError, match="imported before"):
            fused_kl_reward_gae(*make_batch([4, 3], 4), kl_coef=0.1, backend="triton")
    finally:
        forget_triton_kernel_module()
