"""Atomic writes, locked appends and private permissions for everything under the workspace."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import stat
import tempfile
import types
import typing
import zlib
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


def expand_user(path: str | os.PathLike[str]) -> Path:
    """``Path(path).expanduser()``, or the path as written when ``~name`` names no user (pathlib
    raises RuntimeError then): the caller's own check says what is wrong with it, in one line."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


# ---------------------------------------------------------------------------------------------
# Reading back: every file the product reads is bounded, decoded strictly and type-checked here.

MAX_LINE_BYTES = 64 << 20
"""Longest line of a text or JSON Lines file (one export tree is rarely above a megabyte)."""
MAX_STATE_BYTES = 16 << 20
"""Largest small state file (``run.json``, ``server.json``, a checkpoint's ``config.json``...)."""
MAX_JSON_DEPTH = 100
"""Deepest nesting of a JSON value read back (Python's parser recurses once per level)."""


class UnreadableFile(ValueError):
    """A file that is missing, not a regular file, too large, corrupted, not UTF-8 or not the JSON
    expected. ``str(error)`` is one line that starts with the file's path (and line, where known)."""


def _is_device(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)


def open_binary(path: str | os.PathLike[str]) -> io.BufferedIOBase:
    """``path`` opened for reading bytes, gunzipped on the fly when it starts with gzip's magic.

    Missing files, folders, devices and unreadable files raise :class:`UnreadableFile`.
    """
    path = Path(path)
    if path.is_dir():
        raise UnreadableFile(f"{path}: is a folder, expected a file")
    if _is_device(path):
        raise UnreadableFile(f"{path}: not a regular file")
    try:
        handle = open(path, "rb")  # noqa: SIM115 - handed to the caller
    except FileNotFoundError:
        raise UnreadableFile(f"{path}: no such file") from None
    except OSError as error:
        raise UnreadableFile(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        magic = handle.peek(2)[:2] if hasattr(handle, "peek") else b""
    except OSError as error:
        handle.close()
        raise UnreadableFile(f"{path}: cannot read: {error.strerror or error}") from None
    if magic == b"\x1f\x8b":
        handle.close()
        try:
            return gzip.open(path, "rb")  # type: ignore[return-value]  # closing it closes the file
        except OSError as error:
            raise UnreadableFile(f"{path}: cannot read: {error.strerror or error}") from None
    return handle


_READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile)


def iter_text_lines(path: str | os.PathLike[str], max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of a text file, gzipped or not, without its newline.

    Each line is read on its own (at most ``max_line_bytes``) and decoded as strict UTF-8, so an
    error names the line it is on: corrupted gzip data, a line too long, bytes that are not UTF-8
    are each an :class:`UnreadableFile` naming ``path:line``.
    """
    path = Path(path)
    handle = open_binary(path)
    with handle:
        number = 0
        while True:
            try:
                raw = handle.readline(max_line_bytes + 1)
            except _READ_ERRORS as error:
                raise UnreadableFile(f"{path}:{number + 1}: corrupted or unreadable ({_reason(error)})") from None
            if not raw:
                return
            number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise UnreadableFile(f"{path}:{number}: line longer than {max_line_bytes >> 20} MiB")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UnreadableFile(f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start})") from None
            yield number, text.rstrip("\r\n")


def _reason(error: BaseException) -> str:
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return " ".join(str(text).split())[:200]


def _json_depth_ok(text: str, limit: int) -> bool:
    """Whether no JSON array/object in ``text`` nests deeper than ``limit`` (brackets inside strings
    do not count)."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return False
        elif char in "]}":
            depth -= 1
    return True


def parse_json(text: str, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that fails with one line naming ``where`` (also for a value nested too deep)."""
    if not _json_depth_ok(text, max_depth):
        raise UnreadableFile(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UnreadableFile(f"{where}:{error.lineno}: not valid JSON ({error.msg})") from None
    except (RecursionError, ValueError) as error:
        raise UnreadableFile(f"{where}: not valid JSON ({_reason(error)})") from None


def read_text_file(path: str | os.PathLike[str], max_bytes: int = MAX_STATE_BYTES) -> str:
    """A whole small text file, strict UTF-8, at most ``max_bytes``; else :class:`UnreadableFile`."""
    path = Path(path)
    handle = open_binary(path)
    try:
        with handle:
            data = handle.read(max_bytes + 1)
    except _READ_ERRORS as error:
        raise UnreadableFile(f"{path}: corrupted or unreadable ({_reason(error)})") from None
    if len(data) > max_bytes:
        raise UnreadableFile(f"{path}: larger than {max_bytes >> 20} MiB, not a file oatui wrote")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UnreadableFile(f"{path}:{line}: not UTF-8 text ({error.reason})") from None


def read_json_file(path: str | os.PathLike[str], expect: type | tuple[type, ...] = dict,
                   max_bytes: int = MAX_STATE_BYTES) -> Any:
    """A small JSON file read back (a state file, a checkpoint's ``config.json``), of type ``expect``.

    Anything else (missing, too large, not UTF-8, not JSON, too deep, the wrong type) is one
    :class:`UnreadableFile` line naming the file.
    """
    value = parse_json(read_text_file(path, max_bytes), str(path))
    if not isinstance(value, expect):
        kinds = expect if isinstance(expect, tuple) else (expect,)
        names = " or ".join({dict: "an object", list: "a list", str: "a string"}.get(k, k.__name__) for k in kinds)
        raise UnreadableFile(f"{path}: expected {names}, found {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def fits_type(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON fits a dataclass field's type (bool is not an int here)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(fits_type(v, item) for v in value)
    if origin is dict:
        key_hint, item = typing.get_args(hint)
        return isinstance(value, dict) and all(fits_type(k, key_hint) and fits_type(v, item) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


# ---------------------------------------------------------------------------------------------
# Trust: a folder whose files can run code (configs, checkpoints) must be this user's alone.


def untrusted_reason(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be trusted (owned by another user, or writable by group or others,
    as OpenSSH judges a key file), or None. A missing path is trusted (it will be created)."""
    try:
        info = os.stat(path)
    except OSError:
        return None  # missing (or under a file): whoever creates it says what is wrong
    uid = os.geteuid()
    if info.st_uid != uid:
        try:
            import pwd

            owner = pwd.getpwuid(info.st_uid).pw_name
        except (KeyError, ImportError):
            owner = f"uid {info.st_uid}"
        return f"owned by {owner}, not by you (uid {uid})"
    loose = stat.S_IMODE(info.st_mode) & 0o022
    # A sticky folder writable by all (/tmp) still lets others create names in it: refuse it too.
    if loose:
        who = {0o020: "its group", 0o002: "others", 0o022: "its group and others"}[loose]
        return f"writable by {who} (mode {stat.S_IMODE(info.st_mode):04o}); run 'chmod go-w {path}'"
    return None
