"""Process identity and signals, for the supervisors of runs (``stages/``) and of the server (``serve/``).

A pid read back from a record (``run.json``, ``server.json``) is a process of ours only while it
runs and started when the record says: pids are reused. So every record keeps each pid with its
start time (psutil's ``create_time``), and :func:`process_alive` is True only when both match. A
pid recorded without its start time (the start time could not be read when the record was made, or
an older record) proves nothing: it is not alive, and oatui never signals a process it cannot
identify. Nor is init ever one of ours, nor this process itself.

:func:`signal_process` and :func:`signal_group` signal such a recorded process (or the process group
it leads); :func:`signal_child_group` signals the group of a child this process started itself in a
new session and still holds; :func:`stop_on_signals` is how a detached supervisor hears a stop.
psutil is imported inside the functions: the app and the command line import this module through
``stages/`` and ``serve/``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

#: How far a recorded start time may be from the process's own and still be the same process.
START_TIME_TOLERANCE_S = 1.0


def create_time(pid: int) -> float | None:
    """When ``pid`` started (what records keep beside it); None when it is gone or unreadable."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError, ValueError):
        return None


def process_alive(pid: int | None, started: float | None) -> bool:
    """True when ``pid`` runs and is the same process (same start time) as the one recorded.

    Without a recorded start time a pid proves nothing (it may have been reused), so it is not
    alive: oatui never signals a process it cannot identify. Nor init, nor this process; a zombie
    has ended.
    """
    if not isinstance(pid, int) or pid <= 1 or started is None or pid == os.getpid():
        return False
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - started) < START_TIME_TOLERANCE_S
    except (psutil.Error, OSError, ValueError):
        return False


def signal_process(pid: int | None, started: float | None, signum: int) -> bool:
    """Send ``signum`` to the recorded process, if it is still that process; True when sent."""
    if not process_alive(pid, started):
        return False
    try:
        os.kill(pid, signum)  # type: ignore[arg-type] - process_alive checked it is an int
    except (ProcessLookupError, PermissionError):
        return False
    return True


def signal_group(pid: int | None, started: float | None, signum: int) -> bool:
    """Send ``signum`` to the process group the recorded process leads (a process started in its own
    session, as stages and tritonserver are), if it is still that process and still leads its group;
    True when sent."""
    if not process_alive(pid, started):
        return False
    try:
        if os.getpgid(pid) != pid:  # type: ignore[arg-type]
            return False
        os.killpg(pid, signum)  # type: ignore[arg-type]
    except (ProcessLookupError, PermissionError):
        return False
    return True


def signal_child_group(pid: int, signum: int) -> None:
    """Send ``signum`` to the process group of a child this process started with
    ``start_new_session`` (its pid is the group id, and is not reused while any member lives);
    nothing when the group has gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def descendants(pid: int) -> list[Any]:
    """psutil handles of ``pid``'s descendants (they know their start time: no pid-reuse mistakes)."""
    try:
        import psutil

        return list(psutil.Process(pid).children(recursive=True))
    except Exception:  # noqa: BLE001 - gone already
        return []


def kill_processes(processes: Sequence[Any]) -> None:
    """SIGKILL to each of ``processes`` (psutil handles) still running: what is left of a tree whose
    leader has gone (a server's Python-backend stubs, say)."""
    for process in processes:
        with contextlib.suppress(Exception):
            if process.is_running():
                process.kill()


def stop_on_signals() -> threading.Event:
    """For a detached supervisor (of a run or of the server): an event that SIGTERM and SIGINT set,
    with SIGHUP ignored, so that a closed terminal or a dropped SSH session never ends it."""
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return stop
