"""The detached server's supervisor: starts tritonserver, records it, stops it cleanly.

Started by :func:`oatui.serve.server.start_detached` in its own session. It writes
``WORKSPACE/state/server.json`` once the server and its models are ready, turns SIGTERM/SIGINT
into a clean stop (server SIGTERM, SIGKILL after a grace, stubs and their shared memory
removed), and removes ``server.json`` when the server has gone, whichever way it went.

    python -m oatui.serve.supervisor --workspace DIR --options JSON
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from oatui.errors import UserError
from oatui.fsutil import atomic_write_json
from oatui.procutil import stop_on_signals
from oatui.serve.record import ERROR_FILE, ServerOptions, clear_server_file, write_server_file
from oatui.serve.server import StartCancelled, TritonServer
from oatui.workspace import Workspace


def supervise(workspace: Workspace, options: ServerOptions) -> int:
    os.umask(0o077)
    stop = stop_on_signals()
    me = os.getpid()
    try:
        server = TritonServer(workspace, options)
        server.start(cancelled=stop.is_set)
    except StartCancelled:
        print(f"[oatui] {time.strftime('%Y-%m-%d %H:%M:%S')} stopped while starting", flush=True)
        return 0
    except UserError as error:
        atomic_write_json(workspace.state / ERROR_FILE, {"supervisor_pid": me, "error": str(error), "time": time.time()})
        print(f"[oatui] {time.strftime('%Y-%m-%d %H:%M:%S')} not started: {error}", flush=True)
        return 1
    try:
        # Inside the try: a record that cannot be written must not leave an unrecorded server.
        write_server_file(workspace, server.info(supervisor_pid=me))
        print(f"[oatui] {time.strftime('%Y-%m-%d %H:%M:%S')} tritonserver {server.pid} ready, log {server.log_path}",
              flush=True)
        while not stop.is_set():
            if server.wait(0.5) is not None:
                print(f"[oatui] tritonserver {server.pid} exited with status {server.process.returncode}", flush=True)
                break
    finally:
        code = server.stop()
        clear_server_file(workspace, me)
    print(f"[oatui] {time.strftime('%Y-%m-%d %H:%M:%S')} tritonserver {server.pid} stopped ({code})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oatui.serve.supervisor")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--options", required=True, help="ServerOptions as JSON")
    args = parser.parse_args(argv)
    workspace = Workspace.open(args.workspace)
    options = ServerOptions.from_json(args.options)
    return supervise(workspace, options)


if __name__ == "__main__":
    sys.exit(main())
