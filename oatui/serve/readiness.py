"""Whether a started tritonserver is ready, and what its log says when it is not.

A missing shared library makes tritonserver hang silently, so readiness has a timeout; a server
that fails is reported with the telling lines of its log (model load failures, errors, the last line).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from oatui.errors import UserError
from oatui.fsutil import FILE_MODE, tail_lines
from oatui.workspace import Workspace

DEFAULT_READY_TIMEOUT = 60.0


_LOG_NOISE = ("CudaDriverHelper", "NVML", "DCGM", "[oatui]")


def _log_message(line: str) -> str:
    """The message of a Triton log line, without its prefix and its Python traceback."""
    if '] "' in line:
        line = line.split('] "', 1)[1].rstrip('"')
    return line.split("\\n")[0].strip()[:300]


def log_excerpt(log_path: Path, count: int = 3) -> str:
    """The server log's telling lines on one line: model load failures, errors, then the last line."""
    lines = [line.strip() for line in tail_lines(log_path, 300) if line.strip()]
    quiet = [line for line in lines if not any(noise in line for noise in _LOG_NOISE)]
    telling = [line for line in quiet if "failed to load '" in line]
    if not telling:
        telling = [line for line in quiet if line[:1] == "E" and line[1:5].isdigit()]
    last = [line for line in quiet if not line.startswith(("+", "|"))][-1:]
    chosen: list[str] = []
    for line in telling[-count:] + last:
        message = _log_message(line)
        if message and not any(message in earlier for earlier in chosen):
            chosen.append(message)
    return " | ".join(chosen) or "(nothing in the log)"


#: Readiness polls go straight to the server, which runs on this machine: urllib would send even
#: 127.0.0.1 through http_proxy (only no_proxy exempts a host), and no proxy reaches our loopback.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with _DIRECT.open(url, timeout=timeout) as response:  # noqa: S310 - our own server URL
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_ready(
    http_url: str,
    models: Sequence[str] = (),
    timeout: float = DEFAULT_READY_TIMEOUT,
    alive: Callable[[], bool] | None = None,
) -> bool:
    """Poll ``/v2/health/ready`` and each model's ``/ready`` until all answer 200.

    Returns False on timeout or when ``alive()`` says the server has gone; True when ready.
    """
    deadline = time.monotonic() + timeout
    pending = ["/v2/health/ready", *(f"/v2/models/{name}/ready" for name in models)]
    while True:
        pending = [path for path in pending if not _http_ok(http_url.rstrip("/") + path)]
        if not pending:
            return True
        if alive is not None and not alive():
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def new_log_path(workspace: Workspace) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = workspace.logs / (f"tritonserver-{stamp}.log" if attempt == 0 else f"tritonserver-{stamp}-{attempt}.log")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise UserError(f"cannot create a log file in {workspace.logs}")
