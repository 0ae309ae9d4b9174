"""Process identity and signals (runs and the server share them), and free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from oatui.netutil import free_ports
from oatui.procutil import create_time, process_alive, signal_group, signal_process


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)


def test_a_pid_is_ours_only_with_its_start_time_and_only_then_signalled() -> None:
    child = _sleeper()
    try:
        started = create_time(child.pid)
        assert started is not None and process_alive(child.pid, started)
        me = os.getpid()
        for pid, when in [(child.pid, None), (child.pid, started + 5), (1, create_time(1)), (me, create_time(me)),
                          (None, started), (0, started)]:
            assert not process_alive(pid, when), (pid, when)
        assert not signal_process(child.pid, None, signal.SIGKILL)
        assert not signal_group(child.pid, started + 5, signal.SIGKILL)
        assert child.poll() is None
        assert signal_group(child.pid, started, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
        assert not process_alive(child.pid, started) and not signal_process(child.pid, started, signal.SIGTERM)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_free_ports_are_distinct() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(1024 <= port <= 65535 for port in ports)
