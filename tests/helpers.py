"""Helpers shared by the tests (import with `from helpers import ...`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OATUI = str(Path(sys.executable).parent / "oatui")


def run_oatui(*args: str, workspace: Path | None = None, timeout: float = 600, check: bool = False,
              env: dict[str, str] | None = None, cwd: Path | None = None,
              input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `oatui` command; returns the completed process (text stdout/stderr)."""
    argv = [OATUI, *args]
    if workspace is not None:
        argv += ["--workspace", str(workspace)]
    full_env = dict(os.environ)
    full_env.update(env or {})
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env,
                            cwd=str(cwd) if cwd else None, input=input_text,
                            stdin=None if input_text is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"oatui {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def as_foreground_job() -> None:
    """``preexec_fn`` for a child that takes Ctrl-C as a terminal's foreground job does: SIGINT at
    its default. A test run started in the background by a non-interactive shell inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def ppo_steps(run_dir: Path) -> list[dict]:
    """An RL run's per-step records (the step-0 judgement of the starting policy left out)."""
    return [record for record in read_metrics(run_dir) if "ppo/score_mean" in record]


TRITON_KERNEL_MODULE = "oatui_kernels.triton_kernel"


def forget_triton_kernel_module() -> None:
    """Drop the Triton kernel module, so that the next import decorates its kernels afresh (for
    the interpreter or for a GPU, whichever TRITON_INTERPRET then says)."""
    sys.modules.pop(TRITON_KERNEL_MODULE, None)
    package = sys.modules.get("oatui_kernels")
    if package is not None and hasattr(package, "triton_kernel"):
        delattr(package, "triton_kernel")


def untrained_tiny_lm(max_positions: int):  # -> (GPTNeoXForCausalLM, tokenizer)
    """A real, untrained 2-layer GPT-NeoX on the tiny tokenizer (vocabulary padded to a multiple of
    64, as the tiny models are), seeded: for generation tests that need no training."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from oatui.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(512)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPTNeoXForCausalLM(config).eval(), tokenizer
