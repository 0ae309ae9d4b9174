"""Which physical GPUs a process sees, from its ``CUDA_VISIBLE_DEVICES``.

CUDA reads the variable as a comma-separated list of entries, each one an index, a GPU UUID
(``GPU-8f3c...``, a unique prefix is enough), or a MIG device UUID (``MIG-...``, or the older
``MIG-GPU-<gpu uuid>/<gpu instance>/<compute instance>``). Parsing stops at the first entry that
names no device: the entries before it stay visible, the rest are ignored. Unset means every GPU;
set but empty means none.

Integer entries are taken as NVML indices (the ``nvidia-smi`` order, by PCI bus). CUDA numbers
devices the same way under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, and also by default on a machine of
identical GPUs; on a mixed machine its default puts the fastest first, which only the CUDA runtime
itself can tell.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from oatui.monitor.snapshot import GpuSnapshot

_INDEX = re.compile(r"\d+")
_OLD_MIG = re.compile(r"MIG-(GPU-[0-9A-Za-z-]+)/(\d+)/(\d+)")


@dataclass(frozen=True)
class VisibleDevice:
    """One device a CUDA process sees, in the order CUDA numbers them."""

    #: The physical GPU (NVML index).
    physical_index: int
    #: The MIG device slot on that GPU, when the entry named a MIG device.
    mig_index: int | None = None


def visible_devices(
    env_value: str | None, gpus: Sequence[GpuSnapshot]
) -> tuple[VisibleDevice, ...]:
    """The devices ``CUDA_VISIBLE_DEVICES=env_value`` exposes, in CUDA's order (0, 1, ...)."""
    if env_value is None:
        return tuple(VisibleDevice(gpu.index) for gpu in sorted(gpus, key=lambda g: g.index))
    seen: list[VisibleDevice] = []
    for raw in env_value.split(","):
        device = _resolve(raw.strip(), gpus)
        if device is None:
            break
        if device not in seen:
            seen.append(device)
    return tuple(seen)


def visible_physical_indices(env_value: str | None, gpus: Sequence[GpuSnapshot]) -> set[int]:
    """Physical indices of the GPUs a process with ``CUDA_VISIBLE_DEVICES=env_value`` uses."""
    return {device.physical_index for device in visible_devices(env_value, gpus)}


def _resolve(entry: str, gpus: Sequence[GpuSnapshot]) -> VisibleDevice | None:
    if not entry:
        return None
    if _INDEX.fullmatch(entry):
        index = int(entry)
        return VisibleDevice(index) if any(gpu.index == index for gpu in gpus) else None
    old_mig = _OLD_MIG.fullmatch(entry)
    if old_mig:
        gpu_uuid, gpu_instance, compute_instance = old_mig.groups()
        for gpu in gpus:
            if gpu.uuid is not None and gpu.uuid.lower() == gpu_uuid.lower():
                for mig in gpu.mig_devices:
                    if mig.gpu_instance_id == int(gpu_instance) and mig.compute_instance_id == int(
                        compute_instance
                    ):
                        return VisibleDevice(gpu.index, mig.index)
        return None
    lowered = entry.lower()
    if lowered.startswith("gpu-"):
        matches = [
            VisibleDevice(gpu.index)
            for gpu in gpus
            if gpu.uuid is not None and gpu.uuid.lower().startswith(lowered)
        ]
    elif lowered.startswith("mig-"):
        matches = [
            VisibleDevice(gpu.index, mig.index)
            for gpu in gpus
            for mig in gpu.mig_devices
            if mig.uuid is not None and mig.uuid.lower().startswith(lowered)
        ]
    else:
        return None
    # A prefix that fits two devices names neither.
    return matches[0] if len(matches) == 1 else None
