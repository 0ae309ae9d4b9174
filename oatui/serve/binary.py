"""Which tritonserver runs, and the environment and command line it runs with.

The server binary is, in order: ``--server-bin`` (a path, or a wrapper's command line such as
``apptainer exec --nv tritonserver.sif tritonserver``, split with shlex, never run by a shell),
``tritonserver`` on PATH, or the one bundled in the ``nvidia-pytriton`` wheel. The bundled one
needs a writable copy of its Python backend with this Python's stub beside it, this interpreter's
libpython and the wheel's libraries on ``LD_LIBRARY_PATH``, and the virtualenv's ``bin/`` first on
PATH (the stub finds its Python packages that way; it ignores PYTHONPATH).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from oatui.errors import UserError
from oatui.fsutil import locked, make_private_dir
from oatui.serve.ports import ADMIN_HEADER
from oatui.workspace import Workspace

if typing.TYPE_CHECKING:
    from oatui.serve.record import ServerOptions

# Triton waits this long for in-flight requests when asked to stop (its default is 30 s).
EXIT_TIMEOUT_SECS = 5
# Every API group tritonserver can restrict (src/restricted_features.h) but health, metadata and
# inference: the repository and shared memory, model configs (they reveal the model's path),
# statistics, trace settings and logging settings (POST /v2/logging).
RESTRICTED_APIS = "shared-memory,model-config,model-repository,statistics,trace,logging"


def bundled_server_dir() -> Path | None:
    """``pytriton/tritonserver`` of the nvidia-pytriton wheel, found without importing pytriton."""
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
