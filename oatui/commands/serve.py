"""`oatui serve`: run Triton Inference Server on a model repository."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import TYPE_CHECKING

from oatui.errors import UserError
from oatui.fsutil import expand_user

if TYPE_CHECKING:
    from oatui.serve.record import ServerInfo, ServerOptions
    from oatui.workspace import Workspace

DESCRIPTION = """\
Run tritonserver on a model repository written by 'oatui export' (default WORKSPACE/triton).
The server is --server-bin (a path, or a wrapper's command line such as
'apptainer exec --nv tritonserver.sif tritonserver'), else tritonserver on PATH, else the one
bundled in nvidia-pytriton (set up under WORKSPACE/state/triton-backends). It listens on
127.0.0.1 unless --address says otherwise; a non-loopback address restricts every API but
health, metadata and inference (model repository, model config, statistics, trace, logging,
shared memory) to requests carrying the header 'admin-key' (gRPC: 'triton-grpc-protocol-admin-key');
the key is --admin-key, or a random one, stored in a 0600 file under WORKSPACE/state.
tritonserver takes the key only on its command line, where other users of this machine can read
it (/proc/PID/cmdline): on a shared machine keep the default address and reach the server through
an SSH tunnel instead (ssh -L 8001:127.0.0.1:8001 HOST).
In the foreground Ctrl-C stops it; --detach leaves it running under a supervisor
('oatui serve --status' / '--stop'). The log goes to WORKSPACE/logs/tritonserver-TIME.log.
"""


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "serve",
        parents=parents,
        help="run Triton Inference Server on the model repository",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repo", metavar="DIR", help="model repository (default: WORKSPACE/triton)")
    parser.add_argument("--http-port", type=int, default=8000, metavar="N", help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=int, default=8001, metavar="N", help="gRPC port (default 8001)")
    parser.add_argument("--metrics-port", type=int, default=8002, metavar="N", help="metrics port (default 8002)")
    parser.add_argument("--address", default="127.0.0.1", metavar="ADDR",
                        help="address to listen on (default 127.0.0.1; others restrict all but health, metadata and "
                             "inference to the admin key, which other local users can read: prefer ssh -L)")
    parser.add_argument("--models", metavar="A,B", help="load only these models (default: all in the repository)")
    parser.add_argument("--gpus", metavar="LIST", help="GPUs the server may use, e.g. 7 or 0,1 (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--server-bin", metavar="CMD",
                        help="tritonserver to run: a path or a command line (split like a shell, never run by one)")
    parser.add_argument("--admin-key", metavar="KEY", help="key for the restricted APIs (default: a random one)")
    parser.add_argument("--ready-timeout", type=float, default=60.0, metavar="S",
                        help="seconds to wait for the server and its models to be ready (default 60)")
    actions = parser.add_mutually_exclusive_group()
    actions.add_argument("--detach", action="store_true", help="start it in the background and return once it is ready")
    actions.add_argument("--status", action="store_true",
                         help="say whether the detached server runs: its addresses, models, uptime and log")
    actions.add_argument("--stop", action="store_true", help="stop the detached server")
    parser.add_argument("--json", action="store_true",
                        help="with --status: the server's record as JSON (null when it is not running)")
    parser.set_defaults(func=run)


def _options(args: argparse.Namespace, workspace: "Workspace") -> "ServerOptions":
    from oatui.serve.record import ServerOptions

    repo = expand_user(args.repo).absolute() if args.repo else workspace.triton_repo
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else ()
    if args.models is not None and not models:
        raise UserError("--models: name at least one model")
    if not 0 < args.ready_timeout < float("inf"):  # also refuses nan
        raise UserError(f"--ready-timeout {args.ready_timeout:g}: must be a number of seconds above 0")
    return ServerOptions(
        repo=str(repo),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        address=args.address,
        models=models,
        gpus=args.gpus,
        server_bin=args.server_bin,
        ready_timeout=args.ready_timeout,
    )


def _describe(info: "ServerInfo", prefix: str) -> str:
    models = ", ".join(info.models)
    return (f"{prefix}: gRPC {info.grpc_url}, HTTP {info.http_url}, metrics {info.metrics_url}; "
            f"models {models}; log {info.log}")


def status_table(info: "ServerInfo", now: float | None = None) -> str:
    """``oatui serve --status`` for people: one line per fact, the names aligned."""
    from oatui.monitor.text import format_duration
    from oatui.serve.ports import is_loopback

    now = time.time() if now is None else now
    uptime = now - info.started
    up = format_duration(max(0.0, uptime)) if math.isfinite(uptime) else "?"
    where = "bundled tritonserver (nvidia-pytriton)" if info.bundled else (info.server[0] if info.server else "tritonserver")
    rows = [
        ("server", f"running, pid {info.pid}, up {up}"),
        ("gRPC", info.grpc_url),
        ("HTTP", info.http_url),
        ("metrics", info.metrics_url),
        ("address", info.address + ("" if is_loopback(info.address) or info.admin_key_file is None else
                                    f" (restricted APIs need the key in {info.admin_key_file})")),
        ("models", ", ".join(info.served_label(name) for name in info.models) or "-"),
        ("repository", info.repo),
        ("binary", where),
        ("log", info.log),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    from oatui.serve import server
    from oatui.serve.ports import ADMIN_HEADER, GRPC_HEADER_PREFIX, is_loopback
    from oatui.workspace import Workspace

    if args.json and not args.status:
        raise UserError("--json: only with --status")
    workspace = Workspace.open(args.workspace)
    if args.status:
        info = server.status(workspace)
        if args.json:
            print(json.dumps(None if info is None else info.to_dict(), indent=2, sort_keys=True))
        else:
            print("not running" if info is None else status_table(info))
        return 0
    if args.stop:
        info = server.stop(workspace)
        print("not running" if info is None else f"stopped tritonserver {info.pid} ({info.grpc_url})", file=sys.stderr)
        return 0
    options = _options(args, workspace)

    def announce_key(key_file: str | None) -> None:
        # Said once the options have passed their checks: an error stays the only line.
        if not is_loopback(options.address):
            print(f"oatui serve: listening on {options.address}: reachable from other machines; the admin key "
                  "is on tritonserver's command line, visible to this machine's users (an SSH tunnel to "
                  "127.0.0.1 avoids both)", file=sys.stderr)
        if key_file:
            print(f"admin key for every API but health, metadata and inference (header '{ADMIN_HEADER}', "
                  f"gRPC '{GRPC_HEADER_PREFIX}{ADMIN_HEADER}'): stored in {key_file}", file=sys.stderr)

    if args.detach:
        info = server.start_detached(workspace, options, admin_key=args.admin_key)
        announce_key(info.admin_key_file)
        print(_describe(info, f"tritonserver {info.pid} ready"), file=sys.stderr)
        print(info.grpc_url)
        return 0
    options = server.prepare_options(workspace, options, admin_key=args.admin_key)
    announce_key(options.admin_key_file)

    def on_ready(info: "ServerInfo") -> None:
        print(_describe(info, f"tritonserver {info.pid} ready") + " (Ctrl-C stops it)", file=sys.stderr, flush=True)

    return server.serve_foreground(workspace, options, on_ready)
