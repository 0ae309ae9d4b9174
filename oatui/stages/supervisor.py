"""The supervisor: starts one stage, waits for it, and records how it ended in ``run.json``.

It runs in its own session (started by :func:`oatui.stages.launcher.spawn_supervisor`), ignores
hang-ups, and turns SIGTERM/SIGINT into a stop request for the stage's whole process group (all
ranks): the stage saves a checkpoint at its next step boundary and exits with ``EXIT_STOPPED``. A
stage that does not stop within ``--stop-timeout`` seconds is killed.

A run queued with ``--after`` (``after`` in its ``run.json``) first waits here for that run to end:
the stage starts only if it succeeded; otherwise this run ends ``failed`` without starting, and the
runs queued after this one follow in turn. A stop request while waiting ends it ``stopped``.

    python -m oatui.stages.supervisor --run-dir WORKSPACE/runs/RUN_ID
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from oatui.fsutil import tail_lines
from oatui.procutil import create_time, signal_child_group, stop_on_signals
from oatui.stages.rundir import EXIT_BAD_INPUT, EXIT_STOPPED, RunDir
from oatui.stages.runs import refresh

DEFAULT_STOP_TIMEOUT = 900.0


def signal_name(returncode: int) -> str | None:
    if returncode >= 0:
        # Launchers (accelerate, deepspeed, shells) report a child's signal as 128 + N.
        if 128 < returncode < 128 + 65:
            try:
                return signal.Signals(returncode - 128).name
            except ValueError:
                return None
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def outcome(returncode: int, stop_requested: bool, has_final: bool) -> str:
    """The run's end state. ``final/`` is written atomically as the stage's last act, so a stop that
    arrives once it exists (the stage was only tidying up) leaves the run ``succeeded``: its model is
    complete and ``latest`` finds it."""
    if returncode == 0:
        return "succeeded" if has_final else "failed"
    stopped = returncode == EXIT_STOPPED or (stop_requested and returncode in (
        -signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGKILL))
    if stopped:
        return "succeeded" if has_final else "stopped"
    return "failed"


def _last_log_line(run: RunDir) -> str | None:
    for line in reversed(tail_lines(run.log_path, 40)):
        line = line.strip()
        if line and not line.startswith(("[oatui]", "{")):
            return line[:300]
    return None


def supervise(run: RunDir, stop_timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
    from oatui.stages.launcher import stage_environment

    os.umask(0o077)
    info = run.read_info()
    stop = stop_on_signals()

    if info.after and not wait_for_parent(run, info.after, stop):
        return 1

    with open(run.log_path, "ab") as log:
        log.write(f"[oatui] {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(info.argv)}\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(  # noqa: S603 - argv from the launcher, never a shell
                info.argv,
                cwd=run.path,
                env=stage_environment(info, run),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a stop reaches every rank
                close_fds=True,
            )
        except OSError as error:
            run.update_info(state="failed", error=f"cannot start {info.argv[0]}: {error}", ended=time.time(),
                            exit_code=None)
            return 1
    run.update_info(
        state="running",
        pid=process.pid,
        pid_started=create_time(process.pid),
        supervisor_pid=os.getpid(),
        started=info.started or time.time(),
    )

    stop_sent_at: float | None = None
    while True:
        try:
            returncode = process.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        if stop.is_set() and stop_sent_at is None:
            stop_sent_at = time.time()
            run.update_info(stop_requested=True)
            signal_child_group(process.pid, signal.SIGTERM)
        if stop_sent_at is not None and time.time() - stop_sent_at > stop_timeout:
            signal_child_group(process.pid, signal.SIGKILL)
            stop_sent_at = float("inf")  # sent; wait for the exit

    # Ranks or helpers the launcher left behind must not outlive the run.
    signal_child_group(process.pid, signal.SIGTERM)
    time.sleep(0.2)
    signal_child_group(process.pid, signal.SIGKILL)

    current = run.read_info()
    state = outcome(returncode, current.stop_requested or stop.is_set(), (run.final / "config.json").exists())
    error = None
    if state == "failed":
        error = run.read_error()
        if error is None:
            name = signal_name(returncode)
            error = f"killed by {name}" if name else (_last_log_line(run) or f"exit status {returncode}")
    run.update_info(
        state=state,
        exit_code=returncode,
        signal=signal_name(returncode),
        error=error,
        ended=time.time(),
    )
    with open(run.log_path, "ab") as log:
        log.write(f"[oatui] {time.strftime('%Y-%m-%d %H:%M:%S')} {state} (exit status {returncode})\n".encode())
    return 0 if state == "succeeded" else (EXIT_BAD_INPUT if returncode == EXIT_BAD_INPUT else 1)


PARENT_POLL_S = 1.0


def wait_for_parent(run: RunDir, parent_id: str, stop: threading.Event) -> bool:
    """Wait for run ``parent_id`` to end. True when it succeeded (start the stage); otherwise this run
    is recorded as ended (``failed``, or ``stopped`` on a stop request) and False comes back."""
    parent = RunDir(run.path.parent / parent_id)
    _log_line(run, f"queued: starts when {parent_id} succeeds")
    while True:
        if stop.is_set() or run.read_info().stop_requested:
            _end_unstarted(run, "stopped", None, "stopped before it started")
            return False
        try:
            state = refresh(parent).state if parent.path.is_dir() else "gone"
        except ValueError:
            state = "unreadable"
        if state == "succeeded":
            _log_line(run, f"{parent_id} succeeded")
            return True
        if state not in ("queued", "running"):
            reason = f"parent {parent_id} ended {state}; not started"
            _end_unstarted(run, "failed", reason, reason)
            return False
        stop.wait(PARENT_POLL_S)


def _end_unstarted(run: RunDir, state: str, error: str | None, message: str) -> None:
    run.update_info(state=state, error=error, ended=time.time(), exit_code=None)
    _log_line(run, message)


def _log_line(run: RunDir, message: str) -> None:
    with open(run.log_path, "ab") as log:
        log.write(f"[oatui] {time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n".encode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m oatui.stages.supervisor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--stop-timeout", type=float, default=float(os.environ.get("OATUI_STOP_TIMEOUT", DEFAULT_STOP_TIMEOUT)))
    args = parser.parse_args(argv)
    sys.exit(supervise(RunDir(args.run_dir.absolute()), args.stop_timeout))


if __name__ == "__main__":
    main()
