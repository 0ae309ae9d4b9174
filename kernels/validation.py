"""Input checks for the fused KL reward + GAE: one clear ValueError per mistake.

The mask check is vectorised and costs one device synchronisation (on CUDA) for all of the
data-dependent checks together: values in {0, 1}, no 1 after a 0 within a row (i.e.
``mask[:, 1:] <= mask[:, :-1]``, a contiguous prefix = right padding), and the token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .estimators import canonical_estimator

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Options:
    """The scalar arguments, checked and normalised (python floats, canonical estimator name)."""

    kl_coef: float
    gamma: float
    lam: float
    estimator: str
    kl_clamp: float | None
    score_clip: float | None
    whiten: bool
    backend: str


def _finite_float(name: str, value: object) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()  # a device sync when on CUDA; callers holding a float avoid it
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def _optional_bound(name: str, value: object) -> float | None:
    if value is None:
        return None
    bound = _finite_float(name, value)
    if bound < 0:
        raise ValueError(f"{name} must be >= 0 (it bounds to [-{name}, {name}]), got {bound}")
    return bound


def check_options(
    *,
    kl_coef: object,
    gamma: object,
    lam: object,
    kl_estimator: str,
    kl_clamp: object,
    score_clip: object,
    whiten: bool,
    backend: str,
) -> Options:
    """Validate the scalar arguments; ValueError naming the first bad one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    gamma_value = _finite_float("gamma", gamma)
    lam_value = _finite_float("lam", lam)
    for name, number in (("gamma", gamma_value), ("lam", lam_value)):
        if not 0.0 <= number <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {number}")
    return Options(
        kl_coef=_finite_float("kl_coef", kl_coef),
        gamma=gamma_value,
        lam=lam_value,
        estimator=canonical_estimator(kl_estimator),
        kl_clamp=_optional_bound("kl_clamp", kl_clamp),
        score_clip=_optional_bound("score_clip", score_clip),
        whiten=bool(whiten),
        backend=backend,
    )


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def check_tensors(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    """Types, dtypes, shapes and devices; ValueError naming the argument and both shapes."""
    named = {
        "logprobs": logprobs,
        "ref_logprobs": ref_logprobs,
        "values": values,
        "scores": scores,
        "mask": mask,
    }
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    for name in ("logprobs", "ref_logprobs", "values", "scores"):
        if named[name].dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{name} must be float16, bfloat16, float32 or float64, got {named[name].dtype}"
            )
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be bool, integer or floating, got {mask.dtype}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be 2-D (B×T), got shape {_shape(logprobs)}")
    for name in ("ref_logprobs", "values", "mask"):
        if named[name].shape != logprobs.shape:
            raise ValueError(
                f"{name} has shape {_shape(named[name])} but logprobs has shape {_shape(logprobs)}; "
                "both must be B×T"
            )
    batch, tokens = logprobs.shape
    if scores.shape != (batch,):
        raise ValueError(
            f"scores has shape {_shape(scores)} but logprobs has shape {_shape(logprobs)}; "
            f"scores must be (B,) = ({batch},)"
        )
    if batch == 0 or tokens == 0:
        raise ValueError(f"empty batch: logprobs has shape {_shape(logprobs)}")
    for name, tensor in named.items():
        if tensor.device != logprobs.device:
            raise ValueError(f"{name} is on {tensor.device} but logprobs is on {logprobs.device}")


def not_binary_error() -> ValueError:
    return ValueError("mask must hold only 0 and 1 (or be bool)")


def not_prefix_error(row: int) -> ValueError:
    return ValueError(
        "mask must be 1 on a contiguous prefix of each row and 0 after it (right padding); "
        f"row {row} has a 1 after a 0"
    )


def too_few_tokens_error(total: int) -> ValueError:
    return ValueError(f"whitening needs at least two response tokens in the batch, the mask holds {total}")


def response_lengths(
    mask: torch.Tensor, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Check that each row of ``mask`` holds 1 on a contiguous prefix and 0 after it (the PyTorch
    path's check; the Triton path checks in a kernel of its own, reading the mask once).

    Returns the mask as float32 0/1 (what the PyTorch path multiplies by), the per-row response
    lengths (int64, on the mask's device) and their total. Only float arithmetic is used: on CPU
    torch's bool kernels are an order of magnitude slower. The checks, all vectorised:
    values in [0, 1] (min and max), exactly 0 or 1 (sum of m·(1-m) is 0, every term being >= 0),
    and never a 1 after a 0 (max of m[:, 1:] - m[:, :-1] is not positive).

    ``scratch``, a tensor the caller will overwrite anyway (e.g. an output), spares a buffer
    when it has the mask's shape and the dtype the checks run in: every fresh buffer costs a
    page fault per 4 KiB on first touch, about as much as the arithmetic here.
    """
    if mask.dtype in (torch.float32, torch.float64):
        checked = mask  # float64 is checked before rounding: 1 - 1e-12 must not pass as 1
    else:
        checked = mask.to(torch.float32)  # exact for bool, half types and every valid integer
    lowest, highest = torch.aminmax(checked)
    if scratch is None or scratch.shape != checked.shape or scratch.dtype != checked.dtype:
        scratch = torch.empty_like(checked)
    off_binary = torch.dot(checked.reshape(-1), torch.sub(1.0, checked, out=scratch).reshape(-1))
    steps = torch.sub(checked[:, 1:], checked[:, :-1], out=scratch[:, 1:])
    rises = steps.amax() if checked.shape[1] > 1 else highest.new_zeros(())
    mask32 = checked if checked.dtype == torch.float32 else checked.to(torch.float32)
    lengths = mask32.sum(dim=1).long()  # exact: rows are far below 2**24 tokens
    # One device synchronisation for every data-dependent check.
    flags = torch.stack(
        [lowest.double(), highest.double(), off_binary.double(), rises.double(), lengths.sum().double()]
    ).tolist()
    low, high, off, rise, total = flags
    if not (low >= 0 and high <= 1 and off == 0):
        raise not_binary_error()
    if rise > 0:
        raise not_prefix_error(int((steps > 0).any(dim=1).nonzero()[0]))
    return mask32, lengths, int(total)
