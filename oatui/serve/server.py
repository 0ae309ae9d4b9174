"""The tritonserver process: which binary, how the bundled one is set up, ports, readiness, stopping.

``oatui serve`` runs one server in the foreground; ``start_detached`` runs it under a small
supervisor process (:mod:`oatui.serve.supervisor`) in its own session and records it in
``WORKSPACE/state/server.json``, which ``status`` and ``stop`` read. The app calls these functions
directly, so this module imports neither torch nor transformers (nor tritonclient).

The server binary is, in order: ``--server-bin`` (a path, or a wrapper's command line such as
``apptainer exec --nv tritonserver.sif tritonserver``, split with shlex, never run by a shell),
``tritonserver`` on PATH, or the one bundled in the ``nvidia-pytriton`` wheel. The bundled one
needs a writable copy of its Python backend with this Python's stub beside it, this interpreter's
libpython and the wheel's libraries on ``LD_LIBRARY_PATH``, and the virtualenv's ``bin/`` first on
PATH (the stub finds its Python packages that way; it ignores PYTHONPATH).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import typing
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from oatui.errors import UserError
from oatui.fsutil import (
    FILE_MODE,
    UnreadableFile,
    atomic_write_json,
    expand_user,
    locked,
    make_private_dir,
    fits_type,
    read_json_file,
    tail_lines,
)
from oatui.workspace import Workspace

if typing.TYPE_CHECKING:
    from oatui.serve.repository import ExportSource

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
DEFAULT_READY_TIMEOUT = 60.0
STOP_GRACE = 15.0
# Triton waits this long for in-flight requests when asked to stop (its default is 30 s).
EXIT_TIMEOUT_SECS = 5
SERVER_FILE = "server.json"
ERROR_FILE = "server-error.json"
ADMIN_KEY_FILE = "triton-admin-key"
ADMIN_HEADER = "admin-key"
# Every API group tritonserver can restrict (src/restricted_features.h) but health, metadata and
# inference: the repository and shared memory, model configs (they reveal the model's path),
# statistics, trace settings and logging settings (POST /v2/logging).
RESTRICTED_APIS = "shared-memory,model-config,model-repository,statistics,trace,logging"
#: tritonserver prefixes the header of a restricted gRPC protocol with this.
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
SHM_PATTERN = "/dev/shm/triton_python_backend_shm*"


class ServerStartError(UserError):
    """tritonserver did not start or did not become ready; the message ends with its log's last lines."""


class StartCancelled(Exception):
    """A stop was asked for while the server was starting (it has been stopped)."""


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


# ---------------------------------------------------------------------------------------------
# Addresses, ports, keys


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def connect_host(address: str) -> str:
    """Where a local client connects to a server bound to ``address``."""
    address = address.strip("[]")
    if address in ("0.0.0.0", ""):
        return "127.0.0.1"
    if address == "::":
        return "[::1]"
    return f"[{address}]" if ":" in address else address


def check_port_free(address: str, port: int, option: str) -> None:
    """Exit-2 error naming the option when ``port`` cannot be listened on at ``address``."""
    if not 1 <= port <= 65535:
        raise UserError(f"{option} {port}: not a port number (1-65535)")
    host = address.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as error:
            raise UserError(f"--address {address}: {error.strerror}") from None
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"{option} {port}: port in use on {address}") from None
            if error.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--address {address}: not an address of this machine") from None
            raise UserError(f"{option} {port}: cannot listen on {address}: {error.strerror}") from None


def check_ports(options: ServerOptions) -> None:
    named = [("--http-port", options.http_port), ("--grpc-port", options.grpc_port), ("--metrics-port", options.metrics_port)]
    seen: dict[int, str] = {}
    for option, port in named:
        if port in seen:
            raise UserError(f"{option} {port}: the same port as {seen[port]}")
        seen[port] = option
    for option, port in named:
        check_port_free(options.address, port, option)


def admin_key_path(workspace: Workspace) -> Path:
    return workspace.state / ADMIN_KEY_FILE


def resolve_admin_key(workspace: Workspace, address: str, key: str | None) -> Path | None:
    """The 0600 file holding the admin key, when the server needs one (non-loopback, or asked for).

    A given key is stored there; otherwise the stored key is kept, or a random one is made.
    """
    if key is None and is_loopback(address):
        return None
    path = admin_key_path(workspace)
    if key is not None:
        key = key.strip()
        if not key or any(c.isspace() or c in ",:=" for c in key):
            raise UserError("--admin-key: use a non-empty key without spaces, ',', ':' or '='")
    with locked(path):
        if key is None:
            with contextlib.suppress(FileNotFoundError):
                key = path.read_text().strip() or None
        if key is None:
            key = secrets.token_urlsafe(32)
        from oatui.fsutil import atomic_write_text

        atomic_write_text(path, key + "\n")
    os.chmod(path, FILE_MODE)
    return path


