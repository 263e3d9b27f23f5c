"""The sidecar process: the asyncio edges around ``EventRelay`` (``Sidecar``).

Tasks, all independent so one failing dependency never stalls the others:

* **events**: ``ZmqEventSource`` (engine PUB + replay sockets) -> ``EventRelay`` ->
  a bounded queue -> NATS ``events.<worker_id>``. A session starts with a ``reset``
  snapshot; every NATS reconnect and every (coalesced) ``resync.<worker_id>`` request
  publishes another; an idle stream heartbeats.
  ``ZmqEventSource`` also catches up every ``catch_up_interval``: it asks the replay
  socket for batches the SUB socket missed (PUB/SUB drops what the engine publishes
  before it connects), which an idle engine would otherwise never reveal.
* **health**: probes the engine's ``/health``; ``unhealthy_after`` failures in a row
  revoke the etcd registration (the worker stops receiving traffic) and clear the
  announced cache (``EventRelay.engine_lost``); one success registers it again.
* **load**: scrapes the engine's ``/metrics`` and publishes ``load.<worker_id>`` per rank.
* **registration**: ``EtcdRegistration`` keeps the worker key under its lease.

NATS and etcd are reached with the configured credentials; with a bus secret every
message is signed and only signed ``resync`` requests are obeyed.
* **http**: the sidecar's own ``GET /health`` (200 while the engine is healthy, JSON
  status either way) and ``GET /metrics`` (Prometheus, ``kvgate_sidecar_*``).

``stop()`` deregisters first (traffic stops), then flushes NATS.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from kvgate.bus import Bus, connect_nats
from kvgate.indexer.zmq_source import ReplayDispatcher, ZmqEventSource, ZmqSourceConfig
from kvgate.protocol.engine_metrics import EngineMetricsError, parse_engine_load
from kvgate.protocol.events import Tier
from kvgate.protocol.messages import EventsMessage, LoadMessage, ResyncRequest
from kvgate.stats import Field, counter, counters, gauge
from kvgate.tasks import cancel_and_wait
from kvgate.worker.sidecar.config import SidecarConfig
from kvgate.worker.sidecar.registration import EtcdRegistration
from kvgate.worker.sidecar.relay import EventRelay

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(slots=True)
class SidecarStats:
    health_probes: int = 0
    health_failures: int = 0
    load_scrapes: int = 0
    load_errors: int = 0
    load_published: int = 0
    published: int = 0
    publish_errors: int = 0
    dropped: int = 0
    nats_reconnects: int = 0
    resync_requests: int = 0


class Sidecar:
    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.stats = SidecarStats()
        self.info = config.worker_info()
        replay = ReplayDispatcher()
        self.relay = EventRelay(
            config.worker_id, self._enqueue, block_size=config.block_size, dp_size=config.dp_size, replay=replay
        )
        self.source: ZmqEventSource | None = None
        if config.kv_events_endpoint:
            self.source = ZmqEventSource(
                config.worker_id,
                config.kv_events_endpoint,
                config.kv_events_replay_endpoint,
                self.relay,
                config.kv_events_topic.encode(),
                dp_size=config.dp_size,
                config=ZmqSourceConfig(catch_up_interval=config.catch_up_interval),
            )
            replay.add(self.source)
        self.registration = None
        if config.etcd_endpoints:
            self.registration = EtcdRegistration(
                config.etcd_endpoints,
                config.namespace,
                self.info,
                ttl=config.lease_ttl,
                wanted=False,
                credentials=config.etcd_credentials,
            )
        self.engine_healthy = False
        self.nc = None
        self.bus: Bus | None = None
        self.port: int | None = None
        self._queue: asyncio.Queue[EventsMessage] = asyncio.Queue(maxsize=config.max_queued_messages)
        self._failures = 0
        self._tasks: list[asyncio.Task] = []
        self._snapshot_task: asyncio.Task | None = None
        self._last_snapshot = -float("inf")
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._metrics = CollectorRegistry()
        self._metrics.register(_SidecarCollector(self))

    @property
    def nats_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def registered(self) -> bool:
        return self.registration is not None and self.registration.registered

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=cfg.engine_timeout))
        app = web.Application()
        app.router.add_get("/health", self._health_handler)
        app.router.add_get("/metrics", self._metrics_handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # Bound here so that port 0 (tests) yields the real port before anyone asks for it.
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.health_host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.health_host, cfg.health_port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        if self.source is not None:
            self.source.start()
        if self.registration is not None:
            await self.registration.start()
        self._spawn(self._health_loop(), "health")
        if cfg.nats_url:
            self._spawn(self._nats_loop(), "nats")
            self._spawn(self._load_loop(), "load")
            self._spawn(self._heartbeat_loop(), "heartbeat")
        log.info("sidecar %s up: engine %s, health on %s:%d", cfg.worker_id, cfg.engine_url, cfg.health_host, self.port)

    async def stop(self) -> None:
        if self.registration is not None:
            await self.registration.stop(deregister=True)
        await cancel_and_wait(*self._tasks, self._snapshot_task)
        if self.source is not None:
            await self.source.stop()
        if self.nc is not None:
            try:
                await asyncio.wait_for(self.nc.close(), 2)
            except Exception as exc:  # shutting down anyway
                log.debug("nats close: %s", exc)
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _spawn(self, coro, name: str) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=f"sidecar-{name}"))

    # --- events ------------------------------------------------------------------------

    def _enqueue(self, msg: EventsMessage) -> None:
        try:
            self._queue.put_nowait(msg)
        except asyncio.QueueFull:
            # Consumers see the seq gap and the snapshot after the reconnect restates it all.
            self.stats.dropped += 1

    async def _nats_loop(self) -> None:
        cfg = self.config
        self.nc = await connect_nats(
            cfg.nats_url,
            name=f"kvgate-sidecar-{cfg.worker_id}",
            credentials=cfg.nats_credentials,
            on_reconnected=self._on_reconnected,
        )
        self.bus = Bus(self.nc, cfg.namespace, secret=cfg.bus_secret)
        await self.bus.on_resync(cfg.worker_id, self._on_resync)
        self._snapshot_now()
        while True:
            msg = await self._queue.get()
            try:
                await self.bus.publish_events(msg)
                self.stats.published += 1
            except Exception as exc:  # buffer full while disconnected: the reconnect snapshot covers it
                self.stats.publish_errors += 1
                log.debug("event message %d not published: %s", msg.seq, exc)

    async def _on_reconnected(self) -> None:
        self.stats.nats_reconnects += 1
        self._snapshot_now()

    def _on_resync(self, request: ResyncRequest) -> None:
        self.stats.resync_requests += 1
        if self._snapshot_task is not None and not self._snapshot_task.done():
            return
        delay = self._last_snapshot + self.config.resync_min_interval - time.monotonic()
        self._snapshot_task = asyncio.get_running_loop().create_task(self._snapshot_after(delay))

    async def _snapshot_after(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        self._snapshot_now()

    def _snapshot_now(self) -> None:
        self._last_snapshot = time.monotonic()
        self.relay.snapshot()

    async def _heartbeat_loop(self) -> None:
        seen = self.relay.last_seq
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            if self.nats_connected and self.relay.last_seq == seen:
                self.relay.heartbeat()
            seen = self.relay.last_seq

    # --- engine health and load ----------------------------------------------------------

    async def _health_loop(self) -> None:
        cfg = self.config
        while True:
            ok = await self._probe()
            self.stats.health_probes += 1
            if ok:
                self._failures = 0
                if not self.engine_healthy:
                    log.info("engine %s is healthy: registering", cfg.engine_url)
                self.engine_healthy = True
            else:
                self.stats.health_failures += 1
                self._failures += 1
                if self.engine_healthy and self._failures >= cfg.unhealthy_after:
                    log.warning("engine %s failed %d health probes: deregistering", cfg.engine_url, self._failures)
                    self.engine_healthy = False
                    self.relay.engine_lost()
                    if self.source is not None:
                        # The relay's seq tracking started over: a restarted engine's first
                        # batches, lost before the SUB socket reconnects, are asked from seq 0.
                        self.source.engine_lost()
            if self.registration is not None:
                self.registration.set_wanted(self.engine_healthy)
            await asyncio.sleep(cfg.health_interval)

    async def _probe(self) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(f"{self.config.engine_url.rstrip('/')}/health") as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def _load_loop(self) -> None:
        cfg = self.config
        url = f"{cfg.engine_url.rstrip('/')}/metrics"
        assert self._session is not None
        while True:
            await asyncio.sleep(cfg.load_interval)
            if not (self.engine_healthy and self.nats_connected and self.bus is not None):
                continue
            self.stats.load_scrapes += 1
            try:
                async with self._session.get(url) as resp:
                    text = await resp.text()
                    if resp.status != 200:
                        raise EngineMetricsError(f"HTTP {resp.status}")
                loads = parse_engine_load(text, cfg.dp_size)
            except (TimeoutError, aiohttp.ClientError, EngineMetricsError, UnicodeDecodeError) as exc:
                self.stats.load_errors += 1
                log.debug("load scrape of %s failed: %s", url, exc)
                continue
            now = time.time()
            for rank, load in loads.items():
                msg = LoadMessage(
                    worker_id=cfg.worker_id,
                    dp_rank=rank,
                    running=load.running,
                    waiting=load.waiting,
                    kv_usage=load.kv_usage,
                    ts=now,
                    capacity_tokens=load.capacity_tokens,
                )
                try:
                    await self.bus.publish_load(msg)
                    self.stats.load_published += 1
                except Exception as exc:  # disconnected: load is only worth sending fresh
                    log.debug("load not published: %s", exc)

    # --- own endpoints -------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "worker_id": self.config.worker_id,
            "engine_healthy": self.engine_healthy,
            "registered": self.registered,
            "nats_connected": self.nats_connected,
            "epoch": self.relay.epoch,
            "last_seq": self.relay.last_seq,
            "blocks": self.relay.block_counts(),
            "queued": self._queue.qsize(),
        }

    async def _health_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.status(), status=200 if self.engine_healthy else 503)

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._metrics), headers={"Content-Type": CONTENT_TYPE})


# What the relay counts, as the sidecar names it (the relay's words are the engine stream's).
_RELAY_COUNTERS = (
    Field("batches", "engine event batches applied (in order)", "engine_batches"),
    Field("router_events", "router events published"),
    Field("messages", "event messages produced", "event_messages"),
    Field("snapshots", "full restatements published"),
    Field("restarts", "engine restarts detected (seq fell back)", "engine_restarts"),
    Field("engine_losses", "times the engine stopped answering /health"),
    Field("gaps", "engine seq gaps"),
    Field("replays_requested", "replays asked of the engine"),
    Field("replays_failed", "replays that did not cover their gap"),
    Field("unknown_parent", "blocks dropped for an unknown parent", "unknown_parent_blocks"),
    Field("unknown_block", "removals or tier updates of unknown blocks", "unknown_blocks"),
    Field("rejected", "engine messages or events rejected"),
)
_SIDECAR_COUNTERS = (
    Field("published", "event messages published to NATS"),
    Field("publish_errors", "event messages NATS refused"),
    Field("dropped", "event messages dropped on a full queue"),
    Field("nats_reconnects", "NATS reconnections"),
    Field("resync_requests", "resync requests received"),
    Field("health_probes", "engine health probes"),
    Field("health_failures", "failed engine health probes"),
    Field("load_scrapes", "engine /metrics scrapes"),
    Field("load_errors", "failed engine /metrics scrapes"),
)
_PREFIX = "kvgate_sidecar_"


class _SidecarCollector(Collector):
    """Reads the sidecar's counters at scrape time."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    def collect(self) -> Iterable[Metric]:
        s = self.sidecar
        for name, value, doc in (
            ("engine_healthy", s.engine_healthy, "1 while the engine answers /health"),
            ("registered", s.registered, "1 while the worker's etcd key is held under a live lease"),
            ("nats_connected", s.nats_connected, "1 while connected to NATS"),
            ("queued_messages", s._queue.qsize(), "event messages waiting to be published"),
        ):
            yield gauge(_PREFIX + name, doc, value)
        yield from counters(_PREFIX, s.relay.stats, _RELAY_COUNTERS)
        yield from counters(_PREFIX, s.stats, _SIDECAR_COUNTERS)
        yield counter(
            _PREFIX + "caught_up",
            "engine batches the SUB socket missed, fetched by the catch-up",
            s.source.stats.caught_up if s.source is not None else 0,
        )
        blocks = {
            (str(rank), tier.name): counts[tier] for rank, counts in enumerate(s.relay.block_counts()) for tier in Tier
        }
        yield gauge(_PREFIX + "blocks", "blocks announced, per rank and tier", blocks, label=("rank", "tier"))
