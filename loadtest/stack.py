"""The stack under test: N simulated workers and a gateway, as child processes.

Owns which processes a bench run needs and in what order: ``python -m
kvgate.worker.sim`` workers and a ``python -m kvgate.gateway --config`` gateway on free
loopback ports, spoken to over HTTP only, each a ``kvgate.dev.launch.Service`` (own
session, log file in the report directory, stopped by PID, SIGTERM then SIGKILL). A
run starts once the gateway sees every worker up. Against an already-running stack
(``--gateway-url``) nothing is started.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvgate.dev.launch import Service, free_port
from kvgate.loadtest.corpus import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]


def repo_relative(path: str | Path) -> str:
    """``path`` relative to this checkout when inside it (the shipped tokenizer and trace), so a report
    committed here names no machine's directories; any other path as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


class StackError(RuntimeError):
    """A process of the stack did not come up."""


@dataclass(frozen=True)
class StackConfig:
    """Worker and gateway settings for a bench-started stack; every default in one place."""

    workers: int = 2
    model: str = str(DEFAULT_MODEL)
    block_size: int = 64
    # Sized like a real engine (and Dynamo's mocker): 16,384 GPU blocks (1M tokens) and
    # 8,192 tokens per step; worker.sim's own defaults are smaller.
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 32768
    speedup_ratio: float = 1.0
    cpu_blocks: int = 0  # worker CPU tier (0: none); see worker/README.md
    disk_blocks: int = 0  # worker disk tier (0: none)
    event_encoding: str = "map"
    seed: int = 0
    startup_timeout_s: float = 60.0
    settle_s: float = 1.0  # after /health: lets the gateway's ZMQ subscriptions join
    gateway_args: tuple[str, ...] = ()
    # The workers' module: kvgate.worker.sim encodes every prompt whole, as vLLM does;
    # kvgate.dev.cached_sim takes the same flags and encodes through the gateway's prefix cache.
    worker_module: str = "kvgate.worker.sim"


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


class Stack:
    """Workers + gateway for one routing mode. Use as a context manager: stop() always runs."""

    def __init__(self, config: StackConfig, mode: str, log_dir: Path):
        self.config, self.mode, self.log_dir = config, mode, log_dir
        self.children: list[Service] = []
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

    def _spawn(self, name: str, module: str, url: str, *args: str) -> Service:
        child = Service(name, [sys.executable, "-m", module, *args], self.log_dir, f"{url}/health", cwd=REPO)
        self.children.append(child)
        child.start()
        return child

    def start(self) -> None:
        c = self.config
        self.log_dir.mkdir(parents=True, exist_ok=True)
        entries = []
        workers = []
        for i in range(c.workers):
            wid, port, ev, replay = f"w{i}", free_port(), free_port(), free_port()
            url = f"http://127.0.0.1:{port}"
            workers.append(
                self._spawn(
                    wid,
                    c.worker_module,
                    url,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--model-dir",
                    c.model,
                    "--block-size",
                    str(c.block_size),
                    "--num-gpu-blocks",
                    str(c.num_gpu_blocks),
                    "--max-num-seqs",
                    str(c.max_num_seqs),
                    "--max-num-batched-tokens",
                    str(c.max_num_batched_tokens),
                    "--max-model-len",
                    str(c.max_model_len),
                    "--speedup-ratio",
                    str(c.speedup_ratio),
                    # Bound by the engine (vLLM binds only tcp://*:P); the gateway connects below.
                    "--kv-events-endpoint",
                    f"tcp://*:{ev}",
                    "--kv-events-replay-endpoint",
                    f"tcp://*:{replay}",
                    "--event-encoding",
                    c.event_encoding,
                    "--seed",
                    str(c.seed + i),
                    "--cpu-blocks",
                    str(c.cpu_blocks),
                    "--disk-blocks",
                    str(c.disk_blocks),
                )
            )
            self.worker_urls[wid] = url
            entries.append(
                {
                    "id": wid,
                    "url": url,
                    "kv_events_endpoint": f"tcp://127.0.0.1:{ev}",
                    "kv_events_replay_endpoint": f"tcp://127.0.0.1:{replay}",
                }
            )
        port = free_port()
        config_path = self.log_dir / "gateway.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "host": "127.0.0.1",
                    "port": port,
                    # scrape.py reads the gateway's /metrics on the port the load goes to.
                    "admin_on_public_port": True,
                    "model": c.model,
                    "router_mode": self.mode,
                    "block_size": c.block_size,
                    "workers": entries,
                    # The engines' pool size: approximate mode's model of each worker's cache.
                    "kv": {"prediction_capacity_blocks": c.num_gpu_blocks},
                },
                sort_keys=False,
            )
        )
        self.gateway_url = f"http://127.0.0.1:{port}"
        gateway = self._spawn(
            "gateway", "kvgate.gateway", self.gateway_url, "--config", str(config_path), *c.gateway_args
        )
        # Everything starts at once (imports dominate start-up on a small machine); then wait for all.
        try:
            for child in workers:
                child.wait_healthy(c.startup_timeout_s)
            gateway.wait_healthy(c.startup_timeout_s, ready=self._fleet_up)
        except (RuntimeError, TimeoutError) as err:
            raise StackError(str(err)) from None
        time.sleep(c.settle_s)

    def _fleet_up(self) -> bool:
        body = health(self.gateway_url + "/health")
        return body is not None and all_workers_up(body)

    def stop(self) -> None:
        # Gateway first (it holds connections to the workers), then the workers.
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def pids(self) -> list[int]:
        return [pid for c in self.children if (pid := c.pid) is not None]

    def named_pids(self) -> dict[str, int]:
        """PID of each running child by name (``gateway``, ``w0``, ...)."""
        return {c.name: pid for c in self.children if (pid := c.pid) is not None}
