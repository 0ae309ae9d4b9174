"""Per-token KL estimators between the policy and the reference model.

With x = logprob - ref_logprob for the sampled token:

- ``k1``           x              (unbiased, can be negative)
- ``k2`` / ``mse`` x**2 / 2
- ``k3``           exp(-x) - 1 + x (unbiased and never negative)
- ``abs``          |x|

Both the PyTorch path and the Triton kernel evaluate k3 the same way: a Taylor series for
|x| < ``K3_SERIES_BOUND`` and the closed form above it. The closed form alone cancels badly in
float32 when the policy is still close to the reference: at x = 1e-3, exp(-x) - 1 + x is
5e-7 but exp(-x) is only known to 6e-8, a 12 % error per token.
"""

from __future__ import annotations

import torch

#: Canonical estimator names, in the order of the integer codes the Triton kernel uses.
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "abs")

#: Accepted aliases: "mse" is the name trl uses for k2.
_ALIASES = {"mse": "k2"}

#: Below this |x| k3 is summed as a series. Its first dropped term, x**9/9!, is then below
#: 6e-9 while k3 itself is at least 0.1 at the bound: well under float32 resolution.
K3_SERIES_BOUND = 0.5

#: 1/n! for n = 2..8, the coefficients of exp(y) - 1 - y = sum_{n>=2} y**n / n!.
K3_SERIES_COEFFICIENTS: tuple[float, ...] = (
    1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040, 1 / 40320,
)


def canonical_estimator(name: str) -> str:
    """The canonical name of a KL estimator ("mse" becomes "k2"); ValueError when unknown."""
    if not isinstance(name, str):
        raise ValueError(f"kl_estimator must be a string, got {type(name).__name__}")
    canonical = _ALIASES.get(name, name)
    if canonical not in KL_ESTIMATORS:
        known = ", ".join(repr(n) for n in (*KL_ESTIMATORS, *_ALIASES))
        raise ValueError(f"unknown kl_estimator {name!r}; expected one of {known}")
    return canonical


def estimator_code(name: str) -> int:
    """The integer the Triton kernel switches on for this estimator."""
    return KL_ESTIMATORS.index(canonical_estimator(name))


def _k3(x: torch.Tensor) -> torch.Tensor:
    # The series takes y = -x where |x| < bound and 0 elsewhere, the closed form the other way
    # round; both give 0 at 0, so the two add up without a select (torch's bool kernels are slow
    # on CPU). far is exactly 0 or 1: (|x| - bound)·1e12 + 1 is 1 at the bound and far below 0
    # under it, since float32 spacing near 0.5 is 3e-8.
    far = (x.abs() - K3_SERIES_BOUND).mul_(1e12).add_(1.0).clamp_(0.0, 1.0)
    y_far = x.mul(far).neg_()
    # Clamped first so that an infinite x far away gives 0·bound here, not inf·0.
    y_near = x.clamp(-K3_SERIES_BOUND, K3_SERIES_BOUND).mul_(1.0 - far).neg_()
    # Horner form of y**2 * (1/2 + y/6 + y**2/24 + ... + y**6/8!), in place to spare allocations.
    series = torch.full_like(y_near, K3_SERIES_COEFFICIENTS[-1])
    for coefficient in reversed(K3_SERIES_COEFFICIENTS[:-1]):
        series.mul_(y_near).add_(coefficient)
    series.mul_(y_near).mul_(y_near)
    return torch.exp(y_far).sub_(1.0).sub_(y_far).add_(series)


def kl_estimate(x: torch.Tensor, estimator: str = "k1", clamp: float | None = None) -> torch.Tensor:
    """Per-token KL estimate from ``x = logprob - ref_logprob``, in x's dtype.

    ``clamp`` bounds the estimate to [-clamp, clamp] (only k1 can go below zero).
    """
    return kl_estimate_(x.clone(), canonical_estimator(estimator), clamp)


def kl_estimate_(x: torch.Tensor, estimator: str, clamp: float | None) -> torch.Tensor:
    """As :func:`kl_estimate`, for a canonical estimator name, free to overwrite ``x``.

    The fused path owns its ``x`` (a fresh difference), so k1 needs no copy.
    """
    if estimator == "k1":
        k = x
    elif estimator == "k2":
        k = x.square_().mul_(0.5)
    elif estimator == "k3":
        k = _k3(x)
    elif estimator == "abs":
        k = x.abs_()
    else:
        raise ValueError(f"unknown kl_estimator {estimator!r}")
    if clamp is not None:
        k.clamp_(-clamp, clamp)
    return k
