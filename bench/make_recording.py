"""Synthesise the demo recordings that tests and demos replay.

This script does not measure anything: it synthesises, deterministically, recordings in exactly
the format ``oatui gpus --json --watch`` writes (one ``MonitorSnapshot.to_dict()`` per line), built
with the monitor's own snapshot classes. The values follow simple models of how the hardware
behaves, so that the UI has something realistic to draw on machines without GPUs:

- ``8xh100.jsonl``: 60 one-second snapshots of a DGX-style host with 8 H100 80GB GPUs. GPUs 0-5
  run one PPO training job (one rank per GPU, rollout and optimisation phases alternating, a
  checkpoint written near the end); GPU 6 and MIG device 0 of GPU 7 (in MIG mode, two 3g.40gb
  instances) run a tritonserver answering bursts of requests; a process from another container
  (no user, no command) comes and goes on GPU 5.
- ``no-driver.jsonl``: 3 snapshots of a laptop without an NVIDIA driver: host only, with the
  notice the live sampler gives.

Run from the repository root: ``.venv/bin/python bench/make_recording.py`` (``--out DIR`` to
write elsewhere). The same seed always writes the same bytes.
"""

from __future__ import annotations

import argparse
import math
import random
import uuid
from pathlib import Path

from oatui.monitor.nvml import NO_DRIVER
from oatui.monitor.sampler import snapshot_to_line
from oatui.monitor.snapshot import (
    GpuProcess,
    GpuSnapshot,
    HostSnapshot,
    MigDevice,
    MonitorSnapshot,
)

SEED = 20250115
START = 1736935200.0  # 2025-01-15 10:00:00 UTC
STEPS = 60
MIB = 1 << 20
GIB = 1 << 30

H100_NAME = "NVIDIA H100 80GB HBM3"
H100_MEMORY = 81559 * MIB
H100_POWER_LIMIT = 700.0
SM_MAX, SM_IDLE, MEM_CLOCK = 1980, 345, 2619
MIG_NAME = "NVIDIA H100 80GB HBM3 MIG 3g.40gb"
MIG_MEMORY = 40320 * MIB

TRAIN_PIDS = [48211 + rank for rank in range(6)]
TRAIN_COMMAND = (
    "/home/alice/oatui/.venv/bin/python -m oatui.train.ppo "
    "--run-dir /raid/alice/workspace/runs/20250115-094210-rl --local-rank {rank}"
)
TRITON_PID = 52007
TRITON_COMMAND = (
    "/opt/tritonserver/bin/tritonserver --model-repository /raid/alice/workspace/triton "
    "--http-port 8000 --grpc-port 8001 --metrics-port 8002 --http-address 127.0.0.1 "
    "--grpc-address 127.0.0.1 --metrics-address 127.0.0.1 --disable-auto-complete-config"
)
STRAY_PID = 91544  # lives in another container: NVML sees it, psutil cannot name it
STRAY_STEPS = range(20, 35)
CHECKPOINT_STEPS = range(40, 44)


def _uuid(rng: random.Random, prefix: str) -> str:
    return f"{prefix}-{uuid.UUID(int=rng.getrandbits(128), version=4)}"


def _training_phase(step: int) -> str:
    if step in CHECKPOINT_STEPS:
        return "checkpoint"
    # PPO: about 6 s of rollouts (generation), then about 5 s of optimisation.
    return "rollout" if step % 11 < 6 else "optimise"


def _power(rng: random.Random, utilization: float, idle: float = 72.0) -> float:
    return round(min(H100_POWER_LIMIT, idle + utilization / 100 * 615 + rng.uniform(-12, 12)), 1)


def _next_temperature(current: float, power: float) -> float:
    # First-order lag towards the steady temperature of this power draw.
    target = 31 + power * 0.066
    return current + (target - current) * 0.25


