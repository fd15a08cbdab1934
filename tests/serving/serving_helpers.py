"""Helpers shared by the serving tests (a uniquely named module: every test folder has a conftest)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


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


@dataclass
class Server:
    url: str
    management_url: str
    metrics_url: str
    run_dir: Path
    token: str
    management_token: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextlib.contextmanager
def serving(store: Path, run_dir: Path) -> Iterator[Server]:
    """A real TorchServe started by `digits serve` for `store` on free ports, stopped by `digits stop`."""
    from digits.serving.server import read_state, read_token

    from digits.cli import main

    argv = ["--run-dir", str(run_dir)]
    assert main(["serve", "--model-store", str(store), *argv, *port_flags(free_ports(len(PORT_FLAGS)))]) == 0
    state = read_state(run_dir)
    try:
        yield Server(
            state.inference_url,
            state.management_url,
            state.metrics_url,
            run_dir,
            read_token(run_dir),
            read_token(run_dir, "management"),
        )
    finally:
        assert main(["stop", *argv]) == 0
