"""Who runs a GPU process and what it is: user and command line from psutil, cached per process."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psutil

#: Options whose value is a secret: tritonserver's restricted-API key
#: (``--grpc-restricted-protocol=APIS:HEADER=KEY``, as ``oatui serve`` starts it) and oatui's own
#: ``--admin-key``. Command lines end up in the app, the ``oatui gpus`` table and recordings.
SECRET_OPTIONS = ("--admin-key", "--grpc-restricted-protocol", "--http-restricted-api")
REDACTED = "***"


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
        return " ".join(redact_secrets(argv))
    try:
        return process.name() or None
    except (psutil.Error, OSError):
        return None


def redact_secrets(argv: Sequence[str]) -> list[str]:
    """``argv`` with the values of :data:`SECRET_OPTIONS` (``--opt=value`` or ``--opt value``) hidden."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            shown.append(REDACTED)
            hide_next = False
            continue
        name, equals, _value = arg.partition("=")
        if name in SECRET_OPTIONS:
            if equals:
                arg = f"{name}={REDACTED}"
            else:
                hide_next = True
        shown.append(arg)
    return shown
