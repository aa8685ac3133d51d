"""Loopback helpers and the fake S3 credentials the test endpoint is given (importable from
any test module: `conftest` names collide between test folders)."""

from __future__ import annotations

import socket
import time

TEST_KEY_ID = "testing-key-id"
TEST_SECRET = "testing-secret-value-do-not-log"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all are held open together while picked, so the kernel
    cannot hand the same one out twice (a service given two equal ports refuses to start)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")
