"""The sidecar in front of a real vLLM 0.32 engine: it registers in etcd, relays over NATS, restates on resync.

All real: the engine (``vllm_engines``), etcd and nats-server (``tests/servers.py``), the
sidecar and two gateways on ``--discovery etcd``, as processes. The second gateway joins
after the engine cached a prompt, so only the sidecar's restatement (``resync``) can
tell it what the engine holds.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kvgate.dev.launch import Service, free_port
from tests.servers import EtcdServer, NatsServer
from tests.test_vllm_interop import Gateway, settled_overlap, text, wait_for
from tests.vllm_engines import BLOCK_SIZE, MODEL_NAME, VLLM_MODEL, Engine

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.integration]

NAMESPACE = "vllm"
WORKER = "v0-sidecar"


def start(name: str, args: list[str], log_dir: Path, health: str) -> Service:
    service = Service(name, [sys.executable, "-m", *args], log_dir, health_url=health)
    service.start()
    service.wait_healthy(60)
    return service


def start_sidecar(engine: Engine, etcd: EtcdServer, nats: NatsServer, log_dir: Path) -> Service:
    port = free_port()
    return start(
        "sidecar",
        [
            "kvgate.worker.sidecar",
            "--engine-url",
            engine.url,
            "--worker-id",
            WORKER,
            "--model",
            MODEL_NAME,
            "--kv-events-endpoint",
            engine.events,
            "--kv-events-replay-endpoint",
            engine.replay,
            "--kv-events-topic",
            "kv-events",
            "--etcd-endpoints",
            etcd.endpoint,
            "--nats-url",
            nats.url,
            "--namespace",
            NAMESPACE,
            "--health-host",
            "127.0.0.1",
            "--health-port",
            str(port),
            "--lease-ttl",
            "3",
            "--health-interval",
            "0.5",
            "--catch-up-interval",
            "0.5",
        ],
        log_dir,
        f"http://127.0.0.1:{port}/health",
    )


def start_distributed_gateway(etcd: EtcdServer, nats: NatsServer, log_dir: Path, name: str) -> Gateway:
    port = free_port()
    service = start(
        name,
        [
            "kvgate.gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            str(VLLM_MODEL),
            "--served-model-name",
            MODEL_NAME,
            "--discovery",
            "etcd",
            "--etcd-endpoints",
            etcd.endpoint,
            "--nats-url",
            nats.url,
            "--namespace",
            NAMESPACE,
            "--router-id",
            name,
            "--admin-on-public-port",
        ],
        log_dir,
        f"http://127.0.0.1:{port}/health",
    )
    return Gateway(service, port)


def health(gw: Gateway) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(gw.url + "/health", timeout=5) as response:
            body: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as err:  # 503 while no worker is up: still JSON
        body = json.loads(err.read())
    return body


def test_the_sidecar_registers_relays_and_restates_a_real_engine(
    vllm_engines: list[Engine], etcd_server: EtcdServer, nats_server: NatsServer, tmp_path: Path
) -> None:
    engine = vllm_engines[0]
    sidecar = start_sidecar(engine, etcd_server, nats_server, tmp_path)
    first = second = None
    try:
        first = start_distributed_gateway(etcd_server, nats_server, tmp_path, "gw-a")
        # Registers: the gateway discovers the worker through etcd, its events through NATS.
        wait_for(lambda: health(first).get("workers", {}).get(WORKER) is True, 30, "the worker in etcd")
        wait_for(lambda: health(first).get("events", {}).get(WORKER) == "nats", 30, "its stream in sync")

        # Relays: a request through the gateway; the engine's events reach the index over NATS.
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": text(700, 300)}], "max_tokens": 4}
        answer, headers = first.post("/v1/chat/completions", body)
        assert headers["x-kvgate-worker"] == WORKER
        blocks = answer["usage"]["prompt_tokens"] // BLOCK_SIZE
        assert settled_overlap(first, body, WORKER, at_least=blocks) == blocks

        # Restates: a gateway joining now missed those events; the sidecar's resync tells it.
        second = start_distributed_gateway(etcd_server, nats_server, tmp_path, "gw-b")
        assert settled_overlap(second, body, WORKER, at_least=blocks, timeout=30) == blocks
        # ...and what both predict is what the engine has.
        again, _ = second.post("/v1/chat/completions", body)
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == min(blocks, (again["usage"]["prompt_tokens"] - 1) // BLOCK_SIZE) * BLOCK_SIZE
    finally:
        for gw in (second, first):
            if gw is not None:
                gw.service.stop()
        sidecar.stop()
