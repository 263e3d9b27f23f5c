"""The sidecar end to end, all real processes: worker.sim -> sidecar -> etcd + NATS -> a consumer.

The consumer is wired the way a gateway in ``--discovery etcd`` mode wires it:
``EtcdDiscovery`` fills a ``WorkerRegistry``; a ``NatsEventSource`` feeds a ``KvIndexer``
and only accepts workers the registry knows; a worker joining the registry is not
trusted until its sidecar restates its cache, and one leaving it loses its index state.
Recovery times are printed (figures, never asserted).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aetcd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvgate.bus import Bus, connect_nats
from kvgate.dev.launch import free_port
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.indexer.nats_source import NatsEventSource
from kvgate.protocol.events import WorkerKey
from kvgate.protocol.hashing import sequence_hashes
from kvgate.protocol.messages import LoadMessage
from kvgate.protocol.worker_record import worker_key
from kvgate.router.discovery import EtcdDiscovery
from kvgate.router.registry import RegistryChange, WorkerRegistry
from tests.helpers import TINY_MODEL, Proc, python_module, until, wait_http
from tests.servers import EtcdServer, NatsServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NS = "t"
WORKER = "w1"
KEY = WorkerKey(WORKER)


@dataclass
class Engine:
    """A worker.sim process that can be killed and started again on the same ports."""

    workdir: Path
    port: int = field(default_factory=free_port)
    events_port: int = field(default_factory=free_port)
    replay_port: int = field(default_factory=free_port)
    proc: Proc | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def events(self) -> str:
        """Where the sidecar connects (the engine binds ``tcp://*:port``, as vLLM does)."""
        return f"tcp://127.0.0.1:{self.events_port}"

    @property
    def replay(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    def start(self) -> None:
        self.starts += 1
        self.proc = python_module(
            "kvgate.worker.sim",
            "--port",
            self.port,
            "--model-dir",
            TINY_MODEL,
            "--kv-events-endpoint",
            f"tcp://*:{self.events_port}",
            "--kv-events-replay-endpoint",
            f"tcp://*:{self.replay_port}",
            "--speedup-ratio",
            100,
            "--num-gpu-blocks",
            256,
            log_path=self.workdir / f"sim.{self.starts}.log",
        )
        wait_http(f"{self.url}/health", proc=self.proc)

    def complete(self, tokens: list[int]) -> None:
        body = json.dumps({"model": "kvgate-tiny", "prompt": tokens, "max_tokens": 1}).encode()
        req = urllib.request.Request(f"{self.url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.stop()


def start_sidecar(
    workdir: Path, engine: Engine, etcd: EtcdServer, nats: NatsServer, lease_ttl: int = 2
) -> tuple[Proc, int]:
    port = free_port()
    proc = python_module(
        "kvgate.worker.sidecar",
        "--engine-url",
        engine.url,
        "--worker-id",
        WORKER,
        "--model",
        "kvgate-tiny",
        "--kv-events-endpoint",
        engine.events,
        "--kv-events-replay-endpoint",
        engine.replay,
        "--etcd-endpoints",
        etcd.endpoint,
        "--nats-url",
        nats.url,
        "--namespace",
        NS,
        "--health-port",
        port,
        "--lease-ttl",
        lease_ttl,
        "--health-interval",
        0.25,
        "--load-interval",
        0.25,
        "--heartbeat-interval",
        0.5,
        "--catch-up-interval",
        0.25,
        log_path=workdir / "sidecar.log",
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    return proc, port


def sidecar_status(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def sidecar_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


class Consumer:
    """What a gateway replica holds in etcd + NATS mode."""

    def __init__(self, etcd: EtcdServer) -> None:
        self.registry = WorkerRegistry()
        self.indexer = KvIndexer(block_size=64)
        self.discovery = EtcdDiscovery(etcd.endpoint, NS, self.registry)
        self.loads: list[LoadMessage] = []
        self.source: NatsEventSource | None = None
        self.nc = None
        self.registry.subscribe(self._on_change)

    def _on_change(self, change: RegistryChange) -> None:
        if change.kind == "added":
            self.indexer.set_trusted(change.worker.worker_id, False)
        else:
            self.indexer.remove_worker(change.worker.worker_id)
            if self.source is not None:
                self.source.forget(change.worker.worker_id)

    async def start(self, nats: NatsServer) -> None:
        await self.discovery.start()

        async def reconnected() -> None:
            if self.source is not None:
                await self.source.resync_all()

        self.nc = await connect_nats(nats.url, name="test-gateway", on_reconnected=reconnected)
        bus = Bus(self.nc, NS)
        self.source = NatsEventSource(
            bus, self.indexer, accept=self.registry.__contains__, resync_interval=0.2, stale_after=2.0
        )
        await self.source.start()
        await bus.on_load(self.loads.append)

    async def stop(self) -> None:
        await self.discovery.stop()
        if self.source is not None:
            await self.source.stop()
        if self.nc is not None:
            await self.nc.close()

    def in_sync(self) -> bool:
        return WORKER in self.registry and self.indexer.trusted(WORKER)

    def depth(self, tokens: list[int]) -> int:
        match = self.indexer.find_matches(sequence_hashes(tokens, 64)).get(KEY)
        return 0 if match is None else match.depth


@pytest.fixture
async def consumer(etcd_server: EtcdServer, nats_server: NatsServer) -> AsyncIterator[Consumer]:
    c = Consumer(etcd_server)
    await c.start(nats_server)
    try:
        yield c
    finally:
        await c.stop()


def prompt(seed: int, blocks: int = 4) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 1000) for _ in range(64 * blocks)]


async def test_sidecar_relays_events_and_load_and_follows_its_engine(
    tmp_path: Path, etcd_server: EtcdServer, nats_server: NatsServer, consumer: Consumer
):
    engine = Engine(tmp_path)
    await asyncio.to_thread(engine.start)
    sidecar, port = await asyncio.to_thread(start_sidecar, tmp_path, engine, etcd_server, nats_server)
    try:
        await until(lambda: WORKER in consumer.registry, what="worker registered")
        info = consumer.registry.get(WORKER)
        assert info.base_url == engine.url and info.kv_events_endpoint == engine.events and info.model == "kvgate-tiny"

        a = prompt(1)
        await asyncio.to_thread(engine.complete, a)
        await until(lambda: consumer.depth(a) == 4, what="prompt A's blocks in the consumer's index")
        await until(lambda: consumer.in_sync(), what="stream in sync")
        await until(lambda: any(m.worker_id == WORKER for m in consumer.loads), what="load published")
        last = consumer.loads[-1]
        assert (last.dp_rank, last.running, last.waiting) == (0, 0, 0)  # idle engine, as its /metrics says

        # The engine dies: the worker leaves discovery (no traffic), the sidecar says so.
        killed = time.monotonic()
        await asyncio.to_thread(engine.kill)
        took = await until(lambda: WORKER not in consumer.registry, what="deregistered after engine loss")
        print(f"engine SIGKILL -> worker out of discovery in {took:.2f}s (probe 0.25 s x 2)")
        assert consumer.depth(a) == 0
        status, body = sidecar_status(port)
        assert status == 503 and not body["engine_healthy"] and not body["registered"]
        assert sidecar.alive()

        # A fresh engine on the same ports: registered again; its cache starts empty.
        await asyncio.to_thread(engine.start)
        took = await until(lambda: WORKER in consumer.registry, what="registered again")
        print(f"engine back -> registered {took:.2f}s after it answered ({time.monotonic() - killed:.2f}s outage)")
        b = prompt(2)
        await asyncio.to_thread(engine.complete, b)
        # The sidecar's SUB socket reconnects on its own schedule, so B's batch may have been
        # published to nobody, and the engine stays idle: the catch-up (from seq 0, the
        # engine was lost) fetches it from the replay socket.
        await until(lambda: consumer.depth(b) == 4 and consumer.in_sync(), what="prompt B indexed")
        print(
            f"after the engine restart: {sidecar_metrics(port)['kvgate_sidecar_caught_up_total']:.0f} "
            "batch(es) caught up from the replay socket"
        )
        assert consumer.depth(a) == 0  # nothing of the dead engine's cache came back
        assert sidecar_status(port)[1]["blocks"][0][0] >= 4

        # The sidecar itself is SIGKILLed: no deregistration, the lease (2 s) runs out.
        sidecar.kill(signal.SIGKILL)
        took = await until(lambda: WORKER not in consumer.registry, what="lease expiry after sidecar SIGKILL")
        print(f"sidecar SIGKILL -> worker out of discovery in {took:.2f}s (lease ttl 2 s)")
    finally:
        sidecar.stop()
        engine.kill()


async def test_nats_restart_resumes_events_and_the_index_converges(
    tmp_path: Path, etcd_server: EtcdServer, nats_server: NatsServer, consumer: Consumer
):
    engine = Engine(tmp_path)
    await asyncio.to_thread(engine.start)
    # A long lease: the clean shutdown at the end must remove the key itself.
    sidecar, port = await asyncio.to_thread(start_sidecar, tmp_path, engine, etcd_server, nats_server, 10)
    try:
        a = prompt(1)
        await asyncio.to_thread(engine.complete, a)
        await until(lambda: consumer.depth(a) == 4, what="prompt A indexed")

        await asyncio.to_thread(nats_server.kill)
        b = prompt(2)  # cached by the engine while its events cannot reach anyone
        await asyncio.to_thread(engine.complete, b)
        await until(lambda: sidecar_status(port)[1]["blocks"] == [[8, 0, 0]], what="sidecar saw prompt B")
        assert consumer.depth(b) == 0
        restarted = time.monotonic()
        await asyncio.to_thread(nats_server.start)
        took = await until(
            lambda: consumer.depth(b) == 4 and consumer.in_sync(),
            timeout=20,
            what="index converged after the NATS restart",
        )
        print(
            f"NATS restart -> consumer index converged {took:.2f}s after nats-server answered "
            f"({time.monotonic() - restarted:.2f}s incl. its start)"
        )
        assert consumer.depth(a) == 4
        assert consumer.indexer.block_counts()[KEY] == (8, 0, 0)
        # Whichever got there first (the sidecar's buffered messages, its post-reconnect snapshot
        # or a resync the consumer asked for), the sidecar did restate itself after reconnecting.
        metrics = sidecar_metrics(port)
        assert metrics["kvgate_sidecar_nats_reconnects_total"] >= 1
        assert metrics["kvgate_sidecar_snapshots_total"] >= 1 + metrics["kvgate_sidecar_nats_reconnects_total"]
        c = prompt(3)
        await asyncio.to_thread(engine.complete, c)
        await until(lambda: consumer.depth(c) == 4, what="live events flow again")
        assert sidecar_status(port)[0] == 200

        await asyncio.to_thread(sidecar.stop)  # SIGTERM: deregisters before exiting
        assert sidecar.popen.returncode == 0
        async with aetcd.Client("127.0.0.1", etcd_server.client_port) as client:
            assert await client.get(worker_key(NS, WORKER).encode()) is None
        await until(lambda: WORKER not in consumer.registry, what="clean shutdown seen by discovery")
    finally:
        sidecar.stop()
        engine.kill()
