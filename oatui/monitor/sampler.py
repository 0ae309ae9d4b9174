"""Sources of snapshots: the live ``Sampler`` and the ``ReplaySource`` of a recording.

Both have ``sample() -> MonitorSnapshot`` and ``close()``; the app and ``oatui gpus`` get one from
``make_source`` and never need to know which.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from oatui.errors import UserError
from oatui.monitor.host import HostSampler
from oatui.monitor.nvml import RETRY_INTERVAL_S, NvmlSession
from oatui.monitor.snapshot import MonitorSnapshot, SnapshotFormatError


class SnapshotSource(Protocol):
    def sample(self) -> MonitorSnapshot: ...

    def close(self) -> None: ...


class Sampler:
    """Live snapshots of this machine: every GPU through NVML, and the host through psutil.

    NVML is started on the first ``sample()``. Without a driver every snapshot carries the same
    ``notice`` and the host metrics; NVML is tried again at most every ``retry_interval`` seconds
    (None: never). ``sample()`` may be called from any one thread at a time.
    """

    def __init__(
        self,
        workspace: str | os.PathLike[str],
        *,
        retry_interval: float | None = RETRY_INTERVAL_S,
        nvml: NvmlSession | None = None,
    ) -> None:
        self.workspace = Path(workspace)
        self.nvml = nvml if nvml is not None else NvmlSession(retry_interval=retry_interval)
        self.host = HostSampler(self.workspace)
        self._lock = threading.Lock()

    def sample(self) -> MonitorSnapshot:
        with self._lock:
            gpus = self.nvml.query_gpus()
            host = self.host.sample()
            return MonitorSnapshot(
                time=round(time.time(), 3),
                host=host,
                gpus=gpus,
                driver_version=self.nvml.driver_version,
                cuda_version=self.nvml.cuda_version,
                notice=self.nvml.notice,
            )

    def close(self) -> None:
        self.nvml.close()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReplaySource:
    """Snapshots from a recording, one per ``sample()``, starting over after the last.

    Each snapshot comes back with its ``time`` set to now, so that history and sparklines move
    as they do live. The whole file is read and checked up front: a bad recording fails when it
    is opened, not halfway through a demo.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = Path(path)
        self.snapshots = read_recording(self.path)
        self._clock = clock
        self._position = 0

    def __len__(self) -> int:
        return len(self.snapshots)

    @property
    def position(self) -> int:
        """Index of the snapshot the next ``sample()`` returns."""
        return self._position

    def sample(self) -> MonitorSnapshot:
        snapshot = self.snapshots[self._position]
        self._position = (self._position + 1) % len(self.snapshots)
        return replace(snapshot, time=round(self._clock(), 3))

    def close(self) -> None:
        pass

    def __enter__(self) -> ReplaySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_source(
    replay: str | os.PathLike[str] | None, workspace: str | os.PathLike[str]
) -> Sampler | ReplaySource:
    """The replay of ``replay`` when given, else a live sampler (disk usage of ``workspace``)."""
    if replay is not None:
        return ReplaySource(replay)
    return Sampler(workspace)


def snapshot_to_line(snapshot: MonitorSnapshot) -> str:
    """One line of a recording (no newline)."""
    return json.dumps(snapshot.to_dict(), separators=(",", ":"), allow_nan=False)


def read_recording(path: str | os.PathLike[str]) -> list[MonitorSnapshot]:
    """Every snapshot of a recording (JSONL, one ``MonitorSnapshot.to_dict()`` per line).

    Blank lines are skipped. Anything else wrong is a one-line ``UserError`` naming the file and
    the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such recording") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a recording") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read the recording ({error.strerror or error})") from None
    snapshots = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        try:
            record = json.loads(text)
        except RecursionError:
            raise UserError(f"{where}: JSON nested too deeply") from None
        except ValueError as error:
            if isinstance(error, json.JSONDecodeError):
                message = f"{error.msg} at column {error.colno}"
            else:
                message = str(error)
            raise UserError(f"{where}: not JSON ({message})") from None
        try:
            snapshots.append(MonitorSnapshot.from_dict(record))
        except SnapshotFormatError as error:
            raise UserError(f"{where}: {error}") from None
    if not snapshots:
        raise UserError(
            f"{path}: the recording holds no snapshots "
            "(expected the JSON lines of 'oatui gpus --json --watch')"
        )
    return snapshots
