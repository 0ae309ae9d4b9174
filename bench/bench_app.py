"""The app's cold start to first paint, and its CPU use while idle.

Runs the real ``oatui`` command in a pseudo-terminal (as a user's terminal or tmux would):

- first paint: from starting the process to the first frame on the terminal (the panel titles
  written), and to the first GPU sample drawn (the recorded host name written); median of N starts;
- idle CPU: the process's user+system CPU time over ``--duration`` seconds with nobody typing,
  on the replayed 8-GPU recording at a 1 s refresh (and on this machine's live sampler), as a
  percentage of one core.

    .venv/bin/python bench/bench_app.py [--repeats 5] [--duration 30] [--size 120x40]

Goals: first paint under 1.5 s, idle CPU under 3% of one core.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import pty
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
RECORDING = REPO / "tests" / "data" / "recordings" / "8xh100.jsonl"
OATUI = str(Path(sys.executable).parent / "oatui")
FIRST_FRAME = b"Runs"
FIRST_SAMPLE = b"dgx-h100-07"


class Terminal:
    """``oatui`` running in a pseudo-terminal of a given size; everything it writes is kept."""

    def __init__(self, argv: list[str], size: tuple[int, int]) -> None:
        master, slave = pty.openpty()
        columns, rows = size
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLORTERM": "truecolor", "COLUMNS": str(columns),
               "LINES": str(rows)}
        self.started = time.perf_counter()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                        start_new_session=True, close_fds=True)
        os.close(slave)
        self.master = master
        self.output = bytearray()
        self.seen: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            now = time.perf_counter()
            with self._lock:
                self.output += data
                for marker in (FIRST_FRAME, FIRST_SAMPLE):
                    if marker not in self.seen and marker in self.output:
                        self.seen[marker] = now - self.started

    def wait_for(self, marker: bytes, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if marker in self.seen:
                    return self.seen[marker]
            if self.process.poll() is not None:
                raise RuntimeError(f"oatui exited with {self.process.returncode}: {bytes(self.output[-2000:])!r}")
            time.sleep(0.005)
        raise TimeoutError(f"{marker!r} not written within {timeout} s")

    def quit(self) -> None:
        try:
            os.write(self.master, b"q")
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self.master)


def first_paint(workspace: Path, size: tuple[int, int], repeats: int) -> tuple[list[float], list[float]]:
    frames, samples = [], []
    for _ in range(repeats):
        terminal = Terminal([OATUI, "--workspace", str(workspace), "--replay", str(RECORDING)], size)
        try:
            frames.append(terminal.wait_for(FIRST_FRAME))
            samples.append(terminal.wait_for(FIRST_SAMPLE))
        finally:
            terminal.quit()
    return frames, samples


def idle_cpu(argv: list[str], size: tuple[int, int], duration: float, warmup: float = 5.0) -> float:
    terminal = Terminal(argv, size)
    try:
        terminal.wait_for(FIRST_FRAME)
        time.sleep(warmup)
        process = psutil.Process(terminal.process.pid)
        before, start = process.cpu_times(), time.perf_counter()
        time.sleep(duration)
        after, end = process.cpu_times(), time.perf_counter()
    finally:
        terminal.quit()
    used = (after.user - before.user) + (after.system - before.system)
    return 100.0 * used / (end - start)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="cold starts for the first-paint median (default 5)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of idle CPU measurement (default 30)")
    parser.add_argument("--size", default="120x40", help="terminal COLUMNSxROWS (default 120x40)")
    parser.add_argument("--skip-live", action="store_true", help="only the replayed recording for idle CPU")
    args = parser.parse_args()
    columns, rows = (int(part) for part in args.size.lower().split("x"))
    size = (columns, rows)
    workspace = Path(tempfile.mkdtemp(prefix="oatui-bench-app-")) / "workspace"
    try:
        frames, samples = first_paint(workspace, size, args.repeats)
        replay_cpu = idle_cpu([OATUI, "--workspace", str(workspace), "--replay", str(RECORDING)], size,
                              args.duration)
        live_cpu = None
        if not args.skip_live:
            live_cpu = idle_cpu([OATUI, "--workspace", str(workspace)], size, args.duration)
    finally:
        shutil.rmtree(workspace.parent, ignore_errors=True)

    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}")
    print(f"terminal {columns}x{rows}; first paint: {args.repeats} cold starts; idle: {args.duration:g} s, refresh 1 s")
    print()
    print("| measure | result | goal |")
    print("|---|---|---|")
    print(f"| cold start to first frame (median of {len(frames)}; min-max) | {statistics.median(frames):.2f} s "
          f"({min(frames):.2f}-{max(frames):.2f}) | < 1.5 s |")
    print(f"| cold start to first GPU sample drawn (median) | {statistics.median(samples):.2f} s | - |")
    print(f"| idle CPU, replayed 8xH100 recording | {replay_cpu:.1f}% of one core | < 3% |")
    if live_cpu is not None:
        print(f"| idle CPU, live sampler (this machine: no NVIDIA driver) | {live_cpu:.1f}% of one core | < 3% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
