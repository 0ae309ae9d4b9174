"""What the three Triton models share: their settings from ``config.pbtxt``, device choice, inputs.

Nothing here imports ``triton_python_backend_utils``, so it can be tested outside the stub.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

# Parameters that ``oatui export`` writes into config.pbtxt (``parameters { key: ... }``).
MODE_KEY = "oatui_mode"
MODEL_PATH_KEY = "model_path"
DEVICE_KEY = "device"
DTYPE_KEY = "dtype"
EOS_KEY = "eos_token"
MAX_POSITIONS_KEY = "max_positions"
MAX_TEXT_BYTES_KEY = "max_text_bytes"
CPU_THREADS_KEY = "cpu_threads"
MAX_BATCH_ROWS_KEY = "max_batch_rows"  # the policy's decode batch (requests generated together)
MAX_TOKENS_IN_FLIGHT_KEY = "max_tokens_in_flight"  # the policy's reserved cache positions, all rows
DEFAULT_MAX_TEXT_BYTES = 1 << 20


class BadRequest(ValueError):
    """An input that does not fit: answered with a Triton error, the model keeps serving."""


@dataclass(frozen=True)
class ModelSettings:
    name: str
    mode: str
    model_path: str
    device: str
    dtype: str
    max_batch_size: int
    max_text_bytes: int
    cpu_threads: int  # 0: half the cores this process may use


def config_parameter(config: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = config.get("parameters", {}).get(key)
    if value is None:
        return default
    return value.get("string_value", default)


def read_settings(args: dict[str, str]) -> ModelSettings:
    """The model's settings from the ``args`` Triton passes to ``initialize``."""
    config = json.loads(args["model_config"])
    path = config_parameter(config, MODEL_PATH_KEY)
    if not path:
        raise ValueError(f"config.pbtxt of {config.get('name')} has no '{MODEL_PATH_KEY}' parameter")
    if not os.path.isabs(path):
        # A copied checkpoint (oatui export --copy) lives inside the version folder.
        path = os.path.join(args["model_repository"], args["model_version"], path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{MODEL_PATH_KEY} {path}: no config.json there (was the checkpoint moved?)")
    return ModelSettings(
        name=config.get("name", args.get("model_name", "?")),
        mode=config_parameter(config, MODE_KEY, "") or "",
        model_path=path,
        device=config_parameter(config, DEVICE_KEY, "auto") or "auto",
        dtype=config_parameter(config, DTYPE_KEY, "float32") or "float32",
        max_batch_size=int(config.get("max_batch_size", 0) or 0),
        max_text_bytes=int(config_parameter(config, MAX_TEXT_BYTES_KEY, str(DEFAULT_MAX_TEXT_BYTES)) or DEFAULT_MAX_TEXT_BYTES),
        cpu_threads=int(config_parameter(config, CPU_THREADS_KEY, "0") or 0),
    )


def pick_device(setting: str, device_id: str | int | None = None) -> str:
    """``auto``: CUDA when this process sees a GPU, else the CPU; ``cuda`` without a GPU is an error."""
    import torch

    if setting == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        index = int(device_id or 0) if device_id not in (None, "") else 0
        return f"cuda:{index}" if index < torch.cuda.device_count() else "cuda"
    if setting == "cuda":
        raise RuntimeError("device 'cuda' was asked for, but no CUDA GPU is visible to the server")
    return "cpu"


def cpu_threads(setting: int) -> int:
    """Torch threads for a model on the CPU: ``setting``, or half the usable cores.

    Several models and the server share the machine; a small model on all cores loses most of
    its time to threads waiting for each other.
    """
    if setting > 0:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def configure_threads(device: str, setting: int) -> None:
    if device == "cpu":
        import torch

        torch.set_num_threads(cpu_threads(setting))


def decode_texts(array: np.ndarray | None, name: str, max_bytes: int, required: bool = True) -> list[str] | None:
    """UTF-8 strings from a BYTES input tensor (any shape, flattened)."""
    if array is None:
        if required:
            raise BadRequest(f"input '{name}' is missing")
        return None
    if array.dtype != np.object_:
        raise BadRequest(f"input '{name}' must be BYTES (strings), got {array.dtype}")
    texts = []
    for item in array.reshape(-1):
        raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
        if len(raw) > max_bytes:
            raise BadRequest(f"input '{name}' is {len(raw)} bytes; at most {max_bytes} are accepted")
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise BadRequest(f"input '{name}' is not UTF-8 text: {error}") from None
    return texts


def request_parameters(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as error:
        raise BadRequest(f"request parameters are not JSON: {error}") from None
    if not isinstance(values, dict):
        raise BadRequest("request parameters must be a mapping")
    return values


def error_response(message: str, internal: bool = False):  # -> pb_utils.InferenceResponse
    """A response carrying a Triton error (INVALID_ARG for bad input, INTERNAL otherwise)."""
    import triton_python_backend_utils as pb_utils

    code_name = "INTERNAL" if internal else "INVALID_ARG"
    try:
        error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code_name))
    except (AttributeError, TypeError):  # a stub from before error codes
        error = pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