def synthesise_8xh100() -> list[MonitorSnapshot]:
    rng = random.Random(SEED)
    gpu_uuids = [_uuid(rng, "GPU") for _ in range(8)]
    mig_uuids = [_uuid(rng, "MIG") for _ in range(2)]
    temperatures = [44.0 + rng.uniform(-2, 2) for _ in range(8)]
    memory_offsets = [rng.uniform(-0.8, 0.8) * GIB for _ in range(6)]
    triton_load = 0.0
    snapshots = []
    for step in range(STEPS):
        phase = _training_phase(step)
        gpus = []
        # A burst of requests arrives now and then and decays over a few seconds.
        if rng.random() < 0.25:
            triton_load = min(1.0, triton_load + rng.uniform(0.4, 0.8))
        triton_load *= 0.7
        for index in range(8):
            processes: list[GpuProcess] = []
            mig_mode: bool | None = False
            mig_devices: tuple[MigDevice, ...] = ()
            if index < 6:
                if phase == "checkpoint":
                    utilization = rng.uniform(2, 9)
                    pcie_rx, pcie_tx = (
                        rng.randint(20_000, 60_000),
                        rng.randint(9_000_000, 13_500_000),
                    )
                elif phase == "rollout":
                    utilization = rng.uniform(58, 78)
                    pcie_rx, pcie_tx = rng.randint(150_000, 450_000), rng.randint(80_000, 300_000)
                else:
                    utilization = min(100.0, rng.uniform(93, 101))
                    pcie_rx, pcie_tx = (
                        rng.randint(600_000, 2_400_000),
                        rng.randint(500_000, 2_000_000),
                    )
                # Memory grows while the allocator warms up, then breathes with the phases.
                warm = min(1.0, step / 25)
                process_memory = int(
                    58 * GIB
                    + warm * 9 * GIB
                    + memory_offsets[index]
                    + (2.5 * GIB if phase == "optimise" else 0)
                )
                processes.append(
                    GpuProcess(
                        pid=TRAIN_PIDS[index],
                        user="alice",
                        command=TRAIN_COMMAND.format(rank=index),
                        gpu_memory=process_memory,
                        type="compute",
                    )
                )
                if index == 5 and step in STRAY_STEPS:
                    processes.append(
                        GpuProcess(
                            pid=STRAY_PID,
                            user=None,
                            command=None,
                            gpu_memory=2150 * MIB,
                            type="compute",
                        )
                    )
                memory_used = sum(p.gpu_memory or 0 for p in processes) + 531 * MIB
                utilization_memory = utilization * rng.uniform(0.38, 0.5)
                power = _power(rng, utilization)
            elif index == 6:
                utilization = min(100.0, triton_load * 85 + rng.uniform(0, 3))
                process_memory = int(35.4 * GIB)
                processes.append(
                    GpuProcess(
                        pid=TRITON_PID,
                        user="alice",
                        command=TRITON_COMMAND,
                        gpu_memory=process_memory,
                        type="compute",
                    )
                )
                memory_used = process_memory + 531 * MIB
                utilization_memory = utilization * rng.uniform(0.55, 0.7)
                power = _power(rng, utilization * 0.7)
                pcie_rx = int(20_000 + triton_load * rng.uniform(200_000, 400_000))
                pcie_tx = int(10_000 + triton_load * rng.uniform(50_000, 120_000))
            else:
                # MIG mode: NVML gives no utilization for the parent GPU nor, on most drivers,
                # for the instances.
                utilization = None
                utilization_memory = None
                mig_used = [int(17.2 * GIB) + 96 * MIB, 38 * MIB]
                mig_devices = tuple(
                    MigDevice(
                        index=slot,
                        uuid=mig_uuids[slot],
                        name=MIG_NAME,
                        gpu_instance_id=(1, 2)[slot],
                        compute_instance_id=0,
                        memory_used=mig_used[slot],
                        memory_total=MIG_MEMORY,
                        utilization_gpu=None,
                        utilization_memory=None,
                    )
                    for slot in range(2)
                )
                mig_mode = True
                processes.append(
                    GpuProcess(
                        pid=TRITON_PID,
                        user="alice",
                        command=TRITON_COMMAND,
                        gpu_memory=int(17.2 * GIB),
                        type="compute",
                        mig_index=0,
                    )
                )
                memory_used = sum(mig_used) + 313 * MIB
                power = _power(rng, triton_load * 40)
                pcie_rx = int(15_000 + triton_load * rng.uniform(100_000, 200_000))
                pcie_tx = int(8_000 + triton_load * rng.uniform(20_000, 60_000))
            temperatures[index] = _next_temperature(temperatures[index], power)
            busy = utilization is None and triton_load > 0.05 or (utilization or 0) > 1
            clock_sm = SM_MAX if busy else SM_IDLE
            if power >= 690:
                clock_sm = rng.choice((1830, 1875, 1920))  # power capping
            gpus.append(
                GpuSnapshot(
                    index=index,
                    uuid=gpu_uuids[index],
                    name=H100_NAME,
                    utilization_gpu=None if utilization is None else float(round(utilization)),
                    utilization_memory=None
                    if utilization_memory is None
                    else float(round(utilization_memory)),
                    memory_used=memory_used,
                    memory_total=H100_MEMORY,
                    temperature=float(round(temperatures[index])),
                    power_draw=power,
                    power_limit=H100_POWER_LIMIT,
                    fan=None,  # SXM modules have no fan of their own
                    clock_sm=clock_sm,
                    clock_mem=MEM_CLOCK,
                    pcie_rx=pcie_rx,
                    pcie_tx=pcie_tx,
                    mig_mode=mig_mode,
                    mig_devices=mig_devices,
                    processes=tuple(processes),
                )
            )
        snapshots.append(
            MonitorSnapshot(
                time=START + step,
                host=_dgx_host(rng, step, phase),
                gpus=tuple(gpus),
                driver_version="550.90.07",
                cuda_version="12.4",
                notice=None,
            )
        )
    return snapshots


