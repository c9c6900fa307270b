"""Ports: refuse a taken port before anything starts, naming the process that holds it where the OS tells
us; find a free one."""

from __future__ import annotations

import socket

from pcbcore.errors import MergeInputError

DEFAULT_HOST = "127.0.0.1"


def check_port_free(host: str, port: int, what: str) -> None:
    """Refuse a port that something already listens on (or that cannot be bound), naming the holder."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the servers do: a port whose last connections linger in TIME_WAIT is free; a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            holder = port_holder(port)
            by = f" by {holder}" if holder else ""
            raise MergeInputError(f"{what} port {port} on {host} is taken{by} ({exc.strerror}); choose another with --{what.lower()}-port") from None


def port_holder(port: int) -> str | None:
    """`'name (pid N)'` of the process listening on `port`, when the OS lets us see it."""
    import psutil

    try:
        connections = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, PermissionError):
        return None
    for conn in connections:
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            try:
                return f"{psutil.Process(conn.pid).name()} (pid {conn.pid})"
            except psutil.Error:
                return f"pid {conn.pid}"
    return None


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port nothing listens on now (for tests and examples)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
