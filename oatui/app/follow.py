"""Following files that grow: a run's ``stdout.log`` and ``metrics.jsonl``, read incrementally.

Each poll reads only the bytes appended since the previous one (at most ``max_read`` of them), and
hands back complete lines; a half-written last line waits for its newline. A file that shrank or
was replaced is read again from its start. The first read of a long file starts near its end.
Plain Python (no textual): the app calls it from a thread worker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from oatui.fsutil import json_objects


class FileFollower:
    """The complete lines appended to one file since the last ``read_new()``."""

    def __init__(self, path: str | os.PathLike[str], *, start_tail_bytes: int = 64 * 1024,
                 max_read: int = 1 << 20) -> None:
        self.path = Path(path)
        self.start_tail_bytes = start_tail_bytes
        self.max_read = max_read
        self.offset: int | None = None
        self._identity: tuple[int, int] | None = None
        self._partial = b""

    def read_new(self) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                identity = (stat.st_dev, stat.st_ino)
                skip_first = False
                if self.offset is None or identity != self._identity or stat.st_size < self.offset:
                    self._partial = b""
                    start = 0
                    if self.offset is None and stat.st_size > self.start_tail_bytes:
                        start = stat.st_size - self.start_tail_bytes
                        skip_first = True  # probably cut in the middle
                    self.offset = start
                    self._identity = identity
                if stat.st_size == self.offset:
                    return []
                handle.seek(self.offset)
                data = handle.read(self.max_read)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            return []
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.max_read:
            # A "line" this long is not a line; show it rather than hold it forever.
            lines.append(self._partial)
            self._partial = b""
        if skip_first and lines:
            lines = lines[1:]
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]


class MetricsFollower:
    """New records of a ``metrics.jsonl``, read from the start of the file (curves need them all)."""

    def __init__(self, path: str | os.PathLike[str], stage: str = "") -> None:
        self.stage = stage
        self._lines = FileFollower(path, start_tail_bytes=1 << 62)

    def read_new(self) -> list[dict[str, Any]]:
        return list(json_objects(self._lines.read_new()))
