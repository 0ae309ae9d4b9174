"""What every stage process shares: its run directory, metrics, stop requests and checkpoints.

A stage runs as ``python -m oatui.train.STAGE --run-dir DIR`` (directly, or under accelerate or
deepspeed). It reads the resolved ``config.yaml`` from the run directory, writes ``metrics.jsonl``
from rank 0, and on SIGTERM saves a checkpoint at the next step boundary and exits with
:data:`~oatui.stages.rundir.EXIT_STOPPED`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oatui.config import StageConfig, from_yaml_file
from oatui.errors import UserError
from oatui.fsutil import atomic_write_text, locked, make_private_dir
from oatui.models.loading import LATEST_SFT, resolve_model_name
from oatui.stages.rundir import CHECKPOINT_PREFIX, EXIT_BAD_INPUT, EXIT_STOPPED, RunDir, pickled_files
from oatui.stages.runs import require_latest_final
from oatui.workspace import Workspace

# --------------------------------------------------------------------------------------------
# Process set-up


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


class StopFlag:
    """Set by SIGTERM/SIGINT; the training loop looks at it at each step boundary."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum: int, frame: Any) -> None:
            if not cls.requested:
                print(f"[oatui] {signal.Signals(signum).name} received: stopping at the next step boundary", flush=True)
            cls.requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        # The stage is detached from any terminal; a hang-up of the launching shell is not a stop.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def stop_requested_everywhere() -> bool:
    """True when any rank was asked to stop, so that all ranks stop at the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return StopFlag.requested
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1.0 if StopFlag.requested else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def parse_stage_args(stage: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m oatui.train.{stage}", description=f"the {stage} stage process")
    parser.add_argument("--run-dir", required=True, type=Path, help="the run directory made by `oatui train`")
    return parser.parse_known_args(argv)[0]  # launchers may append their own flags (--local_rank)


def stage_main(stage: str, body: Callable[["StageContext"], None], argv: list[str] | None = None) -> None:
    """Run ``body`` as a stage process: set-up, one-line errors, exit codes the supervisor reads."""
    args = parse_stage_args(stage, argv)
    os.umask(0o077)  # everything the stage writes is private to its user
    StopFlag.install()
    quiet_libraries()
    run = RunDir(args.run_dir.absolute())
    if is_main_process():
        run.error_path.unlink(missing_ok=True)  # from an earlier attempt of this run
    try:
        config = from_yaml_file(stage, run.config_path)
        context = StageContext(stage, run, config)
        prepare_reporting(config, run)
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        body(context)
    except UserError as error:
        message = str(error)
        print(f"[oatui] error: {message}", file=sys.stderr, flush=True)
        if is_main_process():
            atomic_write_text(run.error_path, message + "\n")
        sys.exit(EXIT_BAD_INPUT)
    except StageStopped:
        print("[oatui] stopped on request; resume with `oatui train "
              f"{stage} --resume {run.id}`", flush=True)
        sys.exit(EXIT_STOPPED)
    except Exception as error:  # noqa: BLE001 - the last line of defence: record it, then fail
        traceback.print_exc()
        if is_main_process():
            first = f"{type(error).__name__}: {error}".splitlines()[0]
            atomic_write_text(run.error_path, first[:500] + "\n")
        sys.exit(1)


def quiet_libraries() -> None:
    """No progress bars in ``stdout.log``: oatui reports progress through ``metrics.jsonl``."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


#: The package each ``report_to`` tracker needs.
REPORTER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
#: The wandb project when ``$WANDB_PROJECT`` names none.
WANDB_PROJECT = "oatui"


