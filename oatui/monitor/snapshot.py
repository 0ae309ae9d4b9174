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
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from typing import Any, ClassVar

#: Bumped when a key changes meaning or disappears; new optional keys do not bump it.
RECORDING_FORMAT = 1

PROCESS_TYPES = ("compute", "graphics", "compute+graphics")


class SnapshotFormatError(ValueError):
    """A snapshot dictionary that does not have the keys or types of the recording format."""


class _Record:
    """``to_dict`` / ``from_dict`` of a snapshot dataclass, driven by its fields' types.

    A field's key is its name; tuples are written as lists and nested snapshots as objects. Reading
    checks each key with the :class:`_Reader` method of its type, first the fields that carry a
    check of their own in their metadata (``choices``, ``timestamp``), then the others in order.
    A field whose default is None may be missing (a key added after the format's version).
    """

    #: What ``from_dict`` calls the object in its errors when nobody passes ``where``.
    WHERE: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {item.name: _encode(getattr(self, item.name)) for item in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> Any:
        read = _Reader(data, cls.WHERE if where is None else where)
        return cls(**{name: parse(read) for name, parse in _field_readers(cls)})


@dataclass(frozen=True)
class GpuProcess(_Record):
    """One process holding a context on a GPU."""

    WHERE: ClassVar[str] = "process"

    pid: int
    user: str | None
    command: str | None
    #: Bytes of GPU memory used by the process; None where the driver does not say (WDDM, MIG).
    gpu_memory: int | None
    #: "compute", "graphics", or "compute+graphics" for a process on both lists.
    type: str = field(default="compute", metadata={"choices": PROCESS_TYPES})
    #: Index of the MIG device the process runs in, on a GPU in MIG mode.
    mig_index: int | None = None


@dataclass(frozen=True)
class MigDevice(_Record):
    """One MIG instance of a GPU in MIG mode."""

    WHERE: ClassVar[str] = "mig device"

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


@dataclass(frozen=True)
class GpuSnapshot(_Record):
    """One physical GPU at one moment. Units: %, bytes, degrees C, W, MHz, KB/s."""

    WHERE: ClassVar[str] = "gpu"

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


@dataclass(frozen=True)
class HostSnapshot(_Record):
    """The machine itself. Units: %, bytes, seconds."""

    WHERE: ClassVar[str] = "host"

    hostname: str | None
    #: Busy percent of each logical CPU since the previous sample.
    cpu_percent: tuple[float, ...]
    #: 1, 5 and 15 minute load averages.
    load_average: tuple[float, float, float] | None = field(metadata={"length": 3})
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


@dataclass(frozen=True)
class MonitorSnapshot(_Record):
    """Everything the monitor knows at one moment: one line of a recording."""

    WHERE: ClassVar[str] = "snapshot"
    #: The order of the keys in a recording's line.
    KEYS: ClassVar[tuple[str, ...]] = ("time", "driver_version", "cuda_version", "notice", "host", "gpus")

    #: Seconds since the epoch.
    time: float = field(metadata={"timestamp": True})
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
        record = super().to_dict()
        return {"format": RECORDING_FORMAT, **{key: record[key] for key in self.KEYS}}

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> MonitorSnapshot:
        where = cls.WHERE if where is None else where
        version = _Reader(data, where).integer("format")
        if version != RECORDING_FORMAT:
            raise SnapshotFormatError(
                f"{where}.format: this oatui reads recording format {RECORDING_FORMAT}, "
                f"not {version}"
            )
        return super().from_dict(data, where)


def _percent(used: float | None, total: float | None) -> float | None:
    if used is None or not total:
        return None
    return 100.0 * used / total


_MISSING = object()


def _encode(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_encode(item) for item in value]
    if isinstance(value, _Record):
        return value.to_dict()
    return value


@cache
def _field_readers(cls: type) -> tuple[tuple[str, Callable[[_Reader], Any]], ...]:
    """``(name, read)`` for each field of ``cls``, in the order ``from_dict`` reads them."""
    hints = typing.get_type_hints(cls)
    readers = [(item.name, _field_reader(item.name, hints[item.name], item.default, item.metadata))
               for item in fields(cls)]
    checked = [item.name for item in fields(cls) if item.metadata]
    return tuple(sorted(readers, key=lambda reader: reader[0] not in checked))


def _field_reader(key: str, kind: Any, default: Any, meta: Any) -> Callable[[_Reader], Any]:
    args = typing.get_args(kind)
    optional = type(None) in args
    if optional:
        (kind,) = [arg for arg in args if arg is not type(None)]
        args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    read: Callable[[_Reader], Any]
    if kind is int:
        read = (lambda r: r.optional_integer(key)) if optional else (lambda r: r.integer(key))
    elif kind is float and not optional:
        read = (lambda r: r.timestamp(key)) if meta.get("timestamp") else (lambda r: r.number(key))
    elif kind is float:
        read = lambda r: r.optional_number(key)  # noqa: E731
    elif kind is str:
        read = (lambda r: r.optional_string(key)) if optional else (lambda r: r.string(key))
    elif kind is bool and optional:
        read = lambda r: r.optional_boolean(key)  # noqa: E731
    elif origin is tuple and args[-1] is Ellipsis and is_dataclass(args[0]) and not optional:
        item = args[0]
        read = lambda r: r.items(key, item.from_dict)  # noqa: E731
    elif origin is tuple and all(arg in (float, Ellipsis) for arg in args):
        read = (lambda r: r.optional_numbers(key)) if optional else (lambda r: r.numbers(key))
    elif is_dataclass(kind) and not optional:
        read = lambda r: r.child(key, kind.from_dict)  # noqa: E731
    else:
        raise TypeError(f"no reader for {key}: {kind}")
    checks = []
    if "choices" in meta:
        choices = meta["choices"]

        def check_choice(r: _Reader, value: Any) -> None:
            if value not in choices:
                raise SnapshotFormatError(f"{r.where}.{key}: expected one of {', '.join(choices)}, got {value!r}")

        checks.append(check_choice)
    if "length" in meta:
        length = meta["length"]

        def check_length(r: _Reader, value: Any) -> None:
            if value is not None and len(value) != length:
                raise SnapshotFormatError(f"{r.where}.{key}: expected {length} numbers, got {len(value)}")

        checks.append(check_length)
    missing_ok = default is None

    def read_field(r: _Reader) -> Any:
        if missing_ok and key not in r.data:
            return None
        value = read(r)
        for check in checks:
            check(r, value)
        return value

    return read_field


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
