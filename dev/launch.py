"""Child processes, the one way kvgate starts them: free loopback ports, one ``Service`` each.

``dev.demo``, ``dev.cluster``, ``dev.gateway_bench``, the load test's stack, the
simulator's bench and the tests start ``worker.sim`` engines, sidecars, etcd, NATS and
gateways as real processes; this module is how each one is started (its own session,
so a terminal's Ctrl-C reaches only the launcher; output to a log file), waited for
(its health URL answers 200) and stopped by PID (SIGTERM, then SIGKILL past a
timeout). It never finds, reuses or signals a process it did not start.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger("kvgate.dev.launch")


_handed_out: set[int] = set()


def free_port(host: str = "0.0.0.0") -> int:
    """A port nothing listens on right now (the kernel's pick), for a child to bind.

    Probed on every interface by default, since engines bind ``tcp://*:PORT``. Never the
    same port twice in one process: the kernel may pick a port it just released again,
    and a launcher starting a fleet asks for a dozen before any child binds one.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


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
    """One child process, restartable with the same arguments; output goes to ``<log_dir>/<name>.log``.

    The first start empties the log; a restart appends to it, so a post-mortem sees
    every life of the process. ``env`` adds to this process's environment.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str | int | float | Path],
        log_dir: Path,
        health_url: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.args = [str(a) for a in args]
        self.log_path = log_dir / f"{name}.log"
        self.health_url = health_url
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> None:
        with open(self.log_path, "wb" if self.process is None else "ab") as out:
            self.process = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env, cwd=self.cwd
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        return self.alive() and (self.health_url is None or http_status(self.health_url) == 200)

    def wait_healthy(self, timeout: float = 60.0, ready: Callable[[], bool] | None = None) -> None:
        """Until healthy and, if given, ``ready()`` holds; RuntimeError if it exits, TimeoutError past ``timeout``."""
        deadline = time.monotonic() + timeout
        while not (self.healthy() and (ready is None or ready())):
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited ({self.process and self.process.returncode}); "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} not ready after {timeout:.0f}s; see {self.log_path}:\n{self.log_tail()}"
                )
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
