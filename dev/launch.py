"""Child processes the launchers start: free loopback ports, one ``Service`` per process.

``gateway.demo``, ``gateway.cluster`` and ``gateway.bench`` start ``worker.sim`` engines,
sidecars, etcd, NATS and gateways as real processes; this module is how each one is
started (own session, output to a log file), waited for (its health URL answers 200)
and stopped by PID (SIGTERM, then SIGKILL past a timeout).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger("kvgate.dev.launch")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status ``url`` answers with, None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


class Service:
    """One child process: restartable with the same arguments, output appended to a log file."""

    def __init__(self, name: str, args: Sequence[str], log_dir: Path, health_url: str | None = None) -> None:
        self.name = name
        self.args = [str(a) for a in args]
        self.log_path = log_dir / f"{name}.log"
        self.health_url = health_url
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        return self.alive() and (self.health_url is None or http_status(self.health_url) == 200)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.process and self.process.returncode}); "
                                   f"see {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not healthy after {timeout:.0f}s; see {self.log_path}")
            time.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``; SIGKILL also waits for the process to be gone."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)
            if sig == signal.SIGKILL:
                self.process.wait(timeout=10)

    def wait(self, timeout: float = 10.0) -> None:
        """Wait for the process to end (after a signal); SIGKILL it past ``timeout``."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for %.0fs: killing it", self.name, timeout)
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        self.kill(signal.SIGTERM)
        self.wait(timeout)

    def restart(self) -> None:
        """SIGKILL, then start again with the same arguments (same ports, same data)."""
        self.kill()
        self.start()


def stop_all(services: Iterable[Service], timeout: float = 10.0) -> None:
    """SIGTERM them all at once, then wait for each."""
    services = [s for s in services if s.alive()]
    for service in services:
        service.kill(signal.SIGTERM)
    for service in services:
        service.wait(timeout)
