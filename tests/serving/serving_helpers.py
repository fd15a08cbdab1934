"""Helpers shared by the serving tests (a uniquely named module: every test folder has a conftest)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


PORT_FLAGS = [
    "--inference-port",
    "--management-port",
    "--metrics-port",
    "--grpc-inference-port",
    "--grpc-management-port",
]


def port_flags(ports: list[int]) -> list[str]:
    return [arg for flag, port in zip(PORT_FLAGS, ports, strict=True) for arg in (flag, str(port))]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Polls `condition()` until it holds; the timeout only bounds a test that would otherwise hang.

    For what TorchServe does after it has answered (a worker's output reaches its log through a reader
    thread of the frontend): wait on the thing itself, never on a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)
