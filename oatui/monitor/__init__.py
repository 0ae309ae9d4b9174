"""GPU (NVML) and host snapshots, recording and replay.

Nothing here imports textual, torch or anything heavy: the monitor freezes hardware queries into
snapshots (``snapshot.py``), and the app and ``oatui gpus`` only draw snapshots.

- ``Sampler`` reads this machine; ``ReplaySource`` replays a recording; ``make_source`` picks one.
- ``MonitorSnapshot.to_dict()`` per line is the recording format (``oatui gpus --json --watch``).
- ``History`` keeps the last values per GPU and metric for sparklines.
- ``visible_physical_indices`` maps ``CUDA_VISIBLE_DEVICES`` onto physical GPUs.
- ``owners.OwnerFinder`` tells which GPU processes and GPUs belong to the workspace's runs.
"""

from oatui.monitor.history import GPU_METRICS, HOST_METRICS, History
from oatui.monitor.sampler import (
    ReplaySource,
    Sampler,
    SnapshotSource,
    make_source,
    read_recording,
    snapshot_to_line,
)
from oatui.monitor.snapshot import (
    RECORDING_FORMAT,
    GpuProcess,
    GpuSnapshot,
    HostSnapshot,
    MigDevice,
    MonitorSnapshot,
    SnapshotFormatError,
)
from oatui.monitor.visible import VisibleDevice, visible_devices, visible_physical_indices

__all__ = [
    "GPU_METRICS",
    "HOST_METRICS",
    "RECORDING_FORMAT",
    "GpuProcess",
    "GpuSnapshot",
    "History",
    "HostSnapshot",
    "MigDevice",
    "MonitorSnapshot",
    "ReplaySource",
    "Sampler",
    "SnapshotFormatError",
    "SnapshotSource",
    "VisibleDevice",
    "make_source",
    "read_recording",
    "snapshot_to_line",
    "visible_devices",
    "visible_physical_indices",
]
