"""Resumable checkpoints: accelerate's ``save_state`` under ``checkpoints/.partial/``, then renamed.

A checkpoint holds what the next step depends on: the model (policy and value head), the
optimizer, the scheduler, the KL controller, the running score moments, the step and data
position (:class:`Progress`), and every rank's RNG states (python, numpy, torch), so a resumed
run takes the step an uninterrupted one would have taken.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from oatui.fsutil import make_private_dir
from oatui.stages.rundir import CHECKPOINT_PREFIX
from oatui.train.common import publish_checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator


class Progress:
    """The step last completed and the prompts consumed by then (all ranks together)."""

    def __init__(self) -> None:
        self.step = 0
        self.prompts_consumed = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "prompts_consumed": self.prompts_consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.prompts_consumed = int(state["prompts_consumed"])


def save_checkpoint(accelerator: "Accelerator", checkpoints: Path, step: int, keep: int) -> Path:
    """Every rank writes its part into ``.partial/checkpoint-STEP``; rank 0 then renames it into place."""
    partial = checkpoints / ".partial" / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        make_private_dir(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    target = checkpoints / partial.name
    if accelerator.is_main_process:
        target = publish_checkpoint(partial, checkpoints, keep)
    accelerator.wait_for_everyone()
    return target


def rng_snapshot() -> dict[str, Any]:
    snapshot: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        snapshot["cuda"] = torch.cuda.get_rng_state_all()
    return snapshot


def restore_rng(snapshot: dict[str, Any]) -> None:
    """Back to a step boundary, e.g. before a checkpoint of a step that could not finish."""
    random.setstate(snapshot["python"])
    np.random.set_state(snapshot["numpy"])
    torch.set_rng_state(snapshot["torch"])
    if "cuda" in snapshot:
        torch.cuda.set_rng_state_all(snapshot["cuda"])
