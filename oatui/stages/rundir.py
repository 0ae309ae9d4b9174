"""The run directory: the one place a stage, its supervisor, the CLI and the app agree on.

``WORKSPACE/runs/RUN_ID/`` holds ``run.json`` (written atomically by the launcher and the
supervisor only), ``config.yaml`` (resolved), ``stdout.log``, ``metrics.jsonl`` (appended by the
stage's rank 0), ``samples.jsonl`` (RL), ``checkpoints/checkpoint-N/`` (complete ones only: they are
written under ``checkpoints/.partial/`` and renamed), ``final/`` and, when the stage fails with a
known cause, ``error.txt`` (one line).

This module is imported by stage processes, the launcher and the app alike: it is plain Python.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from oatui.errors import UserError
from oatui.fsutil import (
    UnreadableFile,
    atomic_write_json,
    atomic_write_text,
    fits_type,
    json_objects,
    locked,
    make_private_dir,
    parse_json,
    read_last_line,
    read_text_file,
)

STATES = ("queued", "running", "succeeded", "failed", "stopped")
ACTIVE_STATES = ("queued", "running")

# A stage that stops on request (SIGTERM, `oatui runs stop`) saves a checkpoint and exits with this.
EXIT_STOPPED = 75
# A stage that fails on bad input writes error.txt and exits with this.
EXIT_BAD_INPUT = 2

CHECKPOINT_PREFIX = "checkpoint-"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def new_run_id(stage: str) -> str:
    return f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def valid_run_id(run_id: str) -> bool:
    return isinstance(run_id, str) and bool(_RUN_ID.fullmatch(run_id))  # fullmatch: '$' lets a newline in


class BrokenRunFile(UserError, ValueError):
    """A ``run.json`` that is missing, not JSON, or not what oatui writes."""


@dataclass
class RunInfo:
    """The content of ``run.json``."""

    id: str
    stage: str
    state: str = "queued"
    argv: list[str] = field(default_factory=list)
    pid: int | None = None
    """The stage process (the launcher's child; for accelerate/deepspeed, the launcher process)."""
    pid_started: float | None = None
    """Its start time (psutil create_time), to tell it from a later process with the same pid."""
    supervisor_pid: int | None = None
    supervisor_started: float | None = None
    host: str = field(default_factory=socket.gethostname)
    exit_code: int | None = None
    signal: str | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    configs: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    launcher: str = "python"
    gpus: str | None = None
    num_processes: int = 1
    hostfile: str | None = None
    resumes: int = 0
    stop_requested: bool = False
    workspace: str | None = None
    after: str | None = None
    """The run this one waits for: it starts when that run succeeds and fails, unstarted, otherwise."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunInfo":
        if not isinstance(data, dict):
            raise ValueError("run.json is not an object")
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        for required in ("id", "stage"):
            if not isinstance(values.get(required), str):
                raise ValueError(f"run.json: '{required}' missing or not a string")
        if values.get("state") not in STATES:
            raise ValueError(f"run.json: state {values.get('state')!r} is not one of {', '.join(STATES)}")
        hints = typing.get_type_hints(cls)
        names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        for name, value in values.items():
            if not fits_type(value, hints[name]):
                kind = typing.get_args(hints[name])[0] if typing.get_args(hints[name]) else hints[name]
                what = "a list of strings" if typing.get_origin(hints[name]) is list else names.get(kind, str(kind))
                raise ValueError(f"run.json: '{name}' is not {what}")
        return cls(**values)


class RunDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # -- paths -------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.path.name

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.path / "stdout.log"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples_path(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def error_path(self) -> Path:
        return self.path / "error.txt"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event files (``report_to: tensorboard``)."""
        return self.path / "tensorboard"

    @property
    def workspace(self) -> Path:
        return self.path.parent.parent

    # -- run.json ----------------------------------------------------------------------------
    @classmethod
    def create(cls, runs_dir: Path, info: RunInfo, config_yaml: str) -> "RunDir":
        make_private_dir(runs_dir)
        path = runs_dir / info.id
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)
        run = cls(path)
        atomic_write_text(run.config_path, config_yaml)
        run.write_info(info)
        return run

    def read_info(self) -> RunInfo:
        """Parse ``run.json``; a broken one raises :class:`BrokenRunFile` (a ``ValueError`` and a
        ``UserError``: one line naming the run's ``run.json``)."""
        try:
            if not self.info_path.exists():
                raise ValueError("run.json is missing")
            try:
                data = parse_json(read_text_file(self.info_path), "run.json")
            except UnreadableFile as error:
                raise ValueError(str(error).replace(str(self.info_path), "run.json", 1)) from None
            try:
                return RunInfo.from_dict(data)
            except TypeError as error:
                raise ValueError(f"run.json: {error}") from None
        except ValueError as error:
            raise BrokenRunFile(f"{self.id}/{error}") from None

    def write_info(self, info: RunInfo) -> None:
        atomic_write_json(self.info_path, info.to_dict())

    def update_info(self, **changes: Any) -> RunInfo:
        """Read, change and write ``run.json`` under its lock (the supervisor and ``runs stop`` both write)."""
        with locked(self.info_path):
            info = self.read_info()
            for key, value in changes.items():
                setattr(info, key, value)
            self.write_info(info)
        return info

    # -- what a stage writes ----------------------------------------------------------------
    def last_metrics(self) -> dict[str, Any] | None:
        line = read_last_line(self.metrics_path)
        return next(json_objects([line]), None) if line else None

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every well-formed line of ``metrics.jsonl`` (a torn last line is skipped)."""
        try:
            with open(self.metrics_path, encoding="utf-8", errors="replace") as handle:
                return list(json_objects(handle))
        except FileNotFoundError:
            return []

    def read_error(self) -> str | None:
        try:
            text = self.error_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text.splitlines()[0] if text else None

    def complete_checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first. Half-written ones live under ``.partial`` and never show."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for child in self.checkpoints.iterdir():
            if child.is_dir() and child.name.startswith(CHECKPOINT_PREFIX):
                suffix = child.name[len(CHECKPOINT_PREFIX):]
                if suffix.isdigit():
                    found.append((int(suffix), child))
        return [path for _, path in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        checkpoints = self.complete_checkpoints()
        return checkpoints[-1] if checkpoints else None


PICKLE_SUFFIXES = (".pkl", ".pickle")


def pickled_files(checkpoint: Path) -> list[Path]:
    """Pickle files in a checkpoint. oatui never writes one (its own state is JSON, tensors are
    safetensors or loaded with ``weights_only=True``), and loading one can run any code: a
    checkpoint that holds one is refused, never resumed from."""
    return sorted(path for path in checkpoint.rglob("*") if path.suffix.lower() in PICKLE_SUFFIXES)