def _dgx_host(rng: random.Random, step: int, phase: str) -> HostSnapshot:
    cores = 32
    # Six data-loader and rank processes keep a few cores busy; rollouts tokenise more.
    busy_cores = 6 if phase != "rollout" else 9
    cpu = tuple(
        round(rng.uniform(70, 100) if core < busy_cores else rng.uniform(0, 12), 1)
        for core in range(cores)
    )
    load = 7.5 + 2.0 * math.sin(step / 9)
    return HostSnapshot(
        hostname="dgx-h100-07",
        cpu_percent=cpu,
        load_average=(round(load, 2), round(load * 0.93, 2), round(load * 0.81, 2)),
        memory_used=int((388 + 6 * math.sin(step / 7)) * GIB),
        memory_total=2015 * GIB,
        swap_used=0,
        swap_total=8 * GIB,
        disk_path="/raid/alice/workspace",
        # The checkpoint lands on the disk.
        disk_used=int((2204 + (3 if step >= CHECKPOINT_STEPS.stop else 0)) * GIB),
        disk_total=7153 * GIB,
        uptime=1_046_712.0 + step,
    )


def synthesise_no_driver() -> list[MonitorSnapshot]:
    rng = random.Random(SEED + 1)
    snapshots = []
    for step in range(3):
        snapshots.append(
            MonitorSnapshot(
                time=START + step,
                host=HostSnapshot(
                    hostname="laptop",
                    cpu_percent=tuple(round(rng.uniform(1, 30), 1) for _ in range(8)),
                    load_average=(0.84, 0.71, 0.66),
                    memory_used=int((6.1 + 0.05 * step) * GIB),
                    memory_total=16 * GIB,
                    swap_used=212 * MIB,
                    swap_total=2 * GIB,
                    disk_path="/home/alice/workspace",
                    disk_used=171 * GIB,
                    disk_total=476 * GIB,
                    uptime=18_230.0 + step,
                ),
                gpus=(),
                driver_version=None,
                cuda_version=None,
                notice=NO_DRIVER,
            )
        )
    return snapshots


def write(path: Path, snapshots: list[MonitorSnapshot]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(snapshot_to_line(snapshot) + "\n" for snapshot in snapshots))
    print(f"{path}: {len(snapshots)} snapshots, {path.stat().st_size} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("tests/data/recordings"), help="folder to write into"
    )
    args = parser.parse_args()
    write(args.out / "8xh100.jsonl", synthesise_8xh100())
    write(args.out / "no-driver.jsonl", synthesise_no_driver())


if __name__ == "__main__":
    main()
