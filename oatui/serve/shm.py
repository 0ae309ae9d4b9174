"""Shared memory the Python backend's stubs leave in ``/dev/shm`` when they crash or are killed.

A server's own files are found from its processes' memory maps while it runs, and removed when it
stops; nothing outside ``/dev/shm/triton_python_backend_shm*`` is ever removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from oatui.procutil import descendants

SHM_PATTERN = "/dev/shm/triton_python_backend_shm*"


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (only ``pid`` when they cannot be read)."""
    return [pid, *(child.pid for child in descendants(pid))]


def mapped_shm(pid: int) -> set[str]:
    """Python-backend shared-memory files mapped by ``pid`` or its descendants."""
    found: set[str] = set()
    for member in _process_tree(pid):
        try:
            with open(f"/proc/{member}/maps") as maps:
                for line in maps:
                    if "/dev/shm/triton_python_backend_shm" in line:
                        found.add(line.split(None, 5)[-1].strip().removesuffix(" (deleted)"))
        except OSError:
            continue
    return found


def remove_shm(paths: Sequence[str]) -> list[str]:
    removed = []
    for path in paths:
        if not isinstance(path, str) or os.path.dirname(path) != "/dev/shm" or \
                not os.path.basename(path).startswith("triton_python_backend_shm"):
            continue  # only ever the Python backend's own files (never '/dev/shm/x/../..')
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(path)
            removed.append(path)
    return removed
