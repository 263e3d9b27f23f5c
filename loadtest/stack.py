"""The stack under test: N simulated workers and a gateway, as child processes.

Owns starting them on free loopback ports (``python -m kvgate.worker.sim`` and
``python -m kvgate.gateway --config``, spoken to over HTTP only), waiting until they
answer, and stopping exactly the processes it started, by PID, SIGTERM then
SIGKILL. Each process logs to a file in the report directory. Against an
already-running stack (``--gateway-url``) nothing is started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from kvgate.loadtest.corpus import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]


class StackError(RuntimeError):
    """A process of the stack did not come up."""


@dataclass(frozen=True)
class StackConfig:
    """Worker and gateway settings for a bench-started stack; every default in one place."""

    workers: int = 2
    model: str = str(DEFAULT_MODEL)
    block_size: int = 64
    num_gpu_blocks: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 32768
    speedup_ratio: float = 1.0
    cpu_blocks: int = 0              # worker CPU tier (0: none); see worker/README.md
    disk_blocks: int = 0             # worker disk tier (0: none)
    event_encoding: str = "map"
    seed: int = 0
    startup_timeout_s: float = 60.0
    settle_s: float = 1.0            # after /health: lets the gateway's ZMQ subscriptions join
    gateway_args: tuple[str, ...] = ()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The JSON body of a 200 answer ({} if not JSON); None while not ready."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status != 200:
                return None
            body = resp.read()
    except (urllib.error.URLError, OSError):
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def all_workers_up(body: dict[str, Any]) -> bool:
    # The gateway's /health lists {worker_id: up}; it turns 200 with one worker up,
    # but a fair run starts only once it sees every worker.
    workers = body.get("workers")
    return not isinstance(workers, dict) or all(workers.values())


class Child:
    """One started process; output goes to ``log_path``."""

    def __init__(self, name: str, args: list[str], log_path: Path):
        self.name, self.args, self.log_path = name, args, log_path
        self._log: IO[bytes] = open(log_path, "wb")
        # Own session: a terminal Ctrl-C reaches only the bench, which then stops us in order.
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._log.close()


def wait_ready(child: Child, url: str, timeout_s: float,
               ready: Callable[[dict[str, Any]], bool] = lambda body: True) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise StackError(f"{child.name} exited ({child.popen.returncode}) before {url} answered:\n{child.tail()}")
        body = health(url)
        if body is not None and ready(body):
            return
        time.sleep(0.2)
    raise StackError(f"{child.name}: {url} not ready after {timeout_s}s:\n{child.tail()}")


class Stack:
    """Workers + gateway for one routing mode. Use as a context manager: stop() always runs."""

    def __init__(self, config: StackConfig, mode: str, log_dir: Path):
        self.config, self.mode, self.log_dir = config, mode, log_dir
        self.children: list[Child] = []
        self.worker_urls: dict[str, str] = {}
        self.gateway_url = ""

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, module: str, *args: str) -> Child:
        child = Child(name, [sys.executable, "-m", module, *args], self.log_dir / f"{name}.log")
        self.children.append(child)
        return child

    def start(self) -> None:
        c = self.config
        self.log_dir.mkdir(parents=True, exist_ok=True)
        entries = []
        workers = []
        for i in range(c.workers):
            wid, port, ev, replay = f"w{i}", free_port(), free_port(), free_port()
            child = self._spawn(
                wid, "worker.sim", "--host", "127.0.0.1", "--port", str(port), "--model-dir", c.model,
                "--block-size", str(c.block_size), "--num-gpu-blocks", str(c.num_gpu_blocks),
                "--max-num-seqs", str(c.max_num_seqs), "--max-num-batched-tokens", str(c.max_num_batched_tokens),
                "--max-model-len", str(c.max_model_len), "--speedup-ratio", str(c.speedup_ratio),
                "--kv-events-endpoint", f"tcp://127.0.0.1:{ev}", "--kv-events-replay-endpoint",
                f"tcp://127.0.0.1:{replay}", "--event-encoding", c.event_encoding, "--seed", str(c.seed + i),
                "--cpu-blocks", str(c.cpu_blocks), "--disk-blocks", str(c.disk_blocks))
            url = f"http://127.0.0.1:{port}"
            self.worker_urls[wid] = url
            workers.append((child, url))
            entries.append({"id": wid, "url": url, "kv_events_endpoint": f"tcp://127.0.0.1:{ev}",
                            "kv_events_replay_endpoint": f"tcp://127.0.0.1:{replay}"})
        port = free_port()
        config_path = self.log_dir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump({
            "host": "127.0.0.1", "port": port, "model": c.model, "router_mode": self.mode,
            "block_size": c.block_size, "workers": entries}, sort_keys=False))
        gateway = self._spawn("gateway", "gateway", "--config", str(config_path), *c.gateway_args)
        self.gateway_url = f"http://127.0.0.1:{port}"
        # Everything starts at once (imports dominate start-up on a small machine); then wait for all.
        for child, url in workers:
            wait_ready(child, url + "/health", c.startup_timeout_s)
        wait_ready(gateway, self.gateway_url + "/health", c.startup_timeout_s, all_workers_up)
        time.sleep(c.settle_s)

    def stop(self) -> None:
        # Gateway first (it holds connections to the workers), then the workers.
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def pids(self) -> list[int]:
        return [c.pid for c in self.children]
