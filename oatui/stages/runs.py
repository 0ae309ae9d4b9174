"""Reading runs back: listing, liveness, progress and ETA, which runs ended since last seen, stopping.

Used by ``oatui runs`` and by the app; plain Python, no torch. A run whose supervisor died
without recording a result (``kill -9``, a reboot) is found here and marked ``failed``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oatui.errors import UserError
from oatui.fsutil import json_objects, locked
from oatui.procutil import process_alive, signal_group, signal_process
from oatui.stages.rundir import ACTIVE_STATES, RunDir, RunInfo, valid_run_id

# A queued run without a recorded supervisor this long after the launch is considered lost. A run
# queued with --after waits as long as it must: its supervisor is alive, and that is what counts.
QUEUED_GRACE_S = 60.0


def refresh(run: RunDir, info: RunInfo | None = None) -> RunInfo:
    """``info`` with a dead supervisor's run corrected to ``failed`` (and written back)."""
    info = info or run.read_info()
    if info.state not in ACTIVE_STATES:
        return info
    supervisor_alive = process_alive(info.supervisor_pid, info.supervisor_started)
    if supervisor_alive:
        return info
    if info.state == "queued" and info.supervisor_pid is None and time.time() - info.created < QUEUED_GRACE_S:
        return info  # the launcher is about to start the supervisor
    if process_alive(info.pid, info.pid_started):
        return info  # the stage still runs; its supervisor is gone, so nobody will record the end

    with locked(run.info_path):
        current = run.read_info()
        if current.state not in ACTIVE_STATES:
            return current
        current.state = "failed"
        current.ended = current.ended or time.time()
        current.error = run.read_error() or "the run's supervisor ended without recording a result (killed?)"
        run.write_info(current)
    return current


