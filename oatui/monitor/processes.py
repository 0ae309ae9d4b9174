"""Who runs a GPU process and what it is: user and command line from psutil, cached per process."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class ProcessInfo:
    user: str | None
    command: str | None


class ProcessLookup:
    """User and command line of process ids, remembered while the process lives.

    A pid that has vanished, or that lives in another PID namespace (NVML reports host pids, a
    container sees its own), reads as user and command None. The cache is keyed by pid and
    creation time, so a recycled pid is looked up afresh, and it forgets pids no longer asked for.
    """

    def __init__(self) -> None:
        self._cache: dict[int, tuple[float, ProcessInfo]] = {}

    def lookup(self, pids: Iterable[int]) -> dict[int, ProcessInfo]:
        found: dict[int, ProcessInfo] = {}
        cache: dict[int, tuple[float, ProcessInfo]] = {}
        for pid in set(pids):
            try:
                process = psutil.Process(pid)
                created = process.create_time()
            except (psutil.Error, OSError, ValueError):
                continue
            cached = self._cache.get(pid)
            if cached is not None and cached[0] == created:
                info = cached[1]
            else:
                info = ProcessInfo(user=_user(process), command=_command(process))
            cache[pid] = (created, info)
            found[pid] = info
        self._cache = cache
        return found


def _user(process: psutil.Process) -> str | None:
    try:
        return process.username()
    except (psutil.Error, OSError, KeyError):
        return None


def _command(process: psutil.Process) -> str | None:
    try:
        argv = process.cmdline()
    except (psutil.Error, OSError):
        argv = []
    if argv:
        return " ".join(argv)
    try:
        return process.name() or None
    except (psutil.Error, OSError):
        return None
