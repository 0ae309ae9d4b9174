"""The tritonserver process and the API that starts, finds and stops it.

``oatui serve`` runs one server in the foreground (:func:`serve_foreground`); :func:`start_detached`
runs it under a small supervisor process (:mod:`oatui.serve.supervisor`) in its own session, which
records it in ``WORKSPACE/state/server.json`` (:mod:`oatui.serve.record`) for :func:`status` and
:func:`stop`. The app calls these functions directly, so this module imports neither torch nor
transformers (nor tritonclient).

The pieces: which binary and how it is set up (:mod:`oatui.serve.binary`), addresses, ports and
the admin key (:mod:`oatui.serve.ports`), readiness and log excerpts (:mod:`oatui.serve.readiness`),
the stubs' shared memory (:mod:`oatui.serve.shm`); process identity and signals are
:mod:`oatui.procutil`'s, as for runs.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from oatui.errors import UserError
from oatui.fsutil import expand_user
from oatui.procutil import (
    create_time,
    descendants,
    kill_processes,
    process_alive,
    signal_child_group,
    signal_group,
    signal_process,
)
from oatui.serve.binary import (
    find_server,
    prepare_bundled_backends,
    redact,
    repository_view,
    server_argv,
    server_environment,
)
from oatui.serve.ports import (
    PORT_FIELDS,
    check_ports,
    connect_host,
    free_ports_if_taken,
    read_admin_key,
    resolve_admin_key,
)
from oatui.serve.readiness import log_excerpt, new_log_path, wait_ready
from oatui.serve.record import (
    ERROR_FILE,
    ServerInfo,
    ServerOptions,
    read_server_file,
    remove_server_file,
)
from oatui.serve.shm import SHM_PATTERN, mapped_shm, remove_shm
from oatui.workspace import Workspace

STOP_GRACE = 15.0


class ServerStartError(UserError):
    """tritonserver did not start or did not become ready; the message ends with its log's last lines."""


class StartCancelled(Exception):
    """A stop was asked for while the server was starting (it has been stopped)."""


# ---------------------------------------------------------------------------------------------
# One server process


def check_repository(repo: Path, models: Sequence[str]) -> list[str]:
    """The models that will be loaded; bad input is an exit-2 error."""
    from oatui.serve.repository import list_models

    if not repo.is_dir():
        raise UserError(f"--repo {repo}: no such folder (write one with 'oatui export')")
    available = list_models(repo)
    if not available:
        raise UserError(f"--repo {repo}: no models in it (write one with 'oatui export')")
    for name in models:
        if name not in available:
            raise UserError(f"--models {name}: no model {name!r} in {repo} (it has {', '.join(available)})")
    return list(models) or available


class NothingToServe(UserError):
    """A model repository that holds no model."""

    def __init__(self, repo: Path) -> None:
        super().__init__(f"no models in {repo}")
        self.repo = repo


def repository_options(repo: Path, fields: Mapping[str, Any]) -> ServerOptions:
    """Options to serve every model of ``repo``, with ``fields`` (other ``ServerOptions`` fields) as
    given. Without a port among ``fields``: the default ports, or free loopback ports when one of
    those is taken. A repository without models is :class:`NothingToServe`."""
    from oatui.serve.repository import list_models

    if not list_models(repo):
        raise NothingToServe(repo)
    options = ServerOptions(repo=str(repo), **fields)
    if not any(name in fields for name in PORT_FIELDS):
        options = free_ports_if_taken(options)
    return options


def check_gpus(gpus: str | None) -> None:
    """``--gpus``: indices such as ``7`` or ``0,1`` that this machine has."""
    if gpus is not None:
        from oatui.stages.launcher import parse_gpus

        parse_gpus(gpus)


