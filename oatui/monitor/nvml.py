"""GPU metrics through NVML (nvidia-ml-py), turned into frozen snapshots.

``NvmlSession`` owns the NVML library for one sampler: it initialises it once, and when that fails
(no driver, no library, a driver/library mismatch) it remembers why as one plain sentence instead
of raising on every poll, and tries again only after ``retry_interval`` seconds.

``NvmlSession.query_gpus()`` is the one function that walks every device per poll and returns
``GpuSnapshot`` objects. A field the driver does not give (``NVMLError_NotSupported`` and
friends) becomes None; a whole device that fails to answer still appears, with Nones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

from oatui.monitor.processes import ProcessInfo, ProcessLookup
from oatui.monitor.snapshot import GpuProcess, GpuSnapshot, MigDevice

NO_DRIVER = "No NVIDIA driver found: GPU metrics unavailable; host metrics only."
DRIVER_NOT_LOADED = "The NVIDIA driver is not loaded: GPU metrics unavailable; host metrics only."
NO_BINDINGS = "nvidia-ml-py is not installed: GPU metrics unavailable; host metrics only."
NO_GPUS = "The NVIDIA driver reports no GPUs: host metrics only."

#: Default seconds between two attempts to start NVML after a failure.
RETRY_INTERVAL_S = 60.0

_MIB = 1 << 20


@dataclass
class _Device:
    """What does not change while NVML is up: the handle and the identity of one GPU."""

    index: int
    handle: Any
    uuid: str | None
    name: str | None


class NvmlSession:
    """NVML, initialised once, for one sampler.

    ``nvml`` is the ``pynvml`` module (or a stand-in with the same functions, for tests).
    ``retry_interval`` is how long to wait before trying ``nvmlInit`` again after it failed;
    None never tries again.
    """

    def __init__(
        self,
        nvml: ModuleType | None = None,
        *,
        retry_interval: float | None = RETRY_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        processes: ProcessLookup | None = None,
    ) -> None:
        self._nvml = nvml
        self._retry_interval = retry_interval
        self._clock = clock
        self._processes = processes or ProcessLookup()
        self._lock = threading.Lock()
        self._started = False
        self._attempted_at: float | None = None
        self._devices: list[_Device] = []
        self._pool: ThreadPoolExecutor | None = None
        self._process_functions: dict[str, Callable[[Any], Any] | None] = {}
        self.notice: str | None = None
        self.driver_version: str | None = None
        self.cuda_version: str | None = None
        self.init_attempts = 0

    @property
    def available(self) -> bool:
        """True while NVML is up and at least one GPU answers."""
        return self._started and bool(self._devices)

    def ensure_started(self) -> bool:
        """Start NVML unless it is up, or failed less than ``retry_interval`` seconds ago."""
        if self._started:
            return True
        now = self._clock()
        if self._attempted_at is not None and (
            self._retry_interval is None or now - self._attempted_at < self._retry_interval
        ):
            return False
        self._attempted_at = now
        self.init_attempts += 1
        self._start()
        return self._started

    def _start(self) -> None:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                self.notice = NO_BINDINGS
                return
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            self.notice = _init_failure(nvml, error)
            return
        except Exception as error:  # a library mismatch raises its own types
            self.notice = _could_not_start(error)
            return
        self._started = True
        self.driver_version = _field(nvml, nvml.nvmlSystemGetDriverVersion)
        cuda = _field(nvml, nvml.nvmlSystemGetCudaDriverVersion)
        # 12040 -> "12.4"
        self.cuda_version = None if cuda is None else f"{cuda // 1000}.{cuda % 1000 // 10}"
        count = _field(nvml, nvml.nvmlDeviceGetCount) or 0
        self._devices = []
        for index in range(count):
            handle = _field(nvml, nvml.nvmlDeviceGetHandleByIndex, index)
            self._devices.append(
                _Device(
                    index=index,
                    handle=handle,
                    uuid=None if handle is None else _field(nvml, nvml.nvmlDeviceGetUUID, handle),
                    name=None if handle is None else _field(nvml, nvml.nvmlDeviceGetName, handle),
                )
            )
        self.notice = None if self._devices else NO_GPUS

    def query_gpus(self) -> tuple[GpuSnapshot, ...]:
        """Every GPU, read in one pass. Empty when NVML is not up."""
        with self._lock:
            if not self.ensure_started() or not self._devices:
                return ()
            devices = list(self._devices)
            # nvmlDeviceGetPcieThroughput measures over 20 ms per call: reading the devices one
            # after the other would make an 8-GPU poll take a third of a second. NVML is
            # thread-safe, so the devices are read side by side, each one's calls in sequence.
            if len(devices) > 1:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max_workers=min(8, len(devices)), thread_name_prefix="oatui-nvml"
                    )
                raw = list(self._pool.map(self._read_device, devices))
            else:
                raw = [self._read_device(device) for device in devices]
            pids = {pid for _gpu, found in raw for pid in found}
            info = self._processes.lookup(pids)
            return tuple(_with_processes(gpu, found, info) for gpu, found in raw)

    def _read_device(self, device: _Device) -> tuple[GpuSnapshot, dict[int, _RawProcess]]:
        nvml = self._nvml
        handle = device.handle
        if handle is None:
            return _empty_gpu(device), {}

        def read(function: Callable[..., Any], *args: Any) -> Any:
            return _field(nvml, function, handle, *args)

        utilization = read(nvml.nvmlDeviceGetUtilizationRates)
        memory = read(nvml.nvmlDeviceGetMemoryInfo)
        power = read(nvml.nvmlDeviceGetPowerUsage)
        limit = read(nvml.nvmlDeviceGetEnforcedPowerLimit)
        mig = read(nvml.nvmlDeviceGetMigMode)
        mig_mode = None if mig is None else mig[0] == nvml.NVML_DEVICE_MIG_ENABLE
        mig_devices: list[MigDevice] = []
        mig_handles: list[tuple[int, Any]] = []
        if mig_mode:
            mig_devices, mig_handles = self._read_mig_devices(handle)
        found = self._read_processes(handle, mig_handles, mig_devices)
        gpu = GpuSnapshot(
            index=device.index,
            uuid=device.uuid,
            name=device.name,
            utilization_gpu=None if utilization is None else float(utilization.gpu),
            utilization_memory=None if utilization is None else float(utilization.memory),
            memory_used=None if memory is None else int(memory.used),
            memory_total=None if memory is None else int(memory.total),
            temperature=_float(read(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)),
            power_draw=None if power is None else power / 1000.0,
            power_limit=None if limit is None else limit / 1000.0,
            fan=_float(read(nvml.nvmlDeviceGetFanSpeed)),
            clock_sm=read(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM),
            clock_mem=read(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_MEM),
            pcie_rx=read(nvml.nvmlDeviceGetPcieThroughput, nvml.NVML_PCIE_UTIL_RX_BYTES),
            pcie_tx=read(nvml.nvmlDeviceGetPcieThroughput, nvml.NVML_PCIE_UTIL_TX_BYTES),
            mig_mode=mig_mode,
            mig_devices=tuple(mig_devices),
            processes=(),
        )
        return gpu, found

    def _read_mig_devices(self, handle: Any) -> tuple[list[MigDevice], list[tuple[int, Any]]]:
        nvml = self._nvml
        devices: list[MigDevice] = []
        handles: list[tuple[int, Any]] = []
        slots = _field(nvml, nvml.nvmlDeviceGetMaxMigDeviceCount, handle) or 0
        for slot in range(slots):
            # Empty slots answer NVMLError_NotFound: skip them.
            mig_handle = _field(nvml, nvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot)
            if mig_handle is None:
                continue
            memory = _field(nvml, nvml.nvmlDeviceGetMemoryInfo, mig_handle)
            # Most drivers do not report utilization per MIG instance: usually None.
            utilization = _field(nvml, nvml.nvmlDeviceGetUtilizationRates, mig_handle)
            devices.append(
                MigDevice(
                    index=slot,
                    uuid=_field(nvml, nvml.nvmlDeviceGetUUID, mig_handle),
                    name=_field(nvml, nvml.nvmlDeviceGetName, mig_handle),
                    gpu_instance_id=_field(nvml, nvml.nvmlDeviceGetGpuInstanceId, mig_handle),
                    compute_instance_id=_field(
                        nvml, nvml.nvmlDeviceGetComputeInstanceId, mig_handle
                    ),
                    memory_used=None if memory is None else int(memory.used),
                    memory_total=None if memory is None else int(memory.total),
                    utilization_gpu=None if utilization is None else float(utilization.gpu),
                    utilization_memory=None if utilization is None else float(utilization.memory),
                )
            )
            handles.append((slot, mig_handle))
        return devices, handles

    def _read_processes(
        self, handle: Any, mig_handles: list[tuple[int, Any]], mig_devices: list[MigDevice]
    ) -> dict[int, _RawProcess]:
        found: dict[int, _RawProcess] = {}
        # In MIG mode the parent handle lists processes only for privileged users; each MIG
        # device lists its own. Ask both, the MIG devices first so that they name the instance.
        for slot, mig_handle in mig_handles:
            for kind in ("compute", "graphics"):
                for entry in self._running(kind, mig_handle):
                    _add_process(found, entry, kind, slot)
        by_instance = {
            mig.gpu_instance_id: mig.index for mig in mig_devices if mig.gpu_instance_id is not None
        }
        for kind in ("compute", "graphics"):
            for entry in self._running(kind, handle):
                slot = (
                    by_instance.get(getattr(entry, "gpuInstanceId", None)) if by_instance else None
                )
                _add_process(found, entry, kind, slot)
        return found

    def _running(self, kind: str, handle: Any) -> list[Any]:
        """Running processes of one kind, through the newest process-list call the driver has."""
        nvml = self._nvml
        base = f"nvmlDeviceGet{kind.capitalize()}RunningProcesses"
        if base in self._process_functions:
            function = self._process_functions[base]
            return [] if function is None else (_field(nvml, function, handle) or [])
        # First call: find the newest version this driver exports (older drivers lack _v3).
        for suffix in ("_v3", "_v2", ""):
            function = getattr(nvml, base + suffix, None)
            if function is None:
                continue
            try:
                result = function(handle)
            except nvml.NVMLError_FunctionNotFound:
                continue
            except nvml.NVMLError:
                result = []  # the function exists; this device refused
            except Exception:
                continue  # pynvml's "library version mismatch" for unversioned calls
            self._process_functions[base] = function
            return list(result or [])
        self._process_functions[base] = None
        return []

    def close(self) -> None:
        """Shut NVML down (when it was started) and stop the reader threads."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._started:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:
                    pass  # shutting down; nothing to tell anyone
                self._started = False
                self._devices = []