def read_admin_key(path: str | os.PathLike[str]) -> str:
    return Path(path).read_text().strip()


# ---------------------------------------------------------------------------------------------
# The binary and its environment


def bundled_server_dir() -> Path | None:
    """``pytriton/tritonserver`` of the nvidia-pytriton wheel, found without importing pytriton."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return folder if (folder / "bin" / "tritonserver").is_file() else None


@dataclass(frozen=True)
class ServerCommand:
    argv: list[str]  # the command that runs tritonserver (a wrapper's argv ends with the binary)
    bundled: bool


def find_server(server_bin: str | None = None) -> ServerCommand:
    if server_bin:
        try:
            argv = shlex.split(server_bin)
        except ValueError as error:
            raise UserError(f"--server-bin {server_bin!r}: {error}") from None
        if not argv:
            raise UserError("--server-bin: empty command")
        if shutil.which(argv[0]) is None:
            raise UserError(f"--server-bin: {argv[0]}: no such executable")
        return ServerCommand(argv, bundled=False)
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerCommand([on_path], bundled=False)
    bundled = bundled_server_dir()
    if bundled is not None:
        return ServerCommand([str(bundled / "bin" / "tritonserver")], bundled=True)
    raise UserError("no tritonserver: none on PATH and nvidia-pytriton is not installed; give --server-bin")


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except FileNotFoundError:
        return False
    return sa.st_size == sb.st_size and int(sa.st_mtime) == int(sb.st_mtime)


def prepare_bundled_backends(workspace: Workspace, bundled: Path | None = None) -> Path:
    """A writable copy of the bundled Python backend with this Python's stub beside the library.

    Returns the folder to pass as ``--backend-directory`` (it holds ``python/``). Never point the
    server into site-packages: the backend chmods its stub and then test-runs it.
    """
    bundled = bundled or bundled_server_dir()
    if bundled is None:
        raise UserError("nvidia-pytriton is not installed (its bundled tritonserver is needed)")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundled / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    source = bundled / "backends" / "python"
    root = make_private_dir(workspace.state / "triton-backends")
    target = root / "python"
    wanted = [(source / "libtriton_python.so", target / "libtriton_python.so"),
              (source / "triton_python_backend_utils.py", target / "triton_python_backend_utils.py"),
              (stub, target / "triton_python_backend_stub")]
    with locked(root / "python.copy"):
        if all(_same_file(src, dst) for src, dst in wanted):
            return root
        staging = root / f".python-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, staging / "triton_python_backend_stub")
        os.chmod(staging / "triton_python_backend_stub", 0o755)
        os.chmod(staging, 0o755)
        old = root / f".python-old-{os.getpid()}"
        if target.exists():
            os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    return root


def server_environment(bundled: bool, gpus: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if bundled:
        server_dir = bundled_server_dir()
        libs = [sysconfig.get_config_var("LIBDIR") or ""]
        if server_dir is not None:
            libs.append(str(server_dir.parent.parent / "nvidia_pytriton.libs"))
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
        # The stub embeds Python and takes its packages from the first python on PATH.
        venv_bin = str(Path(sys.prefix) / "bin")
        env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def repository_view(workspace: Workspace, repo: Path, models: Sequence[str]) -> Path:
    """A repository holding only ``models``: links to their folders in ``repo``.

    Serving a subset this way keeps Triton's model control mode at ``none`` (``--load-model``
    would need ``explicit``, which lets any client of the repository API load models).
    """
    view = workspace.state / "triton-view" / hashlib.sha1(
        f"{repo.resolve()}\0{','.join(sorted(models))}".encode()).hexdigest()[:12]
    staging = view.with_name(view.name + f".{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, mode=0o700)
    for name in models:
        os.symlink((repo / name).resolve(), staging / name, target_is_directory=True)
    shutil.rmtree(view, ignore_errors=True)
    os.replace(staging, view)
    return view


def server_argv(
    command: ServerCommand,
    options: ServerOptions,
    backend_dir: Path | None,
    admin_key: str | None,
    repository: Path | None = None,
) -> list[str]:
    """The tritonserver command line; ``repository`` replaces ``options.repo`` (a view of some models)."""
    argv = [
        *command.argv,
        f"--model-repository={repository or options.repo}",
        "--disable-auto-complete-config",
        f"--http-address={options.address.strip('[]')}",
        f"--grpc-address={options.address.strip('[]')}",
        f"--metrics-address={options.address.strip('[]')}",
        f"--http-port={options.http_port}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-port={options.metrics_port}",
        f"--exit-timeout-secs={EXIT_TIMEOUT_SECS}",
    ]
    if backend_dir is not None:
        argv.append(f"--backend-directory={backend_dir}")
    # Always none: every model in the repository is loaded at start and no API can load another.
    argv.append("--model-control-mode=none")
    if admin_key is not None:
        restriction = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={admin_key}"
        argv.append(f"--grpc-restricted-protocol={restriction}")
        argv.append(f"--http-restricted-api={restriction}")
    return argv


def redact(argv: Sequence[str], secret: str | None) -> list[str]:
    return [arg.replace(secret, "***") if secret else arg for arg in argv]


# ---------------------------------------------------------------------------------------------
# Readiness and logs


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


# ---------------------------------------------------------------------------------------------
# Shared memory left by Python backend stubs


def _process_tree(pid: int) -> list[int]:
    try:
        import psutil

        process = psutil.Process(pid)
        return [pid, *(child.pid for child in process.children(recursive=True))]
    except Exception:  # noqa: BLE001 - gone, or no psutil: only the pid itself
        return [pid]


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
        self._children = _descendants(self.process.pid)

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

        pid_started = _create_time(self.process.pid)
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
            supervisor_started=_create_time(supervisor_pid) if supervisor_pid else None,
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
            self._children = _descendants(self.process.pid) or self._children
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            if self.wait(grace) is None:
                # The leader is alive, so its group id is still ours to signal.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.wait(10)
        _kill_processes(self._children)
        remove_shm(sorted(self.shm))
        return self.process.returncode


def _descendants(pid: int) -> list[Any]:
    """psutil handles of ``pid``'s descendants (they know their start time: no pid-reuse mistakes)."""
    try:
        import psutil

        return list(psutil.Process(pid).children(recursive=True))
    except Exception:  # noqa: BLE001 - gone already
        return []


