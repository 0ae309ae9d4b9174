"""What a server was asked for and what runs: ``ServerOptions``, and ``ServerInfo`` as recorded in
``WORKSPACE/state/server.json``.

The detached server's supervisor writes the record once the server and its models are ready and
removes it when the server has gone; everyone else finds the server through it
(:func:`oatui.serve.server.status`). Each pid in it is kept with its start time: a pid is trusted
only with it (:func:`oatui.procutil.process_alive`).
"""

from __future__ import annotations

import contextlib
import json
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from oatui.errors import UserError
from oatui.fsutil import UnreadableFile, atomic_write_json, fits_type, locked, read_json_file
from oatui.serve.ports import (
    DEFAULT_ADDRESS,
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    connect_host,
)
from oatui.serve.readiness import DEFAULT_READY_TIMEOUT
from oatui.workspace import Workspace

if typing.TYPE_CHECKING:
    from oatui.serve.repository import ExportSource

SERVER_FILE = "server.json"
#: Where the supervisor leaves the error of a server that did not start, for ``start_detached``.
ERROR_FILE = "server-error.json"


@dataclass(frozen=True)
class ServerOptions:
    """What ``oatui serve`` was asked for (the admin key itself travels only in its 0600 file)."""

    repo: str
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    address: str = DEFAULT_ADDRESS
    models: tuple[str, ...] = ()
    gpus: str | None = None
    server_bin: str | None = None
    admin_key_file: str | None = None
    ready_timeout: float = DEFAULT_READY_TIMEOUT

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "models": list(self.models)})

    @classmethod
    def from_json(cls, text: str) -> "ServerOptions":
        values = json.loads(text)
        values["models"] = tuple(values.get("models") or ())
        return cls(**values)


@dataclass(frozen=True)
class ServerInfo:
    """A running server, as recorded in ``WORKSPACE/state/server.json``."""

    pid: int
    supervisor_pid: int | None
    address: str
    http_port: int
    grpc_port: int
    metrics_port: int
    repo: str
    models: list[str]
    log: str
    started: float
    server: list[str] = field(default_factory=list)  # argv, admin key redacted
    bundled: bool = False
    admin_key_file: str | None = None
    shm: list[str] = field(default_factory=list)
    pid_started: float | None = None
    supervisor_started: float | None = None
    #: The training run behind each served model, and its step, as exported (``oatui_export.json``)
    #: when the server started: what it serves, even after a newer export replaced the folder.
    model_runs: dict[str, str] = field(default_factory=dict)
    model_steps: dict[str, int] = field(default_factory=dict)

    def model_source(self, name: str) -> "ExportSource":
        from oatui.serve.repository import ExportSource

        return ExportSource(self.model_runs.get(name), self.model_steps.get(name))

    def served_label(self, name: str) -> str:
        """``NAME``, with the run it was exported from when known: ``policy (sft-… step 40)``."""
        label = self.model_source(name).label()
        return name if label is None else f"{name} ({label})"

    @property
    def host(self) -> str:
        return connect_host(self.address)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "grpc_url": self.grpc_url, "http_url": self.http_url, "metrics_url": self.metrics_url}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ServerInfo":
        """The record read back; a missing key or a value of the wrong type is a ValueError."""
        if not isinstance(values, dict):
            raise ValueError("not an object")
        known = {name for name in cls.__dataclass_fields__}
        kept = {key: value for key, value in values.items() if key in known}
        hints = typing.get_type_hints(cls)
        for name, value in kept.items():
            if not fits_type(value, hints[name]):
                raise ValueError(f"'{name}' is {type(value).__name__}, not {hints[name]}")
        for name in ("http_port", "grpc_port", "metrics_port"):
            if name in kept and not 1 <= kept[name] <= 65535:
                raise ValueError(f"'{name}' {kept[name]} is not a port number")
        try:
            return cls(**kept)
        except TypeError as error:  # a required key is missing
            raise ValueError(str(error).split(") ", 1)[-1]) from None


def server_file(workspace: Workspace) -> Path:
    return workspace.state / SERVER_FILE


def read_server_file(workspace: Workspace) -> ServerInfo | None:
    """The record of the detached server; None when there is none. A record that is not one
    oatui wrote (not JSON, the wrong types) is a UserError naming the file."""
    path = server_file(workspace)
    if not path.exists():
        return None
    try:
        info = ServerInfo.from_dict(read_json_file(path))
    except UnreadableFile as error:
        raise UserError(f"{error}; remove it if no server runs") from None
    except (TypeError, ValueError) as error:
        raise UserError(f"{path}: not a server record ({error}); remove it if no server runs") from None
    return info


def write_server_file(workspace: Workspace, info: ServerInfo) -> None:
    with locked(server_file(workspace)):
        atomic_write_json(server_file(workspace), info.to_dict())


def remove_server_file(workspace: Workspace, info: ServerInfo) -> bool:
    """Remove the record if it is still ``info`` (not one a newer server wrote meanwhile); True then."""
    with locked(server_file(workspace)):
        if read_server_file(workspace) != info:
            return False
        with contextlib.suppress(FileNotFoundError):
            server_file(workspace).unlink()
    return True


def clear_server_file(workspace: Workspace, supervisor_pid: int) -> None:
    """Remove the record if the supervisor ``supervisor_pid`` wrote it."""
    with locked(server_file(workspace)):
        current = read_server_file(workspace)
        if current is not None and current.supervisor_pid == supervisor_pid:
            with contextlib.suppress(FileNotFoundError):
                server_file(workspace).unlink()
