"""Host metrics from psutil: per-core CPU, load, memory, swap, the workspace's disk, uptime."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil

from oatui.monitor.snapshot import HostSnapshot

T = TypeVar("T")

#: The shortest span the first CPU reading is measured over; shorter ones are mostly noise.
MIN_FIRST_SPAN_S = 0.1


class HostSampler:
    """Samples the host. CPU percentages are measured between consecutive ``sample()`` calls.

    The sampler keeps its own previous CPU times rather than relying on
    ``psutil.cpu_percent(percpu=True)``, whose baseline is one global shared with every other
    caller in the process.
    """

    def __init__(self, disk_path: str | os.PathLike[str]) -> None:
        self.disk_path = Path(disk_path)
        self._previous_times = _cpu_times()
        self._previous_at = time.monotonic()
        self._first = True

    def sample(self) -> HostSnapshot:
        if self._first:
            # A one-shot `oatui gpus` samples right after construction: give the CPU counters a
            # moment to move so that the first reading means something.
            self._first = False
            wait = MIN_FIRST_SPAN_S - (time.monotonic() - self._previous_at)
            if wait > 0:
                time.sleep(wait)
        times = _cpu_times()
        cpu = cpu_percent_between(self._previous_times, times)
        self._previous_times = times
        self._previous_at = time.monotonic()

        memory = _quietly(psutil.virtual_memory)
        swap = _quietly(psutil.swap_memory)
        disk_folder = existing_ancestor(self.disk_path)
        disk = _quietly(lambda: psutil.disk_usage(str(disk_folder)))
        load = _quietly(os.getloadavg)
        boot = _quietly(psutil.boot_time)
        return HostSnapshot(
            hostname=_quietly(socket.gethostname),
            cpu_percent=cpu,
            load_average=None
            if load is None
            else (round(load[0], 2), round(load[1], 2), round(load[2], 2)),
            # "used" as top and htop mean it: what is not available to new programs.
            memory_used=None if memory is None else int(memory.total - memory.available),
            memory_total=None if memory is None else int(memory.total),
            swap_used=None if swap is None else int(swap.used),
            swap_total=None if swap is None else int(swap.total),
            disk_path=str(self.disk_path),
            disk_used=None if disk is None else int(disk.used),
            disk_total=None if disk is None else int(disk.total),
            uptime=None if boot is None else round(max(0.0, time.time() - boot), 1),
        )


def cpu_percent_between(before: Sequence[Any], after: Sequence[Any]) -> tuple[float, ...]:
    """Busy percent of each CPU between two ``psutil.cpu_times(percpu=True)`` readings.

    Computed the way psutil computes ``cpu_percent``: guest time is already counted in user time,
    and idle includes I/O wait. A CPU that went offline in between reads 0.
    """
    percents = []
    for index, now in enumerate(after):
        if index >= len(before):
            percents.append(0.0)
            continue
        total = _total(now) - _total(before[index])
        busy = total - (_idle(now) - _idle(before[index]))
        percents.append(round(min(100.0, max(0.0, 100.0 * busy / total)), 1) if total > 0 else 0.0)
    return tuple(percents)


def existing_ancestor(path: Path) -> Path:
    """``path`` itself, or its nearest existing parent (a workspace not created yet)."""
    path = path.absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def _cpu_times() -> list[Any]:
    return _quietly(lambda: psutil.cpu_times(percpu=True)) or []


def _total(times: Any) -> float:
    total = sum(times)
    # On Linux guest time is also counted in user time.
    total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    return total


def _idle(times: Any) -> float:
    return times.idle + getattr(times, "iowait", 0.0)


def _quietly(read: Callable[[], T]) -> T | None:
    """A metric the operating system refuses is None, not a crash of the monitor."""
    try:
        return read()
    except (OSError, psutil.Error, RuntimeError, AttributeError, NotImplementedError):
        return None
