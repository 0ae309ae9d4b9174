"""Resumable checkpoints: accelerate's ``save_state`` under ``checkpoints/.partial/``, then renamed.

A checkpoint holds what the next step depends on: the model (policy and value head), the
optimizer, the scheduler, the KL controller, the running score moments, the step and data
position (:class:`Progress`), and every rank's RNG states (python, numpy, torch), so a resumed
run takes the step an uninterrupted one would have taken.

Nothing in it is a pickle. accelerate keeps registered objects in ``custom_checkpoint_N.pkl`` and
loads them with ``weights_only=False`` (a planted file runs code on resume), and its RNG states in
``random_states_N.pkl``: so the scheduler, controller, moments and progress go into
``training_state.json``, each rank's RNG states into ``rng_state_RANK.json``, accelerate's pickle
is deleted, and a checkpoint holding any pickle is refused. The model is safetensors and the
optimizer is loaded by accelerate with ``weights_only=True``.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from oatui.errors import UserError
from oatui.fsutil import UnreadableFile, atomic_write_json, atomic_write_text, make_private_dir, read_json_file
from oatui.stages.rundir import CHECKPOINT_PREFIX, pickled_files
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


STATE_FILE = "training_state.json"
RNG_FILE = "rng_state_{rank}.json"
ACCELERATE_RNG_FILE = "random_states_{rank}.pkl"


class CheckpointRefused(UserError):
    """A checkpoint that holds a pickle, or whose state files are not the JSON oatui writes."""


def save_checkpoint(accelerator: "Accelerator", checkpoints: Path, step: int, keep: int,
                    state: dict[str, Any]) -> Path:
    """Every rank writes its part into ``.partial/checkpoint-STEP``; rank 0 then renames it into place.

    ``state`` names the objects (``state_dict``/``load_state_dict``) kept beside the model and
    optimizer; their states must be JSON (numbers, strings, lists, mappings).
    """
    partial = checkpoints / ".partial" / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        make_private_dir(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    rank = accelerator.process_index
    (partial / ACCELERATE_RNG_FILE.format(rank=rank)).unlink(missing_ok=True)
    atomic_write_json(partial / RNG_FILE.format(rank=rank), rng_to_json(rng_snapshot()))
    if accelerator.is_main_process:
        atomic_write_text(partial / STATE_FILE,
                          json.dumps({name: obj.state_dict() for name, obj in state.items()}, indent=1) + "\n")
    accelerator.wait_for_everyone()
    target = checkpoints / partial.name
    if accelerator.is_main_process:
        target = publish_checkpoint(partial, checkpoints, keep)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator: "Accelerator", checkpoint: Path, state: dict[str, Any]) -> None:
    """Restore what :func:`save_checkpoint` wrote; a pickle anywhere in it, or a state file that
    is not oatui's JSON, is a :class:`CheckpointRefused` naming the file, before anything loads."""
    for path in pickled_files(checkpoint):
        raise CheckpointRefused(f"{path}: refusing to resume from a checkpoint that holds a pickle "
                                "(loading one can run any code); oatui never writes one")
    rank = accelerator.process_index
    try:
        saved = read_json_file(checkpoint / STATE_FILE)
        rng = read_json_file(checkpoint / RNG_FILE.format(rank=rank))
    except UnreadableFile as error:
        raise CheckpointRefused(f"{error}") from None
    missing = [name for name in state if not isinstance(saved.get(name), dict)]
    if missing:
        raise CheckpointRefused(f"{checkpoint / STATE_FILE}: no state for {', '.join(missing)}")
    try:
        accelerator.load_state(str(checkpoint))
    except (pickle.UnpicklingError, RuntimeError, OSError, KeyError, ValueError) as error:
        first = " ".join(str(error).split())[:300]
        raise CheckpointRefused(f"{checkpoint}: cannot load the model or optimizer: {first}") from None
    try:
        for name, obj in state.items():
            obj.load_state_dict(saved[name])
        restore_rng(rng_from_json(rng))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointRefused(f"{checkpoint}: its state files do not match this run: {error}") from None


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


def rng_to_json(snapshot: dict[str, Any]) -> dict[str, Any]:
    """An :func:`rng_snapshot` as JSON: python's state tuple, numpy's legacy state, torch's bytes."""
    version, internal, gauss = snapshot["python"]
    kind, keys, position, has_gauss, cached = snapshot["numpy"]
    record: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": snapshot["torch"].tolist(),
    }
    if "cuda" in snapshot:
        record["cuda"] = [state.tolist() for state in snapshot["cuda"]]
    return record


def rng_from_json(record: dict[str, Any]) -> dict[str, Any]:
    version, internal, gauss = record["python"]
    kind, keys, position, has_gauss, cached = record["numpy"]
    snapshot: dict[str, Any] = {
        "python": (int(version), tuple(int(v) for v in internal), gauss),
        "numpy": (str(kind), np.asarray(keys, dtype=np.uint32), int(position), int(has_gauss), float(cached)),
        "torch": torch.tensor(record["torch"], dtype=torch.uint8),
    }
    if "cuda" in record and torch.cuda.is_available():
        snapshot["cuda"] = [torch.tensor(state, dtype=torch.uint8) for state in record["cuda"]]
    return snapshot
