"""The real `oatui` app in a pseudo-terminal, as over SSH: its keys start tritonserver (s) and a tiny
SFT run (1, the form submitted with --set max_steps large), then the app gets SIGHUP (the SSH session
dropped). The run and the server keep running, every state file parses, and a second app in a
pty stops and restarts the server (s, s) before it is killed with SIGKILL: the same holds. An app
opened afterwards shows the run live and the server running. Both are stopped at the end."""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fcntl
import psutil
import pytest
import termios

from helpers import OATUI, run_oatui
from oatui.app.app import make_app
from oatui.serve import server
from oatui.serve.repository import export_model
from oatui.stages.rundir import RunDir
from oatui.stages.runs import wait_for_end
from oatui.workspace import Workspace

from test_app import RECORDING, run, until

# The first test to need `trained` also builds it (a minute on an idle machine, more on a busy one).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

OVERRIDES = "max_steps=100000 logging_steps=1 save_steps=100000 eval_steps=100000 val_fraction=0"


def _as_from_a_terminal() -> None:
    """The app starts as a login shell would start it: SIGHUP at its default and not blocked, whatever
    the test process (which ran other tests first) inherited or set."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class PtyApp:
    """`oatui` in a pseudo-terminal of its own session; what it writes is kept, keys are bytes."""

    def __init__(self, workspace: Path, size: tuple[int, int] = (120, 40)) -> None:
        master, slave = pty.openpty()
        columns, rows = size
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(rows)}
        self.process = subprocess.Popen([OATUI, "--workspace", str(workspace), "--replay", str(RECORDING)],
                                        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                                        close_fds=True, preexec_fn=_as_from_a_terminal)
        os.close(slave)
        self.master: int | None = master
        self.output = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)  # type: ignore[arg-type]
            except (OSError, TypeError):
                return
            if not data:
                return
            with self._lock:
                self.output += data

    def wrote(self, marker: bytes) -> bool:
        with self._lock:
            return marker in self.output

    def press(self, keys: bytes) -> None:
        assert self.master is not None
        for key in [keys[i:i + 1] for i in range(len(keys))]:
            os.write(self.master, key)
            time.sleep(0.02)

    def hang_up(self, sig: int) -> int:
        """``sig`` to the app, then its terminal goes away; returns how it ended."""
        os.kill(self.process.pid, sig)
        code = self.process.wait(timeout=20)
        self.close()
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.master is not None:
            os.close(self.master)
            self.master = None


def wait_for(condition: Callable[[], Any], timeout: float, what: str, app: PtyApp | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if app is not None and app.process.poll() is not None:
            raise AssertionError(f"the app exited ({app.process.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def runs_json(workspace: Path) -> list[dict[str, Any]]:
    return json.loads(run_oatui("runs", "--json", workspace=workspace, check=True).stdout)


def served_json(workspace: Path) -> dict[str, Any] | None:
    return json.loads(run_oatui("serve", "--status", "--json", workspace=workspace, check=True).stdout)


def assert_all_live_and_whole(workspace: Path, run_id: str, server_pid: int) -> None:
    """The run and the server kept going; no state file is torn."""
    [listed] = [entry for entry in runs_json(workspace) if entry["id"] == run_id]
    assert listed["state"] == "running" and psutil.pid_exists(listed["pid"])
    record = served_json(workspace)
    assert record is not None and record["pid"] == server_pid and psutil.pid_exists(server_pid)
    for path in (workspace / "runs").glob("*/run.json"):
        json.loads(path.read_text())
    json.loads((workspace / "state" / "server.json").read_text())
    for path in (workspace / "state").glob("*.json"):
        json.loads(path.read_text())


def test_sighup_or_kill_leaves_the_run_and_the_server_running_and_a_new_app_shows_them(trained,  # noqa: ANN001
                                                                                        workspace: Path) -> None:
    shutil.copytree(trained.tiny_base, workspace / "models" / "tiny-pythia")
    ws = Workspace.open(workspace)
    export_model("policy", trained.sft_model, ws.triton_repo)
    run_id = None
    apps: list[PtyApp] = []
    try:
        # SSH drops: SIGHUP, then the terminal is gone.
        first = PtyApp(workspace)
        apps.append(first)
        wait_for(lambda: first.wrote(b"Runs"), 30, "the first frame", first)
        first.press(b"s")
        info = wait_for(lambda: server.status(ws), 120, "the server the s key starts", first)
        first.press(b"1")
        wait_for(lambda: first.wrote(b"Launch an SFT run"), 30, "the launch form", first)
        first.press(b"\t" + OVERRIDES.encode() + b"\r")
        run_id = wait_for(lambda: next((entry["id"] for entry in runs_json(workspace)
                                        if entry["state"] == "running" and entry["step"]), None),
                          240, "the SFT run to train", first)
        [entry] = runs_json(workspace)
        assert entry["total_steps"] == 100000
        assert first.hang_up(signal.SIGHUP) == -signal.SIGHUP
        assert_all_live_and_whole(workspace, run_id, info.pid)

        # A second app restarts the server with s (asks: y), s and is killed.
        second = PtyApp(workspace, size=(80, 24))
        apps.append(second)
        wait_for(lambda: second.wrote(run_id.encode()), 30, "the run in the second app", second)
        time.sleep(1.0)  # the app has read the server record
        second.press(b"s")
        wait_for(lambda: second.wrote(b"Stop tritonserver"), 30, "the question before stopping", second)
        second.press(b"y")
        wait_for(lambda: server.status(ws) is None and second.wrote(b"tritonserver stopped"), 60,
                 "the server to stop", second)
        second.press(b"s")
        info = wait_for(lambda: server.status(ws), 120, "the server to start again", second)
        assert second.hang_up(signal.SIGKILL) == -signal.SIGKILL
        assert_all_live_and_whole(workspace, run_id, info.pid)

        app = make_app(workspace, replay=RECORDING, refresh=0.5)

        async def reopen() -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                await until(lambda: run_id in app.run_list.runs and app.chat_pane.server is not None, pilot,
                            timeout=30, what="the run and the server in a new app")
                row = [str(cell) for cell in app.run_list.get_row(run_id)]
                assert row[1] == "running" and row[3].endswith("/100000")
                assert app.chat_pane.server.pid == info.pid  # type: ignore[union-attr]

        run(reopen())
    finally:
        for app_in_pty in apps:
            app_in_pty.close()
        if run_id is not None:
            run_oatui("runs", "stop", run_id, workspace=workspace)
            assert wait_for_end(RunDir(workspace / "runs" / run_id), timeout=120).state == "stopped"
        server.stop(ws)
    assert server.status(ws) is None