@dataclass
class _RawProcess:
    pid: int
    gpu_memory: int | None
    types: set[str]
    mig_index: int | None


def _add_process(
    found: dict[int, _RawProcess], entry: Any, kind: str, mig_index: int | None
) -> None:
    pid = int(entry.pid)
    memory = getattr(entry, "usedGpuMemory", None)
    memory = None if memory is None else int(memory)
    known = found.get(pid)
    if known is None:
        found[pid] = _RawProcess(pid, memory, {kind}, mig_index)
        return
    known.types.add(kind)
    if memory is not None and (known.gpu_memory is None or memory > known.gpu_memory):
        known.gpu_memory = memory
    if known.mig_index is None:
        known.mig_index = mig_index


def _with_processes(
    gpu: GpuSnapshot, found: dict[int, _RawProcess], info: dict[int, ProcessInfo]
) -> GpuSnapshot:
    processes = []
    for pid in sorted(found):
        raw = found[pid]
        who = info.get(pid)
        processes.append(
            GpuProcess(
                pid=pid,
                user=None if who is None else who.user,
                command=None if who is None else who.command,
                gpu_memory=raw.gpu_memory,
                type="+".join(kind for kind in ("compute", "graphics") if kind in raw.types),
                mig_index=raw.mig_index,
            )
        )
    return replace(gpu, processes=tuple(processes)) if processes else gpu


