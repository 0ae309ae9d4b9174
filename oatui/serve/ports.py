"""Where a server listens and who may use it: addresses, port checks, the admin key.

Servers bind to 127.0.0.1 unless told otherwise; on any other address every API but health,
metadata and inference needs the admin key, kept in a 0600 file of the workspace.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import secrets
import socket
import typing
from dataclasses import replace
from pathlib import Path

from oatui.errors import UserError
from oatui.fsutil import FILE_MODE, atomic_write_text, locked
from oatui.netutil import free_ports
from oatui.workspace import Workspace

if typing.TYPE_CHECKING:
    from oatui.serve.record import ServerOptions

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
#: The ``ServerOptions`` fields that name ports.
PORT_FIELDS = ("http_port", "grpc_port", "metrics_port")
ADMIN_KEY_FILE = "triton-admin-key"
ADMIN_HEADER = "admin-key"
#: tritonserver prefixes the header of a restricted gRPC protocol with this.
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"


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


def free_ports_if_taken(options: ServerOptions) -> ServerOptions:
    """``options``, or the same with free loopback ports when one of its ports is taken (another
    server, say)."""
    try:
        check_ports(options)
    except UserError:
        http, grpc, metrics = free_ports(3)
        return replace(options, http_port=http, grpc_port=grpc, metrics_port=metrics)
    return options


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
        atomic_write_text(path, key + "\n")
    os.chmod(path, FILE_MODE)
    return path


def read_admin_key(path: str | os.PathLike[str]) -> str:
    return Path(path).read_text().strip()
