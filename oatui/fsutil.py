"""Atomic writes, locked appends and private permissions for everything under the workspace."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

DIR_MODE = 0o700
FILE_MODE = 0o600


def json_objects(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects among ``lines`` (JSON Lines); a torn or foreign line is skipped."""
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) with mode 0700 for the folders this call creates."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass
        else:
            os.chmod(folder, DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A reader sees either the old content or the new one, never a half-written file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def lock_for(path: str | os.PathLike[str]) -> FileLock:
    """The inter-process lock that guards ``path`` (a ``.lock`` file beside it)."""
    path = Path(path)
    return FileLock(str(path.with_name(f".{path.name}.lock")), mode=FILE_MODE)


@contextlib.contextmanager
def locked(path: str | os.PathLike[str], timeout: float = 30.0) -> Iterator[None]:
    with lock_for(path).acquire(timeout=timeout):
        yield


def append_line_locked(path: str | os.PathLike[str], line: str) -> None:
    """Append one line under the file's lock, in a single write, fsynced.

    Used for files that several processes append to (feedback trees, the run index).
    """
    path = Path(path)
    if "\n" in line:
        raise ValueError("a record must be a single line")
    data = (line + "\n").encode("utf-8")
    with locked(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            # A previous writer killed mid-line leaves a partial last line; start ours on a fresh one.
            size = os.fstat(fd).st_size
            if size:
                with open(path, "rb") as reader:
                    reader.seek(size - 1)
                    if reader.read(1) != b"\n":
                        data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def append_jsonl_locked(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    append_line_locked(path, json.dumps(record, ensure_ascii=False, default=str))


def read_last_line(path: str | os.PathLike[str], max_bytes: int = 65536) -> str | None:
    """The last complete line of a text file without reading the whole file."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            start = max(0, size - max_bytes)
            handle.seek(start)
            tail = handle.read()
    except FileNotFoundError:
        return None
    lines = [ln for ln in tail.split(b"\n") if ln.strip()]
    if not lines:
        return None
    if not tail.endswith(b"\n") and len(lines) > 1:
        # The writer is in the middle of the last line: use the one before.
        return lines[-2].decode("utf-8", "replace")
    return lines[-1].decode("utf-8", "replace")


def tail_lines(path: str | os.PathLike[str], count: int, max_bytes: int = 1 << 20) -> list[str]:
    """The last ``count`` lines of a text file (bounded read from the end)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", "replace")
    lines = text.splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first one is probably cut
    return lines[-count:] if count else []
