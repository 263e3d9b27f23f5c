"""``python -m kvgate.dev.demo``: simulated workers plus the gateway in front, one command.

Spawns ``--workers`` ``python -m kvgate.worker.sim`` processes on free loopback ports, each
publishing KV events (and serving replays) on its own ZMQ ports, waits for their
``/health``, then serves the gateway (embedded default: static workers, ZMQ events) in
this process, with the production layout (``/debug/route`` and ``/metrics`` on the admin
listener, port + 1, unless ``--admin-on-public-port``). Its children are stopped when it
exits, on SIGINT or SIGTERM.
Flags it does not know are gateway flags (``python -m kvgate.gateway --help``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kvgate.dev.launch import Service, free_port, stop_all
from kvgate.gateway.__main__ import configure_logging, serve, use_uvloop
from kvgate.gateway.config import load_config

log = logging.getLogger("kvgate.dev.demo")


@dataclass(slots=True)
class SimWorker:
    worker_id: str
    port: int
    events_port: int
    replay_port: int
    service: Service

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.service.log_path

    def entry(self) -> dict[str, object]:
        return {
            "id": self.worker_id,
            "url": self.url,
            "kv_events_endpoint": f"tcp://127.0.0.1:{self.events_port}",
            "kv_events_replay_endpoint": f"tcp://127.0.0.1:{self.replay_port}",
        }


def spawn_workers(
    count: int, model_dir: str, block_size: int, max_model_len: int, log_dir: Path, extra: Sequence[str] = ()
) -> list[SimWorker]:
    workers = []
    for i in range(count):
        port, events, replay = free_port(), free_port(), free_port()
        service = Service(
            f"worker-{i}",
            [
                sys.executable,
                "-m",
                "kvgate.worker.sim",
                "--host",
                "127.0.0.1",
                "--port",
                port,
                "--model-dir",
                model_dir,
                "--block-size",
                block_size,
                "--max-model-len",
                max_model_len,
                # The engine side binds, as vLLM does for tcp://*:P; the gateway connects
                # to 127.0.0.1 (``entry``).
                "--kv-events-endpoint",
                f"tcp://*:{events}",
                "--kv-events-replay-endpoint",
                f"tcp://*:{replay}",
                *extra,
            ],
            log_dir,
            f"http://127.0.0.1:{port}/health",
        )
        service.start()
        workers.append(SimWorker(f"w{i}", port, events, replay, service))
    return workers


def wait_healthy(workers: Sequence[SimWorker], timeout: float = 60.0) -> None:
    for worker in workers:
        worker.service.wait_healthy(timeout)


def stop_workers(workers: Sequence[SimWorker]) -> None:
    stop_all(w.service for w in workers)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kvgate.dev.demo",
        description="Start N simulated vLLM workers and the kvgate gateway in front of them. "
        "Any other flag is a gateway flag (see python -m kvgate.gateway --help), "
        "e.g. --host, --port, --router-mode.",
    )
    parser.add_argument("--workers", type=int, default=2, help="simulated workers to start (default: 2)")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=8192,
        help="context length of the workers, and of the gateway's checks (default: 8192)",
    )
    parser.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for every worker.sim, e.g. --worker-arg=--speedup-ratio=10 (repeatable)",
    )
    parser.add_argument("--log-dir", default=None, help="where worker logs go (default: a new temp dir)")
    args, gateway_args = parser.parse_known_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    config = load_config([*gateway_args, "--context-length", str(args.max_model_len)])
    if config.workers:
        parser.error("the demo starts its own workers; do not pass --worker / workers:")
    configure_logging(config.log_level)
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="kvgate-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    # SIGTERM while workers start must still stop them: route it through the finally below.
    signal.signal(signal.SIGTERM, _interrupt)
    workers: list[SimWorker] = []
    try:
        workers = spawn_workers(
            args.workers, config.model, config.block_size, args.max_model_len, log_dir, args.worker_arg
        )
        wait_healthy(workers)
        for worker in workers:
            log.info(
                "worker %s on %s (events %s, logs %s)",
                worker.worker_id,
                worker.url,
                worker.entry()["kv_events_endpoint"],
                worker.log_path,
            )
        config = replace(config, workers=[w.entry() for w in workers])
        use_uvloop()
        admin = (
            "admin endpoints on the same port"
            if config.admin_on_public_port
            else f"/debug/route and /metrics on http://{config.admin_host}:{config.admin_listen_port}"
        )
        print(
            f"kvgate demo: http://{config.host}:{config.port}/v1  "
            f"({len(workers)} simulated workers, router {config.router_mode}, model {config.model_name}; {admin})",
            flush=True,
        )
        serve(config)
    except KeyboardInterrupt:
        pass
    finally:
        stop_workers(workers)


if __name__ == "__main__":
    main()
