"""The Triton kernels compile for a GPU (sm_90, through Triton's bundled ptxas), with no GPU here.

The interpreter tests check what the kernels compute; this checks that the same source also
lowers to machine code: every KL estimator, the float dtypes the kernel reads, the mask dtypes,
with and without the whitening statistics, and that the main kernel does not spill registers.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile

import pytest

from helpers import TRITON_KERNEL_MODULE, forget_triton_kernel_module

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

pytestmark = [
    pytest.mark.skipif(
        not os.path.exists(os.path.join(NVIDIA_BIN, "ptxas")), reason="this triton build bundles no ptxas"
    ),
    pytest.mark.skipif(
        type(triton.language.standard.zeros).__name__ == "InterpretedFunction",
        reason="triton was imported under TRITON_INTERPRET=1 in this process: nothing compiles",
    ),
]


@pytest.fixture(scope="module")
def compiled_module():
    """A copy of the kernel module imported without TRITON_INTERPRET, i.e. for a GPU."""
    before = os.environ.pop("TRITON_INTERPRET", None)
    forget_triton_kernel_module()
    try:
        module = importlib.import_module(TRITON_KERNEL_MODULE)
        assert not module.INTERPRETED
        yield module
    finally:
        forget_triton_kernel_module()
        if before is not None:
            os.environ["TRITON_INTERPRET"] = before


def compile_kernel(kernel, types: dict[str, str], constants: dict[str, object], num_warps: int = 4):
    signature = {name: "constexpr" if name in constants else types[name] for name in kernel.arg_names}
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=TARGET, options={"num_warps": num_warps})


def rows_kernel_types(dtype: str) -> dict[str, str]:
    types = {name: f"*{dtype}" for name in ("logprobs_ptr", "ref_logprobs_ptr", "values_ptr", "scores_ptr")}
    types.update({name: "*fp32" for name in ("rewards_ptr", "advantages_ptr", "returns_ptr", "kl_sum_ptr",
                                              "row_mean_ptr", "row_m2_ptr")})
    types.update({name: "i32" for name in ("n_rows", "n_tokens", "stride_logprobs", "stride_ref_logprobs",
                                            "stride_values", "stride_out")})
    types.update({name: "fp32" for name in ("kl_coef", "gamma", "gamma_lam", "kl_clamp", "score_clip")})
    types["lengths_ptr"] = "*i32"
    return types


@pytest.mark.parametrize(
    "dtype, estimator, stats, rows, block",
    [
        ("fp32", 0, True, 1, 1024),
        ("fp32", 1, False, 16, 64),
        ("fp32", 2, True, 64, 16),
        ("fp16", 3, True, 1, 1024),
        ("bf16", 2, False, 1, 1024),
        ("fp64", 0, True, 4, 256),
    ],
)
def test_rows_kernel_compiles(compiled_module, dtype, estimator, stats, rows, block):
    constants = dict(ESTIMATOR=estimator, HAS_CLAMP=True, HAS_CLIP=stats, COMPUTE_STATS=stats, ROWS=rows, BLOCK_T=block)
    compiled = compile_kernel(compiled_module._rows_kernel, rows_kernel_types(dtype), constants)
    assert compiled.asm["cubin"]


def test_rows_kernel_does_not_spill(compiled_module):
    constants = dict(ESTIMATOR=2, HAS_CLAMP=True, HAS_CLIP=True, COMPUTE_STATS=True, ROWS=1, BLOCK_T=1024)
    compiled = compile_kernel(compiled_module._rows_kernel, rows_kernel_types("fp32"), constants)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "-res-usage", cubin.name],
                               capture_output=True, text=True, timeout=60).stdout
    assert "LOCAL:0" in usage, usage


@pytest.mark.parametrize("mask_dtype", ["i1", "u8", "i64", "fp32", "fp64"])
def test_mask_kernel_compiles(compiled_module, mask_dtype):
    types = dict(mask_ptr=f"*{mask_dtype}", lengths_ptr="*i32", problems_ptr="*i32", n_rows="i32",
                 n_tokens="i32", stride_mask="i32")
    assert compile_kernel(compiled_module._mask_kernel, types, dict(ROWS=1, BLOCK_T=1024)).asm["cubin"]


def test_whitening_kernels_compile(compiled_module):
    stats_types = dict(lengths_ptr="*i32", row_mean_ptr="*fp32", row_m2_ptr="*fp32", stats_ptr="*fp32",
                       n_rows="i32", eps="fp32")
    assert compile_kernel(compiled_module._whitening_stats_kernel, stats_types, dict(BLOCK_R=1024)).asm["cubin"]
    whiten_types = dict(advantages_ptr="*fp32", lengths_ptr="*i32", stats_ptr="*fp32", n_rows="i32", stride="i32")
    assert compile_kernel(compiled_module._whiten_kernel, whiten_types, dict(ROWS=1, BLOCK_T=1024)).asm["cubin"]