class TritonServer:
    """One tritonserver child process: started in its own session, stopped with its stubs."""

    def __init__(self, workspace: Workspace, options: ServerOptions) -> None:
        self.workspace = workspace
        self.options = options
        self.models = check_repository(Path(options.repo), options.models)
        check_gpus(options.gpus)
        self.command = find_server(options.server_bin)
        self.admin_key = read_admin_key(options.admin_key_file) if options.admin_key_file else None
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.argv: list[str] = []  # as started, admin key redacted
        self.started: float | None = None
        self.shm: set[str] = set()
        self._shm_before: set[str] = set()
        self._children: list[Any] = []

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def http_url(self) -> str:
        return f"http://{connect_host(self.options.address)}:{self.options.http_port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, cancelled: Callable[[], bool] | None = None) -> None:
        """Start the server and wait until it and its models are ready; on failure nothing is left.

        ``cancelled`` (polled while waiting) ends the wait early: the server is stopped and
        :class:`StartCancelled` raised.
        """
        check_ports(self.options)
        backend_dir = prepare_bundled_backends(self.workspace) if self.command.bundled else None
        view = repository_view(self.workspace, Path(self.options.repo), self.options.models) if self.options.models else None
        argv = server_argv(self.command, self.options, backend_dir, self.admin_key, view)
        env = server_environment(self.command.bundled, self.options.gpus)
        self.log_path = new_log_path(self.workspace)
        self.argv = redact(argv, self.admin_key)
        self._shm_before = set(glob.glob(SHM_PATTERN))
        with open(self.log_path, "ab") as log:
            log.write(f"[oatui] {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {shlex.join(self.argv)}\n".encode())
            log.flush()
            try:
                self.process = subprocess.Popen(  # noqa: S603 - an argv list, never a shell
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own group: stubs go with it, Ctrl-C reaches only us
                    close_fds=True,
                )
            except OSError as error:
                raise ServerStartError(f"cannot start {argv[0]}: {error.strerror}") from None
        self.started = time.time()

        def waiting() -> bool:
            return self.alive() and not (cancelled is not None and cancelled())

        try:
            ready = wait_ready(self.http_url, self.models, self.options.ready_timeout, waiting)
        except BaseException:
            self.stop()
            raise
        if not ready:
            code = self.process.poll()
            self.stop()
            if code is None and cancelled is not None and cancelled():
                raise StartCancelled("stopped before it was ready")
            if code is not None:
                reason = f"tritonserver exited with status {code} before it was ready"
            else:
                reason = f"tritonserver was not ready after {self.options.ready_timeout:g} s and was stopped"
            raise self.failure(reason)
        self._track_shm()
        self._children = descendants(self.process.pid)

    def failure(self, reason: str) -> ServerStartError:
        """``reason`` and the log's telling lines; the admin key redacted, since the message reaches
        stderr and ``server-error.json``."""
        assert self.log_path is not None
        excerpt = redact([log_excerpt(self.log_path)], self.admin_key)[0]
        return ServerStartError(f"{reason} (log {self.log_path}): {excerpt}")

    def _track_shm(self) -> None:
        if self.process is None:
            return
        mapped = mapped_shm(self.process.pid)
        if mapped:
            self.shm |= mapped
        elif not os.path.isdir(f"/proc/{self.process.pid}"):
            return
        else:
            # No /proc maps to read (another OS, or hidepid): what appeared since our start.
            self.shm |= set(glob.glob(SHM_PATTERN)) - self._shm_before

    def info(self, supervisor_pid: int | None = None) -> ServerInfo:
        assert self.process is not None and self.log_path is not None and self.started is not None
        from oatui.serve.repository import read_export_source

        pid_started = create_time(self.process.pid)
        sources = {name: read_export_source(Path(self.options.repo) / name) for name in self.models}
        return ServerInfo(
            pid=self.process.pid,
            address=self.options.address,
            http_port=self.options.http_port,
            grpc_port=self.options.grpc_port,
            metrics_port=self.options.metrics_port,
            repo=self.options.repo,
            models=self.models,
            log=str(self.log_path),
            started=self.started,
            server=self.argv,
            bundled=self.command.bundled,
            admin_key_file=self.options.admin_key_file,
            shm=sorted(self.shm),
            pid_started=pid_started,
            supervisor_pid=supervisor_pid,
            supervisor_started=create_time(supervisor_pid) if supervisor_pid else None,
            model_runs={name: source.run_id for name, source in sources.items() if source.run_id},
            model_steps={name: source.step for name, source in sources.items() if source.step is not None},
        )

    def wait(self, timeout: float | None = None) -> int | None:
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` s; its stubs and our shm files go too."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self._track_shm()
            self._children = descendants(self.process.pid) or self._children
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            if self.wait(grace) is None:
                # The leader is alive, so its group id is still ours to signal.
                signal_child_group(self.process.pid, signal.SIGKILL)
                self.wait(10)
        kill_processes(self._children)
        remove_shm(sorted(self.shm))
        return self.process.returncode


# ---------------------------------------------------------------------------------------------
# Foreground


def serve_foreground(
    workspace: Workspace,
    options: ServerOptions,
    on_ready: Callable[[ServerInfo], None] | None = None,
) -> int:
    """Run a server until it exits or this process gets SIGINT/SIGTERM/SIGHUP; then stop it."""
    server = TritonServer(workspace, options)
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            server.start(cancelled=stop_requested.is_set)
        except StartCancelled:
            return 130
        if on_ready is not None:
            on_ready(server.info())
        while not stop_requested.is_set():
            if server.wait(0.5) is not None:
                break
    finally:
        code = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop_requested.is_set():
        return 0
    raise server.failure(f"tritonserver exited with status {code}")


# ---------------------------------------------------------------------------------------------
# Detached: status, start, stop


def status(workspace: Workspace) -> ServerInfo | None:
    """The detached server of this workspace, or None; a stale record (all dead) is cleaned up.

    A pid recorded without its start time counts as dead (:func:`oatui.procutil.process_alive`),
    so its record is treated as stale and nothing is signalled. Every record oatui writes has the
    start times, unless the process had already gone when it was written; a record written before
    ``server.json`` kept them is stale here, and its server, if it still runs, is for the user to stop.
    """
    info = read_server_file(workspace)
    if info is None:
        return None
    if process_alive(info.pid, info.pid_started):
        return info
    if not process_alive(info.supervisor_pid, info.supervisor_started) and remove_server_file(workspace, info):
        remove_shm(info.shm)
    return None


def prepare_options(workspace: Workspace, options: ServerOptions, admin_key: str | None = None) -> ServerOptions:
    """Checks that need no server (exit 2 at once) and the admin key file, for either mode."""
    repo = expand_user(options.repo).absolute()
    options = replace(options, repo=str(repo))
    check_repository(repo, options.models)
    check_gpus(options.gpus)
    find_server(options.server_bin)
    check_ports(options)
    key_file = resolve_admin_key(workspace, options.address, admin_key)
    return replace(options, admin_key_file=str(key_file) if key_file else None)


def start_detached(workspace: Workspace, options: ServerOptions, admin_key: str | None = None) -> ServerInfo:
    """Start a server under a supervisor in its own session; returns once it is ready.

    The supervisor writes ``server.json``; a server that fails to start raises ServerStartError
    with the end of its log.
    """
    running = status(workspace)
    if running is not None:
        raise UserError(
            f"a server already runs for this workspace (pid {running.pid}, gRPC {running.grpc_url}); "
            "stop it with 'oatui serve --stop'"
        )
    options = prepare_options(workspace, options, admin_key)
    error_file = workspace.state / ERROR_FILE
    with contextlib.suppress(FileNotFoundError):
        error_file.unlink()
    with open(workspace.logs / "serve-supervisor.log", "ab") as log:
        process = subprocess.Popen(  # noqa: S603 - a fixed argv, no shell
            [sys.executable, "-m", "oatui.serve.supervisor", "--workspace", str(workspace.root),
             "--options", options.to_json()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + options.ready_timeout + STOP_GRACE + 30
    while time.monotonic() < deadline:
        info = read_server_file(workspace)
        if info is not None and info.supervisor_pid == process.pid:
            return info
        if process.poll() is not None:
            message = None
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                record = json.loads(error_file.read_text())
                if record.get("supervisor_pid") == process.pid:
                    message = record.get("error")
            if message is None:
                message = (f"the server supervisor exited with status {process.returncode} "
                           f"(log {workspace.logs / 'serve-supervisor.log'})")
            raise ServerStartError(message)
        time.sleep(0.1)
    signal_child_group(process.pid, signal.SIGTERM)
    raise ServerStartError("the server supervisor did not report a ready server in time")


def stop(workspace: Workspace, timeout: float = STOP_GRACE + 15) -> ServerInfo | None:
    """Stop the detached server of this workspace; returns what was running (None: nothing was)."""
    info = read_server_file(workspace)
    if info is None:
        return None
    supervisor_alive = signal_process(info.supervisor_pid, info.supervisor_started, signal.SIGTERM)
    if supervisor_alive:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process_alive(info.supervisor_pid, info.supervisor_started):
            time.sleep(0.1)
    if process_alive(info.pid, info.pid_started):
        # The supervisor is gone or stuck: stop the server ourselves.
        children = descendants(info.pid)
        signal_process(info.pid, info.pid_started, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and process_alive(info.pid, info.pid_started):
            time.sleep(0.1)
        signal_group(info.pid, info.pid_started, signal.SIGKILL)
        kill_processes(children)
    if supervisor_alive:
        signal_process(info.supervisor_pid, info.supervisor_started, signal.SIGKILL)
    remove_shm(info.shm)
    remove_server_file(workspace, info)
    return info
