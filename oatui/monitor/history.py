"""The last N values of each metric of each GPU and of the host, for sparklines."""

from __future__ import annotations

from collections import deque

from oatui.monitor.snapshot import GpuSnapshot, HostSnapshot, MonitorSnapshot

DEFAULT_LENGTH = 120

#: GPU metrics kept: field or property names of ``GpuSnapshot``.
GPU_METRICS = (
    "utilization_gpu",
    "utilization_memory",
    "memory_percent",
    "memory_used",
    "temperature",
    "power_draw",
    "power_percent",
    "fan",
    "clock_sm",
    "clock_mem",
    "pcie_rx",
    "pcie_tx",
)

#: Host metrics kept: field or property names of ``HostSnapshot``, plus ``load_1m``.
HOST_METRICS = (
    "cpu_percent_mean",
    "memory_percent",
    "swap_percent",
    "disk_percent",
    "load_1m",
)


class History:
    """Bounded series per GPU (by physical index) and metric; None marks a missing value.

    Every series of a GPU gets one value per ``add`` while the GPU is present, so series of the
    same GPU line up. A GPU that disappears keeps its old values until they age out of the view.
    """

    def __init__(self, length: int = DEFAULT_LENGTH) -> None:
        if length < 1:
            raise ValueError("a history holds at least one sample")
        self.length = length
        self.times: deque[float] = deque(maxlen=length)
        self._gpus: dict[int, dict[str, deque[float | None]]] = {}
        self._host: dict[str, deque[float | None]] = {
            metric: deque(maxlen=length) for metric in HOST_METRICS
        }

    def add(self, snapshot: MonitorSnapshot) -> None:
        self.times.append(snapshot.time)
        for gpu in snapshot.gpus:
            series = self._gpus.get(gpu.index)
            if series is None:
                series = {metric: deque(maxlen=self.length) for metric in GPU_METRICS}
                self._gpus[gpu.index] = series
            for metric in GPU_METRICS:
                series[metric].append(_gpu_value(gpu, metric))
        for metric in HOST_METRICS:
            self._host[metric].append(_host_value(snapshot.host, metric))

    def gpu(self, index: int, metric: str) -> tuple[float | None, ...]:
        """The series of one GPU metric, oldest first; empty for a GPU never seen."""
        if metric not in GPU_METRICS:
            raise KeyError(f"unknown GPU metric {metric!r}; known: {', '.join(GPU_METRICS)}")
        series = self._gpus.get(index)
        return () if series is None else tuple(series[metric])

    def host(self, metric: str) -> tuple[float | None, ...]:
        """The series of one host metric, oldest first."""
        if metric not in HOST_METRICS:
            raise KeyError(f"unknown host metric {metric!r}; known: {', '.join(HOST_METRICS)}")
        return tuple(self._host[metric])

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        return tuple(sorted(self._gpus))

    def clear(self) -> None:
        self.times.clear()
        self._gpus.clear()
        for series in self._host.values():
            series.clear()


def _gpu_value(gpu: GpuSnapshot, metric: str) -> float | None:
    value = getattr(gpu, metric)
    return None if value is None else float(value)


def _host_value(host: HostSnapshot, metric: str) -> float | None:
    if metric == "load_1m":
        return None if host.load_average is None else host.load_average[0]
    value = getattr(host, metric)
    return None if value is None else float(value)
