"""Writing Triton model repositories: ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/model.py``.

The model files are referenced by absolute path (the ``model_path`` config parameter), or copied
into ``NAME/1/checkpoint/`` with ``copy=True`` so the repository can move to another machine
(which then needs oatui installed in the Python environment its Triton Python backend uses).
An export is written to a temporary folder beside the repository and renamed into place.

The three models (see ``oatui/serve/triton_models/``):

========  =====================================================  ==========================
mode      inputs                                                 outputs
========  =====================================================  ==========================
policy    ``text`` | ``prompt`` [+ ``system``]: BYTES [1]         ``text_output`` BYTES [1],
          request parameters: max_new_tokens, temperature,       streamed (decoupled)
          top_p, top_k, repetition_penalty, seed, ignore_eos,
          stream_interval_ms
rm        ``text`` BYTES [B, 1]                                  ``score`` FP32 [B, 1]
ref       ``input_ids`` INT64 [B, T], ``attention_mask`` INT64    ``logprobs`` FP32 [B, T-1]
          [B, T] (optional)
========  =====================================================  ==========================
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from oatui.errors import UserError
from oatui.serve.triton_models import common

MODES = ("policy", "rm", "ref")
DEVICES = ("auto", "cpu", "cuda")
#: ``--instance-kind``: Triton's instance group kind of an exported model.
INSTANCE_KINDS = {"model": "KIND_MODEL", "gpu": "KIND_GPU"}
DEFAULT_MAX_BATCH = 16
VERSION = "1"
COPY_FOLDER = "checkpoint"
EXPORT_INFO = "oatui_export.json"
NAME_PATTERN = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")  # \Z: "$" would let "name\n" in
MODEL_SOURCES = Path(__file__).resolve().parent / "triton_models"
#: A checkpoint folder holds at least one of these when its tokenizer was saved with it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ExportResult:
    name: str
    mode: str
    path: Path  # REPO/NAME
    model_path: Path  # the checkpoint the config points at
    replaced: bool


def _pbtxt_string(value: str) -> str:
    """A protobuf text-format string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _parameters(values: dict[str, str]) -> str:
    return "\n".join(
        f"parameters {{ key: {_pbtxt_string(key)} value: {{ string_value: {_pbtxt_string(value)} }} }}"
        for key, value in values.items()
    )


def config_text(mode: str, name: str, parameters: dict[str, str], max_batch: int = DEFAULT_MAX_BATCH,
                instance_kind: str = "model") -> str:
    """The ``config.pbtxt`` of one exported model.

    ``instance_kind`` ``model`` (KIND_MODEL): one instance that picks its device itself (CUDA when
    visible, else the CPU), so the repository serves on any machine; ``gpu`` (KIND_GPU): one
    instance on each GPU the server sees, placed by Triton (a server without GPUs fails to load it).
    """
    if mode == "policy":
        body = f"""\
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "system" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }}
]"""
    elif mode == "rm":
        body = f"""\
max_batch_size: {max_batch}
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
input [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }}
]
output [
  {{ name: "score" data_type: TYPE_FP32 dims: [ 1 ] }}
]"""
    elif mode == "ref":
        body = f"""\
max_batch_size: {max_batch}
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] optional: true }}
]
output [
  {{ name: "logprobs" data_type: TYPE_FP32 dims: [ -1 ] }}
]"""
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return (
        f"# Written by 'oatui export --mode {mode}'. The Python backend runs 1/model.py.\n"
        f"name: {_pbtxt_string(name)}\n"
        'backend: "python"\n'
        f"{body}\n"
        f"instance_group [ {{ kind: {INSTANCE_KINDS[instance_kind]} count: 1 }} ]\n"
        f"{_parameters(parameters)}\n"
    )


