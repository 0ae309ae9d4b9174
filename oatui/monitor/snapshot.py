"""Frozen snapshots of the GPUs and the host, and their JSON form (the recording format).

A snapshot is plain data: numbers, strings, tuples and ``None`` where the driver or the operating
system did not give a value. The UI draws snapshots and nothing else; a recording is one
``MonitorSnapshot.to_dict()`` per line, as ``oatui gpus --json --watch`` writes it.

``from_dict`` checks every key and every type, because recordings come from files that people edit,
truncate and copy around: a bad one is a ``SnapshotFormatError`` naming the key, never a crash later
in the UI.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Bumped when a key changes meaning or disappears; new optional keys do not bump it.
RECORDING_FORMAT = 1

PROCESS_TYPES = ("compute", "graphics", "compute+graphics")


class SnapshotFormatError(ValueError):
    """A snapshot dictionary that does not have the keys or types of the recording format."""


@dataclass(frozen=True)
class GpuProcess:
    """One process holding a context on a GPU."""

    pid: int
    user: str | None
    command: str | None
    #: Bytes of GPU memory used by the process; None where the driver does not say (WDDM, MIG).
    gpu_memory: int | None
    #: "compute", "graphics", or "compute+graphics" for a process on both lists.
    type: str = "compute"
    #: Index of the MIG device the process runs in, on a GPU in MIG mode.
    mig_index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "user": self.user,
            "command": self.command,
            "gpu_memory": self.gpu_memory,
            "type": self.type,
            "mig_index": self.mig_index,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "process") -> GpuProcess:
        read = _Reader(data, where)
        process_type = read.string("type")
        if process_type not in PROCESS_TYPES:
            raise SnapshotFormatError(
                f"{where}.type: expected one of {', '.join(PROCESS_TYPES)}, got {process_type!r}"
            )
        return cls(
            pid=read.integer("pid"),
            user=read.optional_string("user"),
            command=read.optional_string("command"),
            gpu_memory=read.optional_integer("gpu_memory"),
            type=process_type,
            mig_index=read.optional_integer("mig_index", missing_ok=True),
        )


@dataclass(frozen=True)
class MigDevice:
    """One MIG instance of a GPU in MIG mode."""

    index: int
    uuid: str | None
    name: str | None
    gpu_instance_id: int | None
    compute_instance_id: int | None
    memory_used: int | None
    memory_total: int | None
    utilization_gpu: float | None
    utilization_memory: float | None

    @property
    def memory_percent(self) -> float | None:
        return _percent(self.memory_used, self.memory_total)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "gpu_instance_id": self.gpu_instance_id,
            "compute_instance_id": self.compute_instance_id,
            "memory_used": self.memory_used,
            "memory_total": self.memory_total,
            "utilization_gpu": self.utilization_gpu,
            "utilization_memory": self.utilization_memory,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "mig device") -> MigDevice:
        read = _Reader(data, where)
        return cls(
            index=read.integer("index"),
            uuid=read.optional_string("uuid"),
            name=read.optional_string("name"),
            gpu_instance_id=read.optional_integer("gpu_instance_id"),
            compute_instance_id=read.optional_integer("compute_instance_id"),
            memory_used=read.optional_integer("memory_used"),
            memory_total=read.optional_integer("memory_total"),
            utilization_gpu=read.optional_number("utilization_gpu"),
            utilization_memory=read.optional_number("utilization_memory"),
        )


@dataclass(frozen=True)
class GpuSnapshot:
    """One physical GPU at one moment. Units: %, bytes, degrees C, W, MHz, KB/s."""

    index: int
    uuid: str | None
    name: str | None
    utilization_gpu: float | None
    utilization_memory: float | None
    memory_used: int | None
    memory_total: int | None
    temperature: float | None
    power_draw: float | None
    power_limit: float | None
    fan: float | None
    clock_sm: int | None
    clock_mem: int | None
    pcie_rx: int | None
    pcie_tx: int | None
    #: True or False where the GPU supports MIG, None where it does not.
    mig_mode: bool | None
    mig_devices: tuple[MigDevice, ...]
    processes: tuple[GpuProcess, ...]

    @property
    def memory_percent(self) -> float | None:
        return _percent(self.memory_used, self.memory_total)

    @property
    def power_percent(self) -> float | None:
        return _percent(self.power_draw, self.power_limit)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "utilization_gpu": self.utilization_gpu,
            "utilization_memory": self.utilization_memory,
            "memory_used": self.memory_used,
            "memory_total": self.memory_total,
            "temperature": self.temperature,
            "power_draw": self.power_draw,
            "power_limit": self.power_limit,
            "fan": self.fan,
            "clock_sm": self.clock_sm,
            "clock_mem": self.clock_mem,
            "pcie_rx": self.pcie_rx,
            "pcie_tx": self.pcie_tx,
            "mig_mode": self.mig_mode,
            "mig_devices": [mig.to_dict() for mig in self.mig_devices],
            "processes": [process.to_dict() for process in self.processes],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "gpu") -> GpuSnapshot:
        read = _Reader(data, where)
        return cls(
            index=read.integer("index"),
            uuid=read.optional_string("uuid"),
            name=read.optional_string("name"),
            utilization_gpu=read.optional_number("utilization_gpu"),
            utilization_memory=read.optional_number("utilization_memory"),
            memory_used=read.optional_integer("memory_used"),
            memory_total=read.optional_integer("memory_total"),
            temperature=read.optional_number("temperature"),
            power_draw=read.optional_number("power_draw"),
            power_limit=read.optional_number("power_limit"),
            fan=read.optional_number("fan"),
            clock_sm=read.optional_integer("clock_sm"),
            clock_mem=read.optional_integer("clock_mem"),
            pcie_rx=read.optional_integer("pcie_rx"),
            pcie_tx=read.optional_integer("pcie_tx"),
            mig_mode=read.optional_boolean("mig_mode"),
            mig_devices=read.items("mig_devices", MigDevice.from_dict),
            processes=read.items("processes", GpuProcess.from_dict),
        )


@dataclass(frozen=True)
class HostSnapshot:
    """The machine itself. Units: %, bytes, seconds."""

    hostname: str | None
    #: Busy percent of each logical CPU since the previous sample.
    cpu_percent: tuple[float, ...]
    #: 1, 5 and 15 minute load averages.
    load_average: tuple[float, float, float] | None
    memory_used: int | None
    memory_total: int | None
    swap_used: int | None
    swap_total: int | None
    #: The folder whose file system ``disk_used`` / ``disk_total`` describe (the workspace).
    disk_path: str | None
    disk_used: int | None
    disk_total: int | None
    uptime: float | None

    @classmethod
    def empty(cls) -> HostSnapshot:
        """A host of which nothing is known: every value None, no CPUs."""
        return cls(None, (), None, None, None, None, None, None, None, None, None)

    @property
    def cpu_percent_mean(self) -> float | None:
        if not self.cpu_percent:
            return None
        return sum(self.cpu_percent) / len(self.cpu_percent)

    @property
    def memory_percent(self) -> float | None:
        return _percent(self.memory_used, self.memory_total)

    @property
    def swap_percent(self) -> float | None:
        return _percent(self.swap_used, self.swap_total)

    @property
    def disk_percent(self) -> float | None:
        return _percent(self.disk_used, self.disk_total)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "cpu_percent": list(self.cpu_percent),
            "load_average": None if self.load_average is None else list(self.load_average),
            "memory_used": self.memory_used,
            "memory_total": self.memory_total,
            "swap_used": self.swap_used,
            "swap_total": self.swap_total,
            "disk_path": self.disk_path,
            "disk_used": self.disk_used,
            "disk_total": self.disk_total,
            "uptime": self.uptime,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "host") -> HostSnapshot:
        read = _Reader(data, where)
        load = read.optional_numbers("load_average")
        if load is not None and len(load) != 3:
            raise SnapshotFormatError(f"{where}.load_average: expected 3 numbers, got {len(load)}")
        return cls(
            hostname=read.optional_string("hostname"),
            cpu_percent=read.numbers("cpu_percent"),
            load_average=None if load is None else (load[0], load[1], load[2]),
            memory_used=read.optional_integer("memory_used"),
            memory_total=read.optional_integer("memory_total"),
            swap_used=read.optional_integer("swap_used"),
            swap_total=read.optional_integer("swap_total"),
            disk_path=read.optional_string("disk_path"),
            disk_used=read.optional_integer("disk_used"),
            disk_total=read.optional_integer("disk_total"),
            uptime=read.optional_number("uptime"),
        )


@dataclass(frozen=True)
class MonitorSnapshot:
    """Everything the monitor knows at one moment: one line of a recording."""

    #: Seconds since the epoch.
    time: float
    host: HostSnapshot
    gpus: tuple[GpuSnapshot, ...]
    driver_version: str | None
    #: The CUDA version the driver supports, such as "12.4".
    cuda_version: str | None
    #: None, or one plain sentence saying why GPU metrics are missing.
    notice: str | None

    @classmethod
    def failed(cls, reason: str, now: float | None = None) -> MonitorSnapshot:
        """The snapshot of a sample that raised ``reason``: no GPUs, nothing known of the host, and a
        notice that says sampling failed and why. ``now`` defaults to the current time."""
        return cls(time.time() if now is None else now, HostSnapshot.empty(), (), None, None,
                   f"GPU sampling failed: {reason}")

    def gpu(self, index: int) -> GpuSnapshot | None:
        """The GPU with this physical index, or None."""
        for gpu in self.gpus:
            if gpu.index == index:
                return gpu
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORDING_FORMAT,
            "time": self.time,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "notice": self.notice,
            "host": self.host.to_dict(),
            "gpus": [gpu.to_dict() for gpu in self.gpus],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "snapshot") -> MonitorSnapshot:
        read = _Reader(data, where)
        version = read.integer("format")
        if version != RECORDING_FORMAT:
            raise SnapshotFormatError(
                f"{where}.format: this oatui reads recording format {RECORDING_FORMAT}, "
                f"not {version}"
            )
        return cls(
            time=read.timestamp("time"),
            host=read.child("host", HostSnapshot.from_dict),
            gpus=read.items("gpus", GpuSnapshot.from_dict),
            driver_version=read.optional_string("driver_version"),
            cuda_version=read.optional_string("cuda_version"),
            notice=read.optional_string("notice"),
        )


def _percent(used: float | None, total: float | None) -> float | None:
    if used is None or not total:
        return None
    return 100.0 * used / total


_MISSING = object()


class _Reader:
    """Typed access to one dictionary of a snapshot, with errors that name the key."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise SnapshotFormatError(f"{where}: expected an object, got {_kind(data)}")
        self.data = data
        self.where = where

    def _get(self, key: str, missing_ok: bool = False) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if missing_ok:
                return None
            raise SnapshotFormatError(f"{self.where}: missing key {key!r}")
        return value

    def _fail(self, key: str, expected: str, value: Any) -> SnapshotFormatError:
        return SnapshotFormatError(f"{self.where}.{key}: expected {expected}, got {_kind(value)}")

    def integer(self, key: str) -> int:
        value = self._get(key)
        if not _is_integer(value):
            raise self._fail(key, "a 64-bit integer", value)
        return value

    def optional_integer(self, key: str, missing_ok: bool = False) -> int | None:
        value = self._get(key, missing_ok)
        if value is not None and not _is_integer(value):
            raise self._fail(key, "a 64-bit integer or null", value)
        return value

    def timestamp(self, key: str) -> float:
        value = self.number(key)
        if not 0 <= value < _YEAR_10000:
            raise self._fail(key, "seconds since 1970", value)
        return value

    def number(self, key: str) -> float:
        value = self._get(key)
        if not _is_number(value):
            raise self._fail(key, "a finite number", value)
        return float(value)

    def optional_number(self, key: str) -> float | None:
        value = self._get(key)
        if value is None:
            return None
        if not _is_number(value):
            raise self._fail(key, "a finite number or null", value)
        return float(value)

    def numbers(self, key: str) -> tuple[float, ...]:
        value = self._get(key)
        if not isinstance(value, list) or not all(_is_number(item) for item in value):
            raise self._fail(key, "a list of finite numbers", value)
        return tuple(float(item) for item in value)

    def optional_numbers(self, key: str) -> tuple[float, ...] | None:
        if self._get(key) is None:
            return None
        return self.numbers(key)

    def string(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._fail(key, "a string", value)
        return value

    def optional_string(self, key: str) -> str | None:
        value = self._get(key)
        if value is not None and not isinstance(value, str):
            raise self._fail(key, "a string or null", value)
        return value

    def optional_boolean(self, key: str) -> bool | None:
        value = self._get(key)
        if value is not None and not isinstance(value, bool):
            raise self._fail(key, "true, false or null", value)
        return value

    def child(self, key: str, parse: Any) -> Any:
        return parse(self._get(key), f"{self.where}.{key}")

    def items(self, key: str, parse: Any) -> tuple[Any, ...]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._fail(key, "a list", value)
        return tuple(parse(item, f"{self.where}.{key}[{i}]") for i, item in enumerate(value))


_YEAR_10000 = 253402300800.0


def _is_integer(value: Any) -> bool:
    return type(value) is int and -(2**63) <= value < 2**64


def _is_number(value: Any) -> bool:
    if type(value) is int:
        return abs(value) < 2**1000  # float() of a larger integer overflows
    return type(value) is float and math.isfinite(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if type(value) is int and not _is_number(value):
            return "a number too large"
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 30 else value[:27] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