def prepare_reporting(config: StageConfig, run: RunDir) -> None:
    """Check that the trackers of ``report_to`` are installed (one line, before anything heavy
    loads: transformers would raise deep in the Trainer, accelerate would skip a missing one
    silently), and point them at the run: TensorBoard's event files in ``RUN/tensorboard/``,
    wandb's files in the run folder, its project ``$WANDB_PROJECT`` or ``oatui``."""
    for name in config.report_to:
        package = REPORTER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise UserError(f"report_to: {name} needs the {package} package, which is not installed "
                            f"(pip install {package}, or drop {name} from report_to)")
    if "tensorboard" in config.report_to:
        # transformers' TensorBoardCallback reads its folder from here (TrainingArguments has no
        # logging_dir any more); the RL stage hands the same folder to accelerate's tracker.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.tensorboard)
    if "wandb" in config.report_to:
        os.environ.setdefault("WANDB_PROJECT", WANDB_PROJECT)
        os.environ.setdefault("WANDB_DIR", str(run.path))


class StageStopped(Exception):
    """Raised after the stop checkpoint is written."""


# --------------------------------------------------------------------------------------------
# The context a stage body receives


#: Globals a checkpoint's torch files may name beyond what ``torch.load(weights_only=True)``
#: allows: numpy's RNG state (the Trainer's ``rng_state.pth``) and plain containers. DeepSpeed's
#: files also name DeepSpeed's own classes (its config, ZeRO stage, loss scaler): see below.
TORCH_FILE_GLOBALS = frozenset({
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType", "numpy.dtypes.Float64DType", "numpy.dtypes.Int64DType", "_codecs.encode",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "builtins.object",
    "collections.OrderedDict", "collections.defaultdict", "builtins.set", "builtins.frozenset", "builtins.slice",
    "torch.torch_version.TorchVersion",
})
#: Written with the checkpoint but never loaded back (the Trainer's arguments, for the record).
UNREAD_TORCH_FILES = ("training_args.bin",)


def _is_deepspeed_class(name: str) -> bool:
    """Whether ``module.Name`` is a class of the installed DeepSpeed (never a function: unpickling
    calls a global, and a class only builds an object of DeepSpeed's own kind)."""
    module_name, _, attribute = name.rpartition(".")
    if not (module_name == "deepspeed" or module_name.startswith("deepspeed.")):
        return False
    try:
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError):
        return False
    return isinstance(value, type)


def check_torch_files(checkpoint: Path) -> None:
    """Refuse a checkpoint whose torch files (``.pt``, ``.pth``, ``.bin``) name globals beyond
    tensors, plain containers, :data:`TORCH_FILE_GLOBALS` and DeepSpeed's classes, before a loader
    unpickles them (DeepSpeed loads its files with ``weights_only=False``). Torch lists a pickle's
    globals from its opcodes: nothing in the file runs."""
    import torch

    for path in sorted(checkpoint.rglob("*")):
        if path.suffix not in (".pt", ".pth", ".bin") or path.name in UNREAD_TORCH_FILES or not path.is_file():
            continue
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as error:  # noqa: BLE001 - not a zip-format torch file: refuse it, one line
            raise UserError(f"{path}: not a torch checkpoint file this version can check ({type(error).__name__}); "
                            "refusing to resume from it") from None
        unexpected = sorted(name for name in set(names) - TORCH_FILE_GLOBALS if not _is_deepspeed_class(name))
        if unexpected:
            raise UserError(f"{path}: refusing to resume: it names {', '.join(unexpected[:3])}"
                            f"{' ...' if len(unexpected) > 3 else ''}, which loading it could run")


