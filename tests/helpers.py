"""What the tests share to start processes and wait for things: one module, one of each.

Processes are ``kvgate.dev.launch.Service``s (own session, log file, stopped by PID,
SIGTERM then SIGKILL): ``Proc`` only adds what tests read of them (``popen``, the whole
log, a ``kill`` that waits), and ``python_module`` starts one at once. ``wait_http``
waits for a URL to answer a status. ``until`` (async) and ``wait_until`` (blocking) wait
for a condition the system under test must reach and fail the test with ``what`` if it
never does. Tests start their own servers on 127.0.0.1 with free ports
(``kvgate.dev.launch.free_port``) and stop only the processes they started.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from kvgate.dev.launch import Service, http_status

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "models" / "kvgate-tiny"

T = TypeVar("T")


class Proc(Service):
    """A child process a test started at once; its log is ``log_path``."""

    def __init__(self, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        super().__init__(log_path.stem, args, log_path.parent, env=env, cwd=REPO)
        self.start()

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        assert self.process is not None
        return self.process

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` and wait for the process to be gone."""
        super().kill(sig)
        self.wait()


def python_module(module: str, *args: str | int | Path, log_path: Path, env: Mapping[str, str] | None = None) -> Proc:
    # Run from the checkout, a rootless module name (worker.sim) would import the folder as a second
    # copy of the package: only the installed name (kvgate.worker.sim) is allowed.
    if module.split(".")[0] in {"gateway", "router", "indexer", "worker", "loadtest", "protocol", "dev"}:
        raise ValueError(f"start kvgate's modules by their installed name (kvgate.…), not {module!r}")
    return Proc([sys.executable, "-m", module, *map(str, args)], log_path, env)


def wait_http(url: str, timeout: float = 30.0, proc: Proc | None = None, status: int = 200) -> None:
    """Poll ``url`` until it answers ``status``; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    last: int | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"process exited ({proc.popen.returncode}) before {url} was up:\n{proc.log()}")
        last = http_status(url)
        if last == status:
            return
        time.sleep(0.1)
    detail = proc.log() if proc is not None else ""
    raise TimeoutError(f"{url} not answering {status} after {timeout}s (last: {last})\n{detail}")


def serving(proc: Proc, base: str, log: Path, timeout: float = 60.0) -> Iterator[str]:
    """A fixture's body for one server process: ``base`` once ``/health`` answers, the process stopped
    after, and its log free of tracebacks (a server that crashed on a request fails its tests)."""
    try:
        wait_http(base + "/health", timeout=timeout, proc=proc)
        yield base
    finally:
        proc.stop()
    assert "Traceback" not in log.read_text()


async def until(
    predicate: Callable[[], object],
    what: str | Callable[[], str] = "condition",
    timeout: float = 10.0,
    *,
    step: Callable[[], Awaitable[object]] | None = None,
) -> float:
    """Wait for ``predicate``; returns the seconds it took (a figure to print, never to assert on).

    Between checks it sleeps, or awaits ``step()`` (receiving one message, say), cut
    short when the time is up. ``what`` (or what it returns, read on failure) names the
    condition in the failure.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        left = start + timeout - loop.time()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout}s waiting for {what if isinstance(what, str) else what()}")
        if step is None:
            await asyncio.sleep(min(0.01, left))
            continue
        try:
            await asyncio.wait_for(step(), left)
        except TimeoutError:
            pass
    return loop.time() - start


def wait_until(predicate: Callable[[], T], what: str = "condition", timeout: float = 20.0) -> T:
    """Block until ``predicate()`` is truthy and return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)
