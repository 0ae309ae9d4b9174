"""The GPU and host monitor: snapshots, sampling, recordings, replay and `oatui gpus`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import psutil
import pynvml
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import as_foreground_job
from oatui.cli import main
from oatui.errors import UserError
from oatui.monitor import (
    GpuProcess,
    GpuSnapshot,
    History,
    HostSnapshot,
    MigDevice,
    MonitorSnapshot,
    ReplaySource,
    Sampler,
    SnapshotFormatError,
    make_source,
    read_recording,
    snapshot_to_line,
    visible_devices,
    visible_physical_indices,
)
from oatui.monitor.host import HostSampler, cpu_percent_between
from oatui.monitor.nvml import NO_DRIVER, NvmlSession
from oatui.monitor.owners import EMPTY, ActiveRun, OwnerFinder
from oatui.monitor.processes import ProcessLookup
from oatui.monitor.text import format_bytes, format_duration, format_rate_kb, format_snapshot
from oatui.monitor.visible import VisibleDevice

RECORDINGS = Path(__file__).parent / "data" / "recordings"
H100 = RECORDINGS / "8xh100.jsonl"
NO_DRIVER_RECORDING = RECORDINGS / "no-driver.jsonl"
OATUI = Path(sys.executable).with_name("oatui")


def _nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


HAS_DRIVER = _nvml_works()


@pytest.fixture(scope="module")
def h100() -> list[MonitorSnapshot]:
    return read_recording(H100)


def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- the live sampler on this machine -----------------------------------------------------------


def test_sampler_on_this_machine_says_once_and_keeps_the_host(tmp_path, monkeypatch):
    calls = []
    real_init = pynvml.nvmlInit

    def counting_init():
        calls.append(1)
        return real_init()

    monkeypatch.setattr(pynvml, "nvmlInit", counting_init)
    with Sampler(tmp_path / "workspace") as sampler:
        first = sampler.sample()
        second = sampler.sample()
    assert len(calls) == 1, "NVML was started again on the second poll"
    if HAS_DRIVER:
        assert first.gpus and first.notice is None and first.driver_version
    else:
        assert first.notice == NO_DRIVER == second.notice
        assert first.gpus == () and first.driver_version is None and first.cuda_version is None
    for snapshot in (first, second):
        host = snapshot.host
        assert len(host.cpu_percent) == psutil.cpu_count()
        assert all(0.0 <= value <= 100.0 for value in host.cpu_percent)
        assert host.load_average is not None and all(value >= 0 for value in host.load_average)
        assert 0 < host.memory_used <= host.memory_total
        assert 0 <= host.swap_used <= host.swap_total or host.swap_total == 0
        assert 0 < host.disk_used <= host.disk_total
        assert host.disk_path == str(tmp_path / "workspace")
        assert host.uptime > 0
        assert abs(snapshot.time - time.time()) < 60
    assert not (tmp_path / "workspace").exists(), "sampling created the workspace"
    # A snapshot of this machine is a valid line of a recording.
    assert MonitorSnapshot.from_dict(json.loads(snapshot_to_line(second))) == second


def test_nvml_failure_is_retried_only_after_the_interval():
    now = [1000.0]

    def refuse():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    fake = SimpleNamespace(
        NVMLError=pynvml.NVMLError, NVML_ERROR_LIBRARY_NOT_FOUND=12, nvmlInit=refuse
    )
    session = NvmlSession(fake, retry_interval=60.0, clock=lambda: now[0])
    for _ in range(5):
        assert session.query_gpus() == ()
        now[0] += 10
    assert session.init_attempts == 1 and session.notice == NO_DRIVER
    now[0] += 20
    assert session.query_gpus() == ()
    assert session.init_attempts == 2
    never = NvmlSession(fake, retry_interval=None, clock=lambda: now[0])
    never.query_gpus()
    now[0] += 10_000
    never.query_gpus()
    assert never.init_attempts == 1


def test_driver_not_loaded_and_odd_failures_are_one_sentence():
    def not_loaded():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    def mismatch():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)

    for init, expected in (
        (not_loaded, "driver is not loaded"),
        (mismatch, "NVML could not start"),
    ):
        fake = SimpleNamespace(
            NVMLError=pynvml.NVMLError,
            NVML_ERROR_LIBRARY_NOT_FOUND=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
            NVML_ERROR_DRIVER_NOT_LOADED=pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
            nvmlInit=init,
        )
        session = NvmlSession(fake)
        assert session.query_gpus() == ()
        assert expected in session.notice and "\n" not in session.notice
        assert session.notice.endswith("host metrics only.")


# --- NVML queries, against a stand-in driver ----------------------------------------------------


def _nvml_error(code):
    def raise_it(*_args):
        raise pynvml.NVMLError(code)

    return raise_it


NOT_SUPPORTED = _nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)


def _vanished_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _fake_nvml(vanished_pid: int):
    """Three GPUs: a plain one, one in MIG mode, one that is lost."""
    me = os.getpid()
    memory = {
        ("gpu", 0): SimpleNamespace(used=10 * 2**30, total=80 * 2**30),
        ("gpu", 1): SimpleNamespace(used=20 * 2**30, total=80 * 2**30),
        ("mig", 1, 0): SimpleNamespace(used=15 * 2**30, total=40 * 2**30),
        ("mig", 1, 2): SimpleNamespace(used=2**25, total=20 * 2**30),
    }
    process = namedtuple("process", "pid usedGpuMemory gpuInstanceId computeInstanceId")

    def handle_by_index(index):
        if index == 2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return ("gpu", index)

    def utilization(handle):
        if handle == ("gpu", 0):
            return SimpleNamespace(gpu=87, memory=40)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def mig_handle(handle, slot):
        if slot == 1:  # an empty slot
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return ("mig", handle[1], slot)

    def compute_v2(handle):
        if handle == ("gpu", 0):
            return [process(me, 3 * 2**30, 0, 0), process(vanished_pid, 2**30, 0, 0)]
        if handle == ("mig", 1, 0):
            return [process(me, 5 * 2**30, 1, 0)]
        if handle == ("gpu", 1):  # the parent of MIG devices: privileged users only
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        return []

    def graphics_v3(handle):
        return [process(me, None, 0, 0)] if handle == ("gpu", 0) else []

    names = {("gpu", 0): b"NVIDIA H100 80GB HBM3", ("gpu", 1): "NVIDIA A100-SXM4-80GB"}
    uuids = {
        ("gpu", 0): "GPU-aaaa",
        ("gpu", 1): "GPU-bbbb",
        ("mig", 1, 0): "MIG-cccc",
        ("mig", 1, 2): "MIG-dddd",
    }
    calls = {"init": 0, "shutdown": 0}

    def init():
        calls["init"] += 1

    def shutdown():
        calls["shutdown"] += 1

    fake = SimpleNamespace(
        calls=calls,
        NVMLError=pynvml.NVMLError,
        NVMLError_FunctionNotFound=pynvml.NVMLError_FunctionNotFound,
        NVML_ERROR_LIBRARY_NOT_FOUND=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
        NVML_DEVICE_MIG_ENABLE=pynvml.NVML_DEVICE_MIG_ENABLE,
        NVML_TEMPERATURE_GPU=pynvml.NVML_TEMPERATURE_GPU,
        NVML_CLOCK_SM=pynvml.NVML_CLOCK_SM,
        NVML_CLOCK_MEM=pynvml.NVML_CLOCK_MEM,
        NVML_PCIE_UTIL_RX_BYTES=pynvml.NVML_PCIE_UTIL_RX_BYTES,
        NVML_PCIE_UTIL_TX_BYTES=pynvml.NVML_PCIE_UTIL_TX_BYTES,
        nvmlInit=init,
        nvmlShutdown=shutdown,
        nvmlSystemGetDriverVersion=lambda: "550.90.07",
        nvmlSystemGetCudaDriverVersion=lambda: 12040,
        nvmlDeviceGetCount=lambda: 3,
        nvmlDeviceGetHandleByIndex=handle_by_index,
        nvmlDeviceGetUUID=lambda h: uuids[h],
        nvmlDeviceGetName=lambda h: names.get(h, "NVIDIA A100-SXM4-80GB MIG 3g.40gb"),
        nvmlDeviceGetUtilizationRates=utilization,
        nvmlDeviceGetMemoryInfo=lambda h: memory[h],
        nvmlDeviceGetTemperature=lambda h, sensor: 61,
        nvmlDeviceGetPowerUsage=lambda h: 412_345,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetFanSpeed=NOT_SUPPORTED,
        nvmlDeviceGetClockInfo=lambda h, clock: 1980 if clock == pynvml.NVML_CLOCK_SM else 2619,
        nvmlDeviceGetPcieThroughput=lambda h, counter: 1234 if h == ("gpu", 0) else NOT_SUPPORTED(),
        nvmlDeviceGetMigMode=lambda h: [1, 1] if h == ("gpu", 1) else NOT_SUPPORTED(),
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 3,
        nvmlDeviceGetMigDeviceHandleByIndex=mig_handle,
        nvmlDeviceGetGpuInstanceId=lambda h: {0: 1, 2: 2}[h[2]],
        nvmlDeviceGetComputeInstanceId=lambda h: 0,
        # An older driver: no _v3 of the compute list.
        nvmlDeviceGetComputeRunningProcesses_v3=_nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND),
        nvmlDeviceGetComputeRunningProcesses_v2=compute_v2,
        nvmlDeviceGetGraphicsRunningProcesses_v3=graphics_v3,
    )
    return fake


def test_query_gpus_turns_every_device_into_a_snapshot():
    vanished = _vanished_pid()
    fake = _fake_nvml(vanished)
    session = NvmlSession(fake)
    gpus = session.query_gpus()
    again = session.query_gpus()
    session.close()
    assert fake.calls == {"init": 1, "shutdown": 1}
    assert session.driver_version == "550.90.07" and session.cuda_version == "12.4"
    assert session.notice is None
    assert [gpu.index for gpu in gpus] == [0, 1, 2]
    plain, mig, lost = gpus

    assert plain.name == "NVIDIA H100 80GB HBM3" and plain.uuid == "GPU-aaaa"
    assert (plain.utilization_gpu, plain.utilization_memory) == (87.0, 40.0)
    assert plain.memory_used == 10 * 2**30 and plain.memory_total == 80 * 2**30
    assert plain.power_draw == pytest.approx(412.345) and plain.power_limit == 700.0
    assert plain.fan is None  # not supported: None, not a crash
    assert (plain.clock_sm, plain.clock_mem, plain.pcie_rx, plain.pcie_tx) == (
        1980,
        2619,
        1234,
        1234,
    )
    assert plain.mig_mode is None and plain.mig_devices == ()
    by_pid = {process.pid: process for process in plain.processes}
    me = by_pid[os.getpid()]
    assert me.type == "compute+graphics" and me.gpu_memory == 3 * 2**30
    assert me.user == psutil.Process().username() and "python" in me.command.lower()
    gone = by_pid[vanished]
    assert (gone.user, gone.command, gone.gpu_memory, gone.type) == (None, None, 2**30, "compute")

    assert mig.mig_mode is True and mig.utilization_gpu is None and mig.pcie_rx is None
    assert [(m.index, m.uuid, m.gpu_instance_id) for m in mig.mig_devices] == [
        (0, "MIG-cccc", 1),
        (2, "MIG-dddd", 2),
    ]
    assert mig.mig_devices[0].memory_used == 15 * 2**30
    assert [(p.pid, p.mig_index, p.gpu_memory) for p in mig.processes] == [
        (os.getpid(), 0, 5 * 2**30)
    ]

    assert (
        lost.uuid is None
        and lost.name is None
        and lost.memory_used is None
        and lost.processes == ()
    )
    assert again == tuple(replace(gpu) for gpu in again)  # frozen, comparable
    with pytest.raises(AttributeError):
        plain.index = 5  # type: ignore[misc]


# --- snapshots and the recording format ---------------------------------------------------------


def test_recording_lines_round_trip_byte_for_byte(h100):
    lines = H100.read_text().splitlines()
    assert len(lines) == len(h100) == 60
    for line, snapshot in zip(lines, h100, strict=True):
        assert MonitorSnapshot.from_dict(snapshot.to_dict()) == snapshot
        assert snapshot_to_line(snapshot) == line
    keys = list(json.loads(lines[0]))
    assert keys == ["format", "time", "driver_version", "cuda_version", "notice", "host", "gpus"]


_small_int = st.none() | st.integers(min_value=0, max_value=2**60)
_number = st.none() | st.floats(allow_nan=False, allow_infinity=False, width=64)
_text = st.none() | st.text(max_size=20)

_processes = st.builds(
    GpuProcess,
    pid=st.integers(1, 2**22),
    user=_text,
    command=_text,
    gpu_memory=_small_int,
    type=st.sampled_from(["compute", "graphics", "compute+graphics"]),
    mig_index=st.none() | st.integers(0, 7),
)
_migs = st.builds(
    MigDevice,
    index=st.integers(0, 7),
    uuid=_text,
    name=_text,
    gpu_instance_id=_small_int,
    compute_instance_id=_small_int,
    memory_used=_small_int,
    memory_total=_small_int,
    utilization_gpu=_number,
    utilization_memory=_number,
)
_gpus = st.builds(
    GpuSnapshot,
    index=st.integers(0, 15),
    uuid=_text,
    name=_text,
    utilization_gpu=_number,
    utilization_memory=_number,
    memory_used=_small_int,
    memory_total=_small_int,
    temperature=_number,
    power_draw=_number,
    power_limit=_number,
    fan=_number,
    clock_sm=_small_int,
    clock_mem=_small_int,
    pcie_rx=_small_int,
    pcie_tx=_small_int,
    mig_mode=st.none() | st.booleans(),
    mig_devices=st.lists(_migs, max_size=2).map(tuple),
    processes=st.lists(_processes, max_size=3).map(tuple),
)
_hosts = st.builds(
    HostSnapshot,
    hostname=_text,
    cpu_percent=st.lists(st.floats(0, 100), max_size=8).map(tuple),
    load_average=st.none() | st.tuples(st.floats(0, 64), st.floats(0, 64), st.floats(0, 64)),
    memory_used=_small_int,
    memory_total=_small_int,
    swap_used=_small_int,
    swap_total=_small_int,
    disk_path=_text,
    disk_used=_small_int,
    disk_total=_small_int,
    uptime=_number,
)
_snapshots = st.builds(
    MonitorSnapshot,
    time=st.floats(0, 4e9),
    host=_hosts,
    gpus=st.lists(_gpus, max_size=3).map(tuple),
    driver_version=_text,
    cuda_version=_text,
    notice=_text,
)


@settings(max_examples=60, deadline=None)
@given(_snapshots)
def test_any_snapshot_round_trips_through_json(snapshot):
    line = snapshot_to_line(snapshot)
    assert "\n" not in line
    back = MonitorSnapshot.from_dict(json.loads(line))
    assert back == snapshot
    format_snapshot(back, width=100)  # and draws without failing


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("host"), "missing key 'host'"),
        (lambda d: d.update(format=2), "format 1, not 2"),
        (
            lambda d: d.update(time="now"),
            "snapshot.time: expected a finite number, got the string 'now'",
        ),
        (
            lambda d: d["gpus"][3].update(memory_used=1.5),
            "snapshot.gpus[3].memory_used: expected a 64-bit integer",
        ),
        (
            lambda d: d["gpus"][7]["mig_devices"][1].pop("uuid"),
            "snapshot.gpus[7].mig_devices[1]: missing key 'uuid'",
        ),
        (
            lambda d: d["gpus"][0]["processes"][0].update(type="cuda"),
            "processes[0].type: expected one of",
        ),
        (lambda d: d["gpus"][0].update(mig_mode="yes"), "expected true, false or null"),
        (lambda d: d["host"].update(load_average=[1, 2]), "expected 3 numbers, got 2"),
        (lambda d: d["host"].update(cpu_percent=[1, None]), "expected a list of finite numbers"),
        (lambda d: d.update(gpus={}), "snapshot.gpus: expected a list, got an object"),
        (lambda d: d["gpus"][1].update(index=True), "expected a 64-bit integer, got true"),
        (
            lambda d: d["gpus"][1].update(index=2**70),
            "expected a 64-bit integer, got the number 1180",
        ),
        (lambda d: d["gpus"][1].update(index=10**400), "got a number too large"),
    ],
)
def test_from_dict_names_what_is_wrong(h100, change, message):
    data = h100[0].to_dict()
    change(data)
    with pytest.raises(SnapshotFormatError) as error:
        MonitorSnapshot.from_dict(data)
    assert message in str(error.value)


def test_missing_values_are_none_and_derived_ones_follow(h100):
    gpu7 = h100[0].gpu(7)
    assert gpu7.utilization_gpu is None and gpu7.fan is None
    assert gpu7.memory_percent == pytest.approx(100 * gpu7.memory_used / gpu7.memory_total)
    assert h100[0].gpu(8) is None
    empty = HostSnapshot(None, (), None, None, None, None, None, None, None, None, None)
    assert empty.cpu_percent_mean is None and empty.memory_percent is None
    assert "cpu N/A of 0 cores" in format_snapshot(
        MonitorSnapshot(0.0, empty, (), None, None, None)
    )


def test_an_empty_host_and_a_failed_sample_know_nothing_but_why() -> None:
    empty = HostSnapshot.empty()
    assert empty == HostSnapshot(None, (), None, None, None, None, None, None, None, None, None)
    assert all(value in (None, []) for value in empty.to_dict().values())
    failed = MonitorSnapshot.failed("OSError: gone", now=12.5)
    assert failed == MonitorSnapshot(12.5, empty, (), None, None, "GPU sampling failed: OSError: gone")
    assert MonitorSnapshot.from_dict(failed.to_dict()) == failed  # a recording can hold it
    before = time.time()
    assert before <= MonitorSnapshot.failed("x").time <= time.time()


# --- replay -------------------------------------------------------------------------------------


def test_replay_of_the_8_gpu_recording_loops_with_live_times(h100):
    now = [5000.0]
    source = ReplaySource(H100, clock=lambda: now[0])
    assert len(source) == 60
    first = source.sample()
    assert first.time == 5000.0 and first == replace(h100[0], time=5000.0)
    assert [gpu.index for gpu in first.gpus] == list(range(8))
    assert all(gpu.name == "NVIDIA H100 80GB HBM3" for gpu in first.gpus)
    assert all(gpu.processes for gpu in first.gpus)
    training = {gpu.processes[0].pid for gpu in first.gpus[:6]}
    assert len(training) == 6
    triton = [p for gpu in first.gpus[6:] for p in gpu.processes]
    assert {p.pid for p in triton} == {52007} and all("tritonserver" in p.command for p in triton)
    gpu7 = first.gpu(7)
    assert gpu7.mig_mode is True and len(gpu7.mig_devices) == 2
    assert gpu7.processes[0].mig_index == 0
    assert all(gpu.mig_mode is False for gpu in first.gpus[:7])
    # Something changes from one snapshot to the next.
    utilizations = {source.sample().gpu(0).utilization_gpu for _ in range(20)}
    assert len(utilizations) > 5
    for _ in range(60 - 21):
        source.sample()
    assert source.position == 0
    now[0] = 6000.0
    assert source.sample() == replace(h100[0], time=6000.0)


def test_make_source_picks_replay_or_live(tmp_path):
    with make_source(NO_DRIVER_RECORDING, tmp_path) as replay:
        assert isinstance(replay, ReplaySource)
        snapshot = replay.sample()
        assert snapshot.notice == NO_DRIVER and snapshot.gpus == ()
        assert abs(snapshot.time - time.time()) < 5
    with make_source(None, tmp_path) as live:
        assert isinstance(live, Sampler) and live.workspace == tmp_path


@pytest.mark.parametrize(
    ("content", "where", "what"),
    [
        (b"", "", "holds no snapshots"),
        (b"\n\n  \n", "", "holds no snapshots"),
        (b"{not json\n", ":1", "not JSON"),
        (b"[1, 2]\n", ":1", "expected an object"),
        (b'{"format": 1}\n', ":1", "missing key"),
        (b"\xff\xfe\n", ":1", "not UTF-8"),
        (b"[" * 100_000 + b"\n", ":1", "JSON"),
    ],
)
def test_bad_recordings_are_one_line_naming_file_and_line(tmp_path, content, where, what):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        read_recording(path)
    message = str(error.value)
    assert message.startswith(f"{path}{where}:") and what in message and "\n" not in message


def test_a_bad_line_after_good_ones_is_named(tmp_path):
    good = H100.read_text().splitlines()[:3]
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(good) + "\n" + good[0][:500] + "\n")
    with pytest.raises(UserError, match=r"cut\.jsonl:4: not JSON"):
        ReplaySource(path)


def test_missing_recording_and_folder(tmp_path):
    with pytest.raises(UserError, match="no such recording"):
        read_recording(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="is a folder"):
        read_recording(tmp_path)


# --- `oatui gpus` -------------------------------------------------------------------------------


def test_gpus_table_from_the_8_gpu_recording(capsys, tmp_path):
    assert main(["gpus", "--replay", str(H100), "--workspace", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert "dgx-h100-07" in lines[0] and "driver 550.90.07" in lines[0] and "CUDA 12.4" in lines[0]
    gpu_rows = [line for line in lines if "NVIDIA H100 80GB HBM3 " in line and "MIG" not in line]
    assert [int(row.split()[0]) for row in gpu_rows] == list(range(8))
    assert "3g.40gb" in out and "tritonserver" in out and "oatui.train.ppo" in out
    assert lines[-1].startswith("HOST  dgx-h100-07  cpu ")


def test_gpus_watch_count_and_no_driver_notice_once(capsys, tmp_path):
    argv = ["gpus", "--replay", str(NO_DRIVER_RECORDING), "--count", "4", "--interval", "0.01"]
    assert main(argv + ["--workspace", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.count(NO_DRIVER) == 1 and out.count("HOST  laptop") == 4 and err == ""
    assert main(argv + ["--json", "--workspace", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert _one_line(err) == f"oatui gpus: {NO_DRIVER}"
    assert [MonitorSnapshot.from_dict(json.loads(line)).notice for line in out.splitlines()] == [
        NO_DRIVER
    ] * 4


@pytest.mark.parametrize(
    "option",
    [
        ["--interval", "0"],
        ["--interval", "-1"],
        ["--interval", "nan"],
        ["--interval", "x"],
        ["--count", "0"],
    ],
)
def test_bad_options_are_one_line_exit_2(capsys, option):
    with pytest.raises(SystemExit) as stop:
        main(["gpus", *option])
    assert stop.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert option[0] in line


def test_gpus_json_subprocess_is_a_recording_that_replays(tmp_path, capsys):
    result = subprocess.run(
        [
            str(OATUI),
            "gpus",
            "--json",
            "--count",
            "2",
            "--interval",
            "0.05",
            "--workspace",
            str(tmp_path / "ws"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    snapshots = [MonitorSnapshot.from_dict(json.loads(line)) for line in lines]
    assert snapshots[0].time < snapshots[1].time
    if snapshots[0].notice:
        assert _one_line(result.stderr) == f"oatui gpus: {snapshots[0].notice}"
    else:
        assert result.stderr == ""
    recording = tmp_path / "session.jsonl"
    recording.write_text(result.stdout)
    assert [replace(s, time=0.0) for s in read_recording(recording)] == [
        replace(s, time=0.0) for s in snapshots
    ]
    assert main(["gpus", "--replay", str(recording), "--workspace", str(tmp_path)]) == 0
    assert "HOST" in capsys.readouterr().out


def test_gpus_subprocess_bad_recording_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(H100.read_text().splitlines()[0] + "\n{oops\n")
    result = subprocess.run(
        [str(OATUI), "gpus", "--replay", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stdout == ""
    assert _one_line(result.stderr).startswith(f"oatui gpus: error: {bad}:2: not JSON")


def test_gpus_watch_stops_quietly_on_ctrl_c(tmp_path):
    process = subprocess.Popen(
        [
            str(OATUI),
            "gpus",
            "--json",
            "--watch",
            "--interval",
            "0.1",
            "--replay",
            str(NO_DRIVER_RECORDING),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_foreground_job,
    )
    try:
        assert process.stdout.readline()  # it is running
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    for line in out.splitlines():
        MonitorSnapshot.from_dict(json.loads(line))


_corpus = H100.read_text().splitlines()[:2]


def _json_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _json_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _json_paths(item, (*path, index))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)


@st.composite
def _corruptions(draw) -> bytes:
    lines = list(_corpus)
    target = draw(st.integers(0, len(lines) - 1))
    how = draw(
        st.sampled_from(["cut", "insert", "replace-value", "drop-key", "truncate-file", "blank"])
    )
    line = lines[target]
    if how == "cut":
        start = draw(st.integers(0, len(line)))
        lines[target] = line[:start] + line[start + draw(st.integers(1, 50)) :]
    elif how == "insert":
        at = draw(st.integers(0, len(line)))
        lines[target] = line[:at] + draw(st.text(min_size=1, max_size=5)) + line[at:]
    elif how in ("replace-value", "drop-key"):
        data = json.loads(line)
        paths = [p for p in _json_paths(data) if p]
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if how == "drop-key" and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_json_values)
        lines[target] = json.dumps(data)
    elif how == "truncate-file":
        text = "\n".join(lines)
        return text[: draw(st.integers(0, len(text)))].encode("utf-8", "surrogatepass")
    else:
        lines[target] = ""
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=_corruptions())
def test_any_corrupted_recording_is_exit_2_one_line_or_works(tmp_path, capsys, content):
    path = tmp_path / "corrupt.jsonl"
    path.write_bytes(content)
    code = main(["gpus", "--replay", str(path), "--workspace", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code in (0, 2)
    if code == 2:
        line = _one_line(err)
        assert line.startswith(f"oatui gpus: error: {path}")
        assert out == ""
    else:
        assert err == "" and "HOST" in out


# --- CUDA_VISIBLE_DEVICES -----------------------------------------------------------------------


def test_visible_devices_by_index_uuid_and_mig(h100):
    gpus = h100[0].gpus
    uuid5 = gpus[5].uuid
    mig1 = gpus[7].mig_devices[1]
    assert visible_physical_indices(None, gpus) == set(range(8))
    assert visible_physical_indices("", gpus) == set()
    assert visible_physical_indices("0,3", gpus) == {0, 3}
    assert visible_devices("3,0", gpus) == (VisibleDevice(3), VisibleDevice(0))
    assert visible_physical_indices(" 1 , 2 ", gpus) == {1, 2}
    assert visible_physical_indices("0,0", gpus) == {0}
    assert visible_physical_indices(uuid5, gpus) == {5}
    assert visible_physical_indices(uuid5.upper().replace("GPU-", "GPU-", 1), gpus) == {5}
    assert visible_physical_indices(uuid5[:12], gpus) == {5}  # a unique prefix is enough
    assert visible_physical_indices(f"{gpus[2].uuid},6", gpus) == {2, 6}
    assert visible_devices(mig1.uuid, gpus) == (VisibleDevice(7, 1),)
    assert visible_physical_indices(mig1.uuid, gpus) == {7}
    old_style = f"MIG-{gpus[7].uuid}/{mig1.gpu_instance_id}/{mig1.compute_instance_id}"
    assert visible_devices(old_style, gpus) == (VisibleDevice(7, 1),)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0,1,abc,2", {0, 1}),  # CUDA stops at the first entry that names no device
        ("8", set()),
        ("-1,0", set()),
        ("0,,1", {0}),
        ("GPU-", set()),  # a prefix of every GPU names none
        ("GPU-ffffffff", set()),
        ("MIG-0000", set()),
        ("MIG-GPU-nope/1/0", set()),
        ("1.5", set()),
    ],
)
def test_invalid_visible_devices(h100, value, expected):
    assert visible_physical_indices(value, h100[0].gpus) == expected


# --- which runs own which GPUs --------------------------------------------------------------------


def test_gpu_processes_belong_to_runs_by_pid_ancestry_or_run_dir_and_idle_runs_to_their_gpus(h100, tmp_path):
    runs_dir = tmp_path / "runs"
    (runs_dir / "rm-dir").mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        placed = {
            0: (GpuProcess(48211, None, "python", None),),  # a run's own stage process
            1: (GpuProcess(child.pid, None, "python", None),),  # a child of a run's supervisor (this test)
            2: (GpuProcess(4_000_001, None, f"python -m oatui.train.rm --run-dir {runs_dir / 'rm-dir'}", None),),
            3: (GpuProcess(1, None, "init", None),),  # nobody's
        }
        gpus = tuple(replace(gpu, processes=placed.get(gpu.index, ())) for gpu in h100[0].gpus)
        snapshot = replace(h100[0], gpus=gpus)
        runs = [
            ActiveRun("rl-a", 48211, None, None),
            ActiveRun("sft-b", None, os.getpid(), None),
            ActiveRun("sft-pinned", None, None, "5"),  # no process seen: its CUDA_VISIBLE_DEVICES
            ActiveRun("idle", None, None, None),  # none: every GPU, which says nothing
        ]
        finder = OwnerFinder(runs_dir)
        owners = finder.find(snapshot, runs)
        assert owners.processes == {48211: "rl-a", child.pid: "sft-b", 4_000_001: "rm-dir"}
        assert owners.gpus == {0: ("rl-a",), 1: ("sft-b",), 2: ("rm-dir",), 5: ("sft-pinned",)}
        assert finder.find(snapshot, runs) == owners  # the remembered ancestry answers the same
        assert finder.find(replace(snapshot, gpus=()), []) is EMPTY
        assert OwnerFinder(tmp_path / "elsewhere").find(snapshot, runs[2:]).processes == {}
    finally:
        child.kill()
        child.wait()


# --- history, host and process helpers ----------------------------------------------------------


def test_history_keeps_the_last_values_per_gpu_and_metric(h100):
    history = History(length=10)
    for snapshot in h100[:25]:
        history.add(snapshot)
    assert history.gpu_indices == tuple(range(8))
    series = history.gpu(0, "utilization_gpu")
    assert len(series) == 10
    assert series == tuple(s.gpu(0).utilization_gpu for s in h100[15:25])
    assert history.gpu(7, "utilization_gpu") == (None,) * 10
    assert len(history.gpu(3, "memory_percent")) == len(history.host("cpu_percent_mean")) == 10
    assert history.host("load_1m")[-1] == h100[24].host.load_average[0]
    assert history.gpu(9, "temperature") == ()
    with pytest.raises(KeyError):
        history.gpu(0, "nope")
    with pytest.raises(KeyError):
        history.host("nope")
    history.clear()
    assert history.gpu_indices == () and history.host("memory_percent") == ()


def test_cpu_percent_between_readings():
    times = namedtuple("times", "user nice system idle iowait guest guest_nice")
    before = [times(100, 0, 50, 850, 0, 0, 0), times(10, 0, 0, 90, 0, 0, 0)]
    after = [
        times(150, 0, 100, 850, 0, 0, 0),
        times(10, 0, 0, 190, 10, 0, 0),
        times(1, 0, 0, 1, 0, 0, 0),
    ]
    assert cpu_percent_between(before, after) == (100.0, 0.0, 0.0)
    assert cpu_percent_between(before, before) == (0.0, 0.0)


def test_host_sampler_measures_the_first_reading_over_a_real_span(tmp_path):
    sampler = HostSampler(tmp_path / "not" / "there")
    started = time.monotonic()
    host = sampler.sample()
    assert time.monotonic() - started >= 0.05
    assert host.disk_total and host.disk_path.endswith("there")
    started = time.monotonic()
    sampler.sample()
    assert time.monotonic() - started < 0.5


def test_process_lookup_names_live_pids_and_skips_vanished_ones():
    lookup = ProcessLookup()
    vanished = _vanished_pid()
    found = lookup.lookup([os.getpid(), vanished])
    assert set(found) == {os.getpid()}
    assert found[os.getpid()].user == psutil.Process().username()
    assert lookup.lookup([os.getpid()]) == {os.getpid(): found[os.getpid()]}


def test_process_commands_never_show_the_triton_admin_key():
    """tritonserver carries its restricted-API key on its command line; the GPU table, the app and
    recordings show the command without it."""
    key = "k3y-for-tests"
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "--admin-key", key,
            f"--grpc-restricted-protocol=model-repository,shared-memory:admin-key={key}",
            f"--http-restricted-api=model-repository:admin-key={key}", "--admin-key=" + key, "--http-port=8000"]
    child = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).cmdline() != argv and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'd: before that it shows pytest's command
        command = ProcessLookup().lookup([child.pid])[child.pid].command
    finally:
        child.kill()
        child.wait()
    assert key not in command
    assert command.endswith(
        "--admin-key *** --grpc-restricted-protocol=*** --http-restricted-api=*** --admin-key=*** --http-port=8000"
    )


def test_formatters():
    assert (
        format_bytes(None) == "N/A"
        and format_bytes(512) == "512 B"
        and format_bytes(1536) == "1.5 KiB"
    )
    assert format_bytes(3 * 2**40) == "3.0 TiB"
    assert format_rate_kb(300) == "300 KB/s" and format_rate_kb(310 * 1024) == "310 MB/s"
    assert format_rate_kb(12 * 1024 * 1024) == "12.0 GB/s"
    assert format_duration(30) == "30s" and format_duration(3 * 3600 + 720) == "3h 12m"
    assert format_duration(12 * 86400 + 3 * 3600) == "12d 3h"


def test_long_commands_are_shortened_to_the_terminal(h100):
    text = format_snapshot(h100[0], width=100)
    process_lines = [line for line in text.splitlines() if "/home/alice/oatui" in line]
    assert process_lines and all(
        len(line) <= 100 and line.endswith("...") for line in process_lines
    )


def test_control_characters_in_a_recording_are_not_printed(h100):
    odd = replace(h100[0], notice="beep\x07\x1b[2J", host=replace(h100[0].host, hostname="a\nb"))
    text = format_snapshot(odd)
    assert "\x07" not in text and "\x1b" not in text and "a?b" in text


# --- boundaries ---------------------------------------------------------------------------------


def test_monitor_imports_nothing_heavy():
    code = (
        "import sys, oatui.monitor, oatui.monitor.nvml, oatui.monitor.text, oatui.commands.gpus\n"
        "heavy = ('textual', 'torch', 'numpy', 'transformers', 'pynvml')\n"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"loaded: {result.stdout.strip()}"


def test_bench_generator_writes_the_committed_recordings(tmp_path):
    script = Path(__file__).parent.parent / "bench" / "make_recording.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "8xh100.jsonl").read_bytes() == H100.read_bytes()
    assert (tmp_path / "no-driver.jsonl").read_bytes() == NO_DRIVER_RECORDING.read_bytes()
