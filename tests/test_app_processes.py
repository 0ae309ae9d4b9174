"""The GPU process table as nvitop's: o cycles the sort (GPU, GPU memory, GPU utilization, pid, run),
and x stops the run a highlighted process belongs to, after a y/n confirmation, the way the runs
list's x does; a process of no run here is never signalled. GPUs come from a recording (--replay):
the stop test's recording names the pid of a real run (the real supervisor, a stand-in stage)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from oatui.app.app import make_app
from oatui.app.widgets.dialogs import ConfirmDialog
from oatui.app.widgets.gpu_panel import ProcessTable
from oatui.stages.launcher import spawn_supervisor
from oatui.stages.rundir import RunDir, RunInfo, new_run_id
from oatui.stages.runs import stop_run, wait_for_end

from test_app import RECORDING, SIZE, Recorder, run, screen_text, until

GIB = 1 << 30


def _pids(table: ProcessTable) -> list[int]:
    return [int(str(table.get_row_at(i)[1])) for i in range(table.row_count)]


def _recording(path: Path, processes: list[tuple[int, int, float, str]]) -> Path:
    """The first snapshot of the 8xh100 recording with the processes replaced: (pid, GiB, GPU util,
    command), one per GPU 0, 1, 2, …"""
    snapshot = json.loads(RECORDING.read_text().splitlines()[0])
    for index, gpu in enumerate(snapshot["gpus"]):
        gpu["processes"] = []
        gpu["mig_mode"], gpu["mig_devices"] = False, []
        if index < len(processes):
            pid, memory, util, command = processes[index]
            gpu["utilization_gpu"] = util
            gpu["processes"] = [{"pid": pid, "user": "alice", "command": command, "gpu_memory": memory * GIB,
                                 "type": "compute", "mig_index": None}]
    path.write_text(json.dumps(snapshot) + "\n")
    return path


def test_o_cycles_the_sort_of_the_process_table(workspace: Path, tmp_path: Path) -> None:
    recording = _recording(tmp_path / "three.jsonl", [(300, 10, 20.0, "python a.py"), (100, 30, 90.0, "python b.py"),
                                                      (200, 20, 50.0, "python c.py")])
    app = make_app(workspace, replay=recording, refresh=0.3)
    recorder = Recorder(app)

    async def drive() -> None:
        async with app.run_test(size=SIZE) as pilot:
            table = app.query_one(ProcessTable)
            await until(lambda: table.row_count == 3, pilot, what="three processes")
            assert _pids(table) == [300, 100, 200]  # by GPU
            await pilot.press("g")
            assert app.focused is table
            await pilot.press("o")
            assert _pids(table) == [100, 200, 300]  # GPU memory, most first
            assert "Processes · by GPU memory, most first" in screen_text(app)
            assert "GPU MEM ▼" in screen_text(app)
            await pilot.press("o")
            assert _pids(table) == [100, 200, 300]  # GPU utilization, busiest first
            assert "by GPU utilization" in screen_text(app)
            await pilot.press("o")
            assert _pids(table) == [100, 200, 300] and "by pid" in screen_text(app)
            await pilot.pause(0.5)  # the next samples keep the order
            assert _pids(table) == [100, 200, 300]
            await pilot.press("o", "o")
            assert _pids(table) == [300, 100, 200]  # back to by GPU
            # None of them is a run of this workspace: x says so, and signals nothing.
            await pilot.press("x")
            assert not isinstance(app.screen, ConfirmDialog)
            await until(lambda: recorder.notes, pilot, what="the notice")
            assert recorder.notes == [("Process 300 is not one of this workspace's runs: oatui stops only its own.",
                                       "warning")]

    run(drive())


def test_x_in_the_process_table_stops_the_run_it_belongs_to_after_asking(workspace: Path, tmp_path: Path) -> None:
    # A real run: the real supervisor, with a stand-in stage that trains forever (no model needed).
    info = RunInfo(id=new_run_id("sft"), stage="sft",
                   argv=[sys.executable, "-c", "import time\nprint('training', flush=True)\ntime.sleep(120)\n"])
    run_dir = RunDir.create(workspace / "runs", info, "{}\n")
    spawn_supervisor(run_dir)
    try:
        deadline = time.time() + 60
        while not (run_dir.read_info().pid and run_dir.read_info().state == "running"):
            assert time.time() < deadline, "the run never started"
            time.sleep(0.1)
        stage_pid = run_dir.read_info().pid
        assert stage_pid is not None
        recording = _recording(tmp_path / "ours.jsonl", [
            (4242, 50, 99.0, "python someone-elses.py"),
            (stage_pid, 10, 40.0, f"{sys.executable} -m oatui.train.sft --run-dir {run_dir.path}"),
        ])
        app = make_app(workspace, replay=recording, refresh=0.3)
        recorder = Recorder(app)

        async def drive() -> None:
            async with app.run_test(size=SIZE) as pilot:
                table = app.query_one(ProcessTable)
                await until(lambda: table.row_count == 2 and app.owners.processes, pilot, what="the processes")
                await pilot.press("g")
                await pilot.press("o", "o", "o", "o")  # by run: this workspace's first
                await pilot.pause(0.1)
                assert _pids(table) == [stage_pid, 4242]
                assert f"◆ {run_dir.id}" in str(table.get_row_at(0)[5])
                # The cursor stayed on the process it was on (the first by GPU, 4242): up to the run's.
                assert table.highlighted_row is not None and table.highlighted_row.pid == 4242
                await pilot.press("up")
                await pilot.press("x")
                await until(lambda: isinstance(app.screen, ConfirmDialog), pilot, what="the confirmation")
                assert f"Stop run {run_dir.id}?" in screen_text(app)
                await pilot.press("n")
                assert not isinstance(app.screen, ConfirmDialog)
                await pilot.pause(0.3)
                assert run_dir.read_info().state == "running"
                await pilot.press("x")
                await until(lambda: isinstance(app.screen, ConfirmDialog), pilot, what="the confirmation")
                await pilot.press("y")
                await until(lambda: run_dir.read_info().state == "stopped", pilot, timeout=60,
                            what="the run to end stopped")
                await until(lambda: app.run_list.runs[run_dir.id].state == "stopped", pilot, what="the runs list")
                # The other process is no run of ours: x says so in one line and asks nothing.
                await pilot.press("down", "x")
                assert not isinstance(app.screen, ConfirmDialog)
                await until(lambda: any("Process 4242 is not" in note for note, _ in recorder.notes), pilot,
                            what="the notice")

        run(drive())
        assert wait_for_end(run_dir, timeout=10).state == "stopped"
    finally:
        if run_dir.read_info().state in ("queued", "running"):
            stop_run(run_dir, force=True)