def _empty_gpu(device: _Device) -> GpuSnapshot:
    return GpuSnapshot(
        index=device.index,
        uuid=device.uuid,
        name=device.name,
        utilization_gpu=None,
        utilization_memory=None,
        memory_used=None,
        memory_total=None,
        temperature=None,
        power_draw=None,
        power_limit=None,
        fan=None,
        clock_sm=None,
        clock_mem=None,
        pcie_rx=None,
        pcie_tx=None,
        mig_mode=None,
        mig_devices=(),
        processes=(),
    )


def _field(nvml: Any, function: Callable[..., Any], *args: Any) -> Any:
    """One NVML call; any NVML error (not supported, no permission, GPU lost) reads as None."""
    try:
        value = function(*args)
    except nvml.NVMLError:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _init_failure(nvml: Any, error: Exception) -> str:
    value = getattr(error, "value", None)
    if value == getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", object()):
        return NO_DRIVER
    if value == getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", object()):
        return DRIVER_NOT_LOADED
    return _could_not_start(error)


def _could_not_start(error: Exception) -> str:
    return f"NVML could not start ({_sentence(error)}): GPU metrics unavailable; host metrics only."


def _sentence(error: Exception) -> str:
    text = " ".join(str(error).split()).rstrip(".")
    return text or type(error).__name__