def resolve_model(model: str, runs_dir: Path | None) -> Path:
    """A checkpoint folder from ``--model``: a folder with config.json, or a run id (its ``final/``)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {model}: not a folder")
        if not (path / "config.json").is_file():
            if (path / "final" / "config.json").is_file():
                return (path / "final").absolute()
            raise UserError(f"--model {model}: no config.json in {path.absolute()} (expected a Hugging Face checkpoint folder)")
        return path.absolute()
    if runs_dir is not None and "/" not in model and model not in (".", ".."):
        from oatui.stages.runs import find_run

        try:
            run = find_run(runs_dir, model)
        except UserError:
            run = None
        if run is not None:
            final = run.path / "final"
            if not (final / "config.json").is_file():
                raise UserError(f"--model {model}: run {run.id} has no final/ model (has it finished?)")
            return final.absolute()
    raise UserError(f"--model {model}: no such folder or run")


def _checkpoint_facts(model_path: Path) -> dict[str, str]:
    """EOS token and context length, read with the same tokenizer loading the server uses."""
    from oatui.models.loading import load_tokenizer

    # Without these, transformers builds an empty tokenizer from config.json alone and the
    # export would "work", serving gibberish.
    if not any((model_path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"--model {model_path}: no tokenizer saved there (none of {', '.join(TOKENIZER_FILES)})")
    from oatui.fsutil import UnreadableFile, read_json_file

    try:
        config = read_json_file(model_path / "config.json")
    except UnreadableFile as error:
        raise UserError(f"--model {error}") from None
    tokenizer = load_tokenizer(str(model_path))
    facts = {common.EOS_KEY: str(tokenizer.eos_token)}
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(positions, int):
        facts[common.MAX_POSITIONS_KEY] = str(positions)
    return facts


def list_models(repo: Path) -> list[str]:
    """Model names in a repository (folders holding a config.pbtxt)."""
    if not repo.is_dir():
        return []
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "config.pbtxt").is_file())


def _staging_dir(repo: Path, name: str) -> Path:
    # Beside the repository, not inside it: a server started meanwhile must not see a half model.
    for parent in (repo.parent, repo):
        try:
            return Path(tempfile.mkdtemp(prefix=f".{repo.name}-{name}-export-", dir=parent))
        except OSError:
            continue
    raise UserError(f"cannot write a temporary folder beside {repo}")


def export_model(
    mode: str,
    model: Path,
    repo: Path,
    name: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    device: str = "auto",
    copy: bool = False,
    force: bool = False,
    dtype: str = "float32",
    cpu_threads: int = 0,
    instance_kind: str = "model",
) -> ExportResult:
    """Write ``REPO/NAME`` for ``model`` (a checkpoint folder with config.json)."""
    if mode not in MODES:
        raise UserError(f"--mode {mode}: choose one of {', '.join(MODES)}")
    if device not in DEVICES:
        raise UserError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if instance_kind not in INSTANCE_KINDS:
        raise UserError(f"--instance-kind {instance_kind}: choose one of {', '.join(INSTANCE_KINDS)}")
    if instance_kind == "gpu" and device == "cpu":
        raise UserError("--instance-kind gpu places the model on a GPU; it cannot go with --device cpu")
    name = name or mode
    if not NAME_PATTERN.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '-' and '.', not starting with '.' or '-'")
    if cpu_threads < 0:
        raise UserError(f"--cpu-threads {cpu_threads}: must be 0 (auto) or more")
    if mode != "policy" and not 1 <= max_batch <= 4096:
        raise UserError(f"--max-batch {max_batch}: must be between 1 and 4096")
    if repo.exists() and not repo.is_dir():
        raise UserError(f"--repo {repo}: not a folder")
    model = Path(model).absolute()
    if not (model / "config.json").is_file():
        raise UserError(f"--model {model}: no config.json there (expected a Hugging Face checkpoint folder)")
    target = repo / name
    if target.exists() and not force:
        raise UserError(f"{target} exists; add --force to replace it (or pick another --name)")
    facts = _checkpoint_facts(model)

    from oatui.fsutil import make_private_dir

    make_private_dir(repo)
    staging = _staging_dir(repo, name)
    try:
        version = staging / VERSION
        version.mkdir()
        if copy:
            shutil.copytree(model, version / COPY_FOLDER, symlinks=False)
            model_path_value = COPY_FOLDER
        else:
            model_path_value = str(model)
        parameters = {
            common.MODE_KEY: mode,
            common.MODEL_PATH_KEY: model_path_value,
            common.DEVICE_KEY: device,
            common.DTYPE_KEY: dtype,
            common.CPU_THREADS_KEY: str(cpu_threads),
            **facts,
        }
        (staging / "config.pbtxt").write_text(config_text(mode, name, parameters, max_batch, instance_kind))
        shutil.copyfile(MODEL_SOURCES / f"{mode}.py", version / "model.py")
        info = {"mode": mode, "source": str(model), "copied": copy, "exported": time.time(), "device": device,
                "instance_kind": instance_kind}
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        replaced = False
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{repo.name}-{name}-old-", dir=staging.parent))
            os.rename(target, trash / name)
            replaced = True
            try:
                os.rename(staging, target)
            except OSError:
                os.rename(trash / name, target)  # put the old one back
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(name=name, mode=mode, path=target, model_path=(target / VERSION / COPY_FOLDER) if copy else model,
                        replaced=replaced)