def format_clock(seconds: float | None) -> str:
    """Elapsed time or ETA as a clock: 1:02:03, 2:03; '-' when unknown."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class RunView:
    """What a list of runs shows for one run, derived from run.json and the last metrics line."""

    id: str
    path: Path
    info: RunInfo | None
    problem: str | None = None
    last: dict[str, Any] | None = None
    first_step: tuple[int, float] | None = None
    """(step, time) of this attempt's first logged step: the rate behind the ETA."""

    @property
    def stage(self) -> str:
        return self.info.stage if self.info else "?"

    @property
    def state(self) -> str:
        return self.info.state if self.info else "broken"

    @property
    def active(self) -> bool:
        """Queued or running: not ended yet."""
        return self.state in ACTIVE_STATES

    @property
    def step(self) -> int:
        value = (self.last or {}).get("step")
        return value if isinstance(value, int) else 0

    @property
    def total_steps(self) -> int:
        value = (self.last or {}).get("total_steps")
        return value if isinstance(value, int) else 0

    @property
    def progress(self) -> float | None:
        if self.state == "succeeded":
            return 1.0
        return min(1.0, self.step / self.total_steps) if self.total_steps else None

    @property
    def elapsed(self) -> float | None:
        if not self.info or not self.info.started:
            return None
        end = self.info.ended if self.info.state not in ACTIVE_STATES and self.info.ended else time.time()
        return max(0.0, end - self.info.started)

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate since the first logged step (None before a rate is known)."""
        if self.state != "running" or not self.total_steps or self.step <= 0 or not self.last:
            return None
        if self.first_step is None:
            return None
        steps = self.step - self.first_step[0]
        seconds = float(self.last.get("time", time.time())) - self.first_step[1]
        if steps <= 0 or seconds <= 0:
            return None
        return (self.total_steps - self.step) * seconds / steps

    def to_dict(self) -> dict[str, Any]:
        info = self.info
        return {
            "id": self.id,
            "stage": self.stage,
            "state": self.state,
            "step": self.step,
            "total_steps": self.total_steps,
            "pid": info.pid if info else None,
            "started": info.started if info else None,
            "ended": info.ended if info else None,
            "elapsed_s": round(self.elapsed, 1) if self.elapsed is not None else None,
            "eta_s": round(self.eta, 1) if self.eta is not None else None,
            "exit_code": info.exit_code if info else None,
            "signal": info.signal if info else None,
            "error": (info.error if info else self.problem),
            "configs": info.configs if info else [],
            "launcher": info.launcher if info else None,
            "gpus": info.gpus if info else None,
            "final": str(self.path / "final") if (self.path / "final" / "config.json").exists() else None,
            "path": str(self.path),
            "after": info.after if info else None,
        }


def _first_step(run: RunDir) -> tuple[int, float] | None:
    """The first metrics line of the current attempt, for the rate behind the ETA."""
    try:
        with open(run.metrics_path, encoding="utf-8", errors="replace") as handle:
            for record in json_objects(handle):
                if isinstance(record.get("step"), int) and record["step"] > 0:
                    return record["step"], float(record.get("time", 0))
    except FileNotFoundError:
        return None
    return None


def view(run: RunDir, with_rate: bool = True) -> RunView:
    try:
        info = refresh(run)
    except ValueError as error:
        return RunView(run.id, run.path, None, problem=str(error))
    result = RunView(run.id, run.path, info, last=run.last_metrics())
    if with_rate and info.state == "running":
        first = _first_step(run)
        if first and info.started and first[1] < info.started:
            first = None  # from an earlier attempt; wait for this one's second log line
        result.first_step = first
    return result


def list_runs(runs_dir: Path) -> list[RunView]:
    """Every run folder, newest first; a folder with a broken run.json is listed with its problem."""
    if not runs_dir.is_dir():
        return []
    views = []
    for child in runs_dir.iterdir():
        if child.is_dir() and not child.name.startswith(".") and valid_run_id(child.name):
            views.append(view(RunDir(child)))
    views.sort(key=lambda v: (v.info.created if v.info else 0.0, v.id), reverse=True)
    return views


def ended_since(seen: Mapping[str, str], runs: Iterable[RunView]) -> list[RunView]:
    """The runs of ``runs`` that were queued or running when last seen and no longer are (succeeded,
    failed, stopped, or broken), in the order of ``runs``. ``seen`` maps run ids to the state each run
    was last seen in; a run missing from it was never seen active, so it has not ended since."""
    return [run for run in runs if seen.get(run.id) in ACTIVE_STATES and not run.active]


def find_run(runs_dir: Path, run_id: str) -> RunDir:
    if not valid_run_id(run_id) or not (runs_dir / run_id).is_dir():
        # Allow a unique prefix, as users type the start of an id.
        matches = [p for p in runs_dir.glob(f"{run_id}*") if p.is_dir()] if valid_run_id(run_id) else []
        if len(matches) == 1:
            return RunDir(matches[0])
        if len(matches) > 1:
            raise UserError(f"run {run_id!r} is ambiguous: {', '.join(sorted(p.name for p in matches)[:5])}")
        raise UserError(f"no run {run_id!r} in {runs_dir}")
    return RunDir(runs_dir / run_id)


def latest_final(runs_dir: Path, stage: str) -> Path | None:
    """``final/`` of the newest succeeded run of ``stage`` (what ``sft_model: latest`` means)."""
    for run_view in list_runs(runs_dir):
        if run_view.stage == stage and run_view.state == "succeeded" and (run_view.path / "final" / "config.json").exists():
            return run_view.path / "final"
    return None


#: How to make the run that ``sft_model: latest`` / ``rm_model: latest`` needs.
FIRST_RUN = {"sft": "oatui train sft --configs defaults tiny", "rm": "oatui train rm --configs defaults_rm tiny_rm"}


def require_latest_final(workspace_root: Path, stage: str, key: str | None = None) -> Path:
    """:func:`latest_final`, or a one-line error saying which run to make first (or which ``key`` to set)."""
    final = latest_final(workspace_root / "runs", stage)
    if final is None:
        raise UserError(f"no succeeded {stage} run in {workspace_root}; train one with "
                        f"`{FIRST_RUN[stage]}` or set {key or stage + '_model'}")
    return final


def stop_run(run: RunDir, force: bool = False) -> RunInfo:
    """Ask a run to stop (checkpoint, then ``stopped``), or kill it with ``force``."""
    try:
        info = refresh(run)
    except ValueError as error:
        raise UserError(f"{run.id}: {error}") from None
    if info.state not in ACTIVE_STATES:
        raise UserError(f"run {run.id} is not running (it {info.state})")
    info = run.update_info(stop_requested=True)
    # The stage leads its own process group (its supervisor starts it in a new session).
    if force and info.pid is not None:
        signal_group(info.pid, info.pid_started, signal.SIGKILL)
        return info
    # A queued run's supervisor (still waiting for the run it follows) ends it unstarted.
    if not signal_process(info.supervisor_pid, info.supervisor_started, signal.SIGTERM):
        signal_group(info.pid, info.pid_started, signal.SIGTERM)
    return info


def wait_for_end(run: RunDir, timeout: float | None = None, poll: float = 0.5) -> RunInfo:
    deadline = None if timeout is None else time.time() + timeout
    while True:
        info = refresh(run)
        if info.state not in ACTIVE_STATES:
            return info
        if deadline is not None and time.time() > deadline:
            return info
        time.sleep(poll)