def _kill_processes(processes: Sequence[Any]) -> None:
    """Whatever is left of a server's children (stubs whose server died first)."""
    for process in processes:
        with contextlib.suppress(Exception):
            if process.is_running():
                process.kill()


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
# Detached: server.json, status, stop


def server_file(workspace: Workspace) -> Path:
    return workspace.state / SERVER_FILE


def _read_server_file(workspace: Workspace) -> ServerInfo | None:
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


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - gone
        return None


def _alive(pid: int | None, started: float | None = None) -> bool:
    """Whether ``pid`` is the process recorded: alive, and started when the record says. A pid
    without its start time is never trusted (``server.json`` is read back from disk: a wrong pid
    there must not get some other process signalled), nor is init, nor this process."""
    if not isinstance(pid, int) or pid <= 1 or started is None or pid == os.getpid():
        return False
    try:
        import psutil

        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - started) < 1.0
    except Exception:  # noqa: BLE001 - no such process
        return False


def status(workspace: Workspace) -> ServerInfo | None:
    """The detached server of this workspace, or None; a stale record (all dead) is cleaned up."""
    info = _read_server_file(workspace)
    if info is None:
        return None
    if _alive(info.pid, info.pid_started):
        return info
    if not _alive(info.supervisor_pid, info.supervisor_started):
        with locked(server_file(workspace)):
            current = _read_server_file(workspace)
            if current == info:
                with contextlib.suppress(FileNotFoundError):
                    server_file(workspace).unlink()
                remove_shm(info.shm)
    return None


def write_server_file(workspace: Workspace, info: ServerInfo) -> None:
    with locked(server_file(workspace)):
        atomic_write_json(server_file(workspace), info.to_dict())


def clear_server_file(workspace: Workspace, supervisor_pid: int) -> None:
    with locked(server_file(workspace)):
        current = _read_server_file(workspace)
        if current is not None and current.supervisor_pid == supervisor_pid:
            with contextlib.suppress(FileNotFoundError):
                server_file(workspace).unlink()


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
        info = _read_server_file(workspace)
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
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    raise ServerStartError("the server supervisor did not report a ready server in time")


def stop(workspace: Workspace, timeout: float = STOP_GRACE + 15) -> ServerInfo | None:
    """Stop the detached server of this workspace; returns what was running (None: nothing was)."""
    info = _read_server_file(workspace)
    if info is None:
        return None
    supervisor_alive = _alive(info.supervisor_pid, info.supervisor_started)
    if supervisor_alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.supervisor_pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(info.supervisor_pid, info.supervisor_started):
            time.sleep(0.1)
    if _alive(info.pid, info.pid_started):
        # The supervisor is gone or stuck: stop the server ourselves.
        children = _descendants(info.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and _alive(info.pid, info.pid_started):
            time.sleep(0.1)
        if _alive(info.pid, info.pid_started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(info.pid, signal.SIGKILL)
        _kill_processes(children)
    if supervisor_alive and _alive(info.supervisor_pid, info.supervisor_started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.supervisor_pid, signal.SIGKILL)  # type: ignore[arg-type]
    remove_shm(info.shm)
    with locked(server_file(workspace)):
        if _read_server_file(workspace) == info:
            with contextlib.suppress(FileNotFoundError):
                server_file(workspace).unlink()
    return info
