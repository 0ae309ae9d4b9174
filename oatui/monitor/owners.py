"""Which GPU processes and which GPUs belong to the runs of this workspace.

A GPU process belongs to a run when its pid is the run's stage process or the supervisor, or a
descendant of one of them (accelerate and deepspeed start one worker per GPU under the launcher),
or when its command line names a run directory of this workspace (``--run-dir WORKSPACE/runs/ID``:
this also works when NVML reports pids of another PID namespace, as in a container).

A run's GPUs are the GPUs its processes are on; a run with no process seen on any GPU is shown on
the GPUs its ``CUDA_VISIBLE_DEVICES`` names (read from the stage process, else the run's ``gpus``),
when that variable is set: an unset one means "every GPU", which says nothing about use.

Plain Python (psutil); the app's GPU sampling worker asks it after each snapshot.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from oatui.monitor.snapshot import MonitorSnapshot
from oatui.monitor.visible import visible_physical_indices


@dataclass(frozen=True)
class ActiveRun:
    """What the sampler needs of a running run: its id and its processes."""

    id: str
    pid: int | None
    supervisor_pid: int | None
    gpus: str | None


@dataclass(frozen=True)
class Ownership:
    #: GPU process pid -> run id.
    processes: dict[int, str]
    #: Physical GPU index -> run ids using it (in the order runs were given).
    gpus: dict[int, tuple[str, ...]]


EMPTY = Ownership({}, {})


class OwnerFinder:
    """Matches snapshots against the active runs; remembers per-pid facts while the pid lives."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = Path(runs_dir)
        self._ancestors: dict[tuple[int, float], tuple[int, ...]] = {}
        self._visible: dict[tuple[int, float], str | None] = {}

    def find(self, snapshot: MonitorSnapshot, runs: Sequence[ActiveRun]) -> Ownership:
        if not runs and not snapshot.gpus:
            return EMPTY
        by_pid: dict[int, str] = {}
        for run in runs:
            for pid in (run.pid, run.supervisor_pid):
                if pid:
                    by_pid.setdefault(pid, run.id)
        processes: dict[int, str] = {}
        gpus: dict[int, list[str]] = {}
        seen_ancestors: dict[tuple[int, float], tuple[int, ...]] = {}
        for gpu in snapshot.gpus:
            for process in gpu.processes:
                owner = by_pid.get(process.pid)
                if owner is None:
                    owner = self._run_in_command(process.command)
                if owner is None and by_pid:
                    for ancestor in self._ancestors_of(process.pid, seen_ancestors):
                        if ancestor in by_pid:
                            owner = by_pid[ancestor]
                            break
                if owner is not None:
                    processes[process.pid] = owner
                    users = gpus.setdefault(gpu.index, [])
                    if owner not in users:
                        users.append(owner)
        self._ancestors = seen_ancestors
        seen_visible: dict[tuple[int, float], str | None] = {}
        placed = set(processes.values())
        for run in runs:
            if run.id in placed or not snapshot.gpus:
                continue
            value = self._visible_devices(run, seen_visible)
            if value is None:
                continue
            for index in sorted(visible_physical_indices(value, snapshot.gpus)):
                users = gpus.setdefault(index, [])
                if run.id not in users:
                    users.append(run.id)
        self._visible = seen_visible
        return Ownership(processes, {index: tuple(ids) for index, ids in gpus.items()})

    def _run_in_command(self, command: str | None) -> str | None:
        if not command or "--run-dir" not in command:
            return None
        try:
            argv = shlex.split(command)
        except ValueError:
            argv = command.split()
        for position, word in enumerate(argv):
            value = None
            if word == "--run-dir" and position + 1 < len(argv):
                value = argv[position + 1]
            elif word.startswith("--run-dir="):
                value = word.split("=", 1)[1]
            if value:
                path = Path(value)
                if path.parent == self.runs_dir and (self.runs_dir / path.name).is_dir():
                    return path.name
        return None

    def _ancestors_of(self, pid: int, seen: dict[tuple[int, float], tuple[int, ...]]) -> Iterable[int]:
        try:
            process = psutil.Process(pid)
            key = (pid, process.create_time())
        except (psutil.Error, OSError):
            return ()
        ancestors = self._ancestors.get(key)
        if ancestors is None:
            try:
                ancestors = tuple(parent.pid for parent in process.parents())
            except (psutil.Error, OSError):
                ancestors = ()
        seen[key] = ancestors
        return ancestors

    def _visible_devices(self, run: ActiveRun, seen: dict[tuple[int, float], str | None]) -> str | None:
        """CUDA_VISIBLE_DEVICES of the run's stage process (None: unset or unknown)."""
        if run.pid:
            try:
                process = psutil.Process(run.pid)
                key = (run.pid, process.create_time())
                if key in self._visible:
                    value = self._visible[key]
                else:
                    value = process.environ().get("CUDA_VISIBLE_DEVICES")
                seen[key] = value
                return value
            except (psutil.Error, OSError):
                pass
        return run.gpus
