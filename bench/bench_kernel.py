"""Benchmark: fused KL-penalised reward + GAE against the classic per-token loop, side by side.

The classic shape is the one trl's old PPOTrainer and trlx use: a per-sample Python loop
building the rewards (KL penalty, plus the score on the last response token), then
``for t in reversed(range(T))`` over the batch computing delta and lastgaelam, then masked
whitening. Both run in the same process on the same inputs, the median of ``--repeats`` timed
runs after warm-up, and their outputs are checked to agree before anything is printed.

On CUDA the table also shows the Triton kernel: its time, the bandwidth it achieves on the
compulsory traffic (every input read once, every output written once) and that bandwidth as a
fraction of a device-to-device copy (``torch.empty_like(x).copy_(x)``) of the same number of
bytes, measured in the same run.

    python bench/bench_kernel.py --device cpu
    python bench/bench_kernel.py --device cuda --shapes 64x1024 256x2048 512x4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from oatui_kernels import fused_kl_reward_gae

DEFAULT_SHAPES = ("64x1024", "256x2048", "512x4096")
KL_COEF = 0.05
GAMMA = 1.0
LAM = 0.95


def classic_kl_reward_gae(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The classic trainers' loops (trl's PPOTrainer.compute_rewards / compute_advantages)."""
    rewards, kl_sums = [], []
    for score, logprob, ref_logprob, row_mask in zip(scores, logprobs, ref_logprobs, mask):
        kl = logprob - ref_logprob
        kl_sums.append((kl * row_mask).sum())
        reward = -kl_coef * kl * row_mask
        last_response_token = row_mask.nonzero()[-1]
        reward[last_response_token] += score
        rewards.append(reward)
    rewards = torch.stack(rewards)

    values = values * mask
    rewards = rewards * mask
    last_gae_lam = 0.0
    advantages_reversed = []
    length = rewards.shape[-1]
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae_lam = delta + gamma * lam * last_gae_lam
        advantages_reversed.append(last_gae_lam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
    returns = advantages + values

    # trl's masked_whiten: masked mean, masked variance with Bessel's correction.
    count = mask.sum()
    mean = (advantages * mask).sum() / count
    variance = (((advantages - mean) ** 2) * mask).sum() / count * (count / (count - 1))
    advantages = (advantages - mean) * torch.rsqrt(variance + 1e-8) * mask
    return rewards, advantages, returns, torch.stack(kl_sums)


def make_batch(batch: int, tokens: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A rollout batch: response lengths uniform in [T/2, T], right padded."""
    generator = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(batch, tokens, generator=generator) * 3
    ref_logprobs = logprobs + 0.1 * torch.randn(batch, tokens, generator=generator)
    values = torch.randn(batch, tokens, generator=generator)
    scores = torch.randn(batch, generator=generator)
    lengths = torch.randint(tokens // 2, tokens + 1, (batch,), generator=generator)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).float()
    return tuple(t.to(device) for t in (logprobs, ref_logprobs, values, scores, mask))


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_ms(function: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2) -> float:
    """Median wall time of ``function`` in milliseconds, synchronising CUDA around each run."""
    return median_ms_side_by_side([function], repeats, device, warmup)[0]


def median_ms_side_by_side(
    functions: list[Callable[[], object]], repeats: int, device: torch.device, warmup: int = 2
) -> list[float]:
    """Median wall time of each function in milliseconds, the functions taking turns within each
    repeat so that a busy neighbour or a clock change slows all of them alike."""
    synchronize = _synchronizer(device)
    for function in functions:
        for _ in range(warmup):
            function()
    synchronize()
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, samples in zip(functions, times):
            start = time.perf_counter()
            function()
            synchronize()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) * 1e3 for samples in times]


def compulsory_bytes(inputs: tuple[torch.Tensor, ...]) -> int:
    """Every input read once, rewards/advantages/returns (B×T) and kl_sum (B) written once, float32."""
    logprobs = inputs[0]
    read = sum(t.numel() * t.element_size() for t in inputs)
    written = (3 * logprobs.numel() + logprobs.shape[0]) * 4
    return read + written


def copy_bandwidth(n_bytes: int, repeats: int, device: torch.device) -> float:
    """Bytes/s of ``torch.empty_like(x).copy_(x)`` moving ``n_bytes`` (half read, half written)."""
    buffer = torch.empty(max(n_bytes // 8, 1), dtype=torch.float32, device=device)
    ms = median_ms(lambda: torch.empty_like(buffer).copy_(buffer), repeats, device)
    return 2 * buffer.numel() * 4 / (ms / 1e3)


def check_agreement(ours: tuple[torch.Tensor, ...], classic: tuple[torch.Tensor, ...], label: str) -> None:
    for name, a, b in zip(("rewards", "advantages", "returns", "kl_sum"), ours, classic):
        scale = max(1.0, b.abs().max().item())
        error = (a.float() - b.float()).abs().max().item() / scale
        if error > 1e-4:
            raise SystemExit(f"{label}: {name} differs from the classic loop by {error:.2e} (relative)")


def parse_shape(text: str) -> tuple[int, int]:
    try:
        batch, tokens = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 256x2048, got {text!r}") from None
    return batch, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice, one per core)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        help="BxT shapes, e.g. 64x1024 256x2048")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    on_cuda = device.type == "cuda"
    ours_backend = "triton" if on_cuda else "torch"
    header = ["shape", "classic ms", f"ours ({ours_backend}) ms", "speedup"]
    if on_cuda:
        header += ["torch path ms", "triton GB/s", "copy GB/s", "of copy"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# device: {torch.cuda.get_device_name() if on_cuda else 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}, "
          f"load average {load:.2f} at start")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|")
    options = dict(kl_coef=KL_COEF, gamma=GAMMA, lam=LAM)
    for batch, tokens in args.shapes:
        inputs = make_batch(batch, tokens, device)
        label = f"{batch}x{tokens}"

        def ours(backend: str = ours_backend) -> tuple[torch.Tensor, ...]:
            return fused_kl_reward_gae(*inputs, **options, backend=backend)

        def classic() -> tuple[torch.Tensor, ...]:
            return classic_kl_reward_gae(*inputs, **options)

        check_agreement(ours(), classic(), label)
        classic_ms, ours_ms = median_ms_side_by_side([classic, ours], args.repeats, device)
        row = [label, f"{classic_ms:.1f}", f"{ours_ms:.2f}", f"{classic_ms / ours_ms:.0f}×"]
        if on_cuda:
            check_agreement(ours("torch"), classic(), label + " (torch path)")
            torch_ms = median_ms(lambda: ours("torch"), args.repeats, device)
            n_bytes = compulsory_bytes(inputs)
            achieved = n_bytes / (ours_ms / 1e3)
            copy = copy_bandwidth(n_bytes, args.repeats, device)
            row += [f"{torch_ms:.2f}", f"{achieved / 1e9:.0f}", f"{copy / 1e9:.0f}", f"{achieved / copy:.0%}"]
        print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