class StageContext:
    def __init__(self, stage: str, run: RunDir, config: StageConfig) -> None:
        self.stage = stage
        self.run = run
        self.config = config
        self.workspace = Workspace.open(run.workspace)
        self.metrics = MetricsWriter(run.metrics_path, enabled=is_main_process())
        self.resume_from = self._resume_point()

    def _resume_point(self) -> Path | None:
        """The newest complete checkpoint when this run has been started before."""
        partial = self.run.checkpoints / ".partial"
        if is_main_process() and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash during a save
        checkpoint = self.run.latest_checkpoint()
        for pickled in pickled_files(checkpoint) if checkpoint is not None else []:
            raise UserError(f"{pickled}: refusing to resume from a checkpoint that holds a pickle "
                            "(loading one can run any code); oatui never writes one")
        if checkpoint is not None:
            check_torch_files(checkpoint)
        if checkpoint is not None and is_main_process():
            step = int(checkpoint.name[len(CHECKPOINT_PREFIX):])
            dropped = self.metrics.truncate_after(step)
            print(f"[oatui] resuming from {checkpoint.name} (dropped {dropped} metric lines logged after it)", flush=True)
        return checkpoint

    def model_name(self, name: str | None = None) -> str:
        name = name or self.config.model_name
        if name == LATEST_SFT:
            final = str(require_latest_final(self.workspace.root, "sft", "model_name"))
            self.log(f"model_name {LATEST_SFT}: {final}")
            return final
        return resolve_model_name(name, self.workspace.models, self.config.tiny_model)

    def log(self, message: str) -> None:
        if is_main_process():
            print(f"[oatui] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Metrics


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``: ``step``, ``total_steps``, ``time`` and metrics."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, step: int, total_steps: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": int(step), "total_steps": int(total_steps), "time": round(time.time(), 3)}
        for key, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None if math.isnan(value) else (1e308 if value > 0 else -1e308)
            else:
                record[key] = value
        line = json.dumps(record, ensure_ascii=False, default=float) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()

    def truncate_after(self, step: int) -> int:
        """Drop lines logged after ``step`` (they will be logged again by the resumed run)."""
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        with locked(self.path):
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    dropped += 1  # a torn line from the crash
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
                    dropped += 1
                    continue
                kept.append(line)
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        return dropped


# Hugging Face Trainer log keys and the names oatui uses everywhere.
TRAINER_METRIC_NAMES = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "eval_loss": "eval/loss",
    "train_loss": "train/mean_loss",  # the end-of-training summary: the mean over all steps
    "accuracy": "rm/train_accuracy",
    "eval_accuracy": "rm/accuracy",
    "top1_accuracy": "rm/train_top1_accuracy",  # rm_loss: kwise
    "eval_top1_accuracy": "rm/top1_accuracy",
    "margin": "rm/train_margin",
    "eval_margin": "rm/margin",
    "mean_reward": "rm/train_reward_mean",
    "eval_mean_reward": "rm/reward_mean",
    "mean_token_accuracy": "train/token_accuracy",
    "eval_mean_token_accuracy": "eval/token_accuracy",
    "entropy": "train/entropy",
    "eval_entropy": "eval/entropy",
}


def rename_trainer_logs(logs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in logs.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in TRAINER_METRIC_NAMES:
            out[TRAINER_METRIC_NAMES[key]] = value
        elif key.startswith("eval_"):
            out[f"eval/{key[5:]}"] = value
        elif key.startswith("train_"):
            out[f"train/{key[6:]}"] = value
        else:
            out[f"train/{key}"] = value
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints


def publish_checkpoint(partial_dir: Path, checkpoints_dir: Path, keep: int) -> Path:
    """Rename a finished checkpoint from ``.partial/`` into place, then drop the oldest beyond ``keep``."""
    target = checkpoints_dir / partial_dir.name
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial_dir, target)
    complete = sorted(
        (p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
         and p.name[len(CHECKPOINT_PREFIX):].isdigit()),
        key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]),
    )
    for old in complete[: max(0, len(complete) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):
        partial_dir.parent.rmdir()  # .partial/, when empty
    return target


def save_final(model: Any, tokenizer: Any, final_dir: Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``final/`` as a normal Hugging Face folder, atomically (under a temporary name, then renamed)."""
    staging = final_dir.with_name(final_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    make_private_dir(staging)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    for name, text in (extra_files or {}).items():
        atomic_write_text(staging / name, text)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(staging, final_dir)
    return final_dir
