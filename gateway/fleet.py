"""The gateway's live view of its workers: event feeds, health and engine load.

``Fleet`` listens to the ``WorkerRegistry`` (filled by the static list or by etcd
discovery). For each worker that appears it starts a ``ZmqEventSource`` (when the
worker publishes KV events; it catches up every ``events_catch_up_interval`` on what
its SUB socket missed) feeding the shared ``KvIndexer``, and a probe task that
polls ``/health`` and scrapes ``/metrics`` (``vllm:num_requests_running`` /
``_waiting`` / ``vllm:kv_cache_usage_perc``) into the ``LoadTracker`` (through
``router.engine_load.EngineLoadFeed``, like the bus's load messages). A worker whose
sidecar relays its events and load over NATS (``metadata.events == "nats"``) gets
neither a ZMQ source nor a scrape when the gateway has a ``GatewayBus``: the bus feeds
both. Such a worker's blocks are not trusted (``KvIndexer.set_trusted``) from the
moment it joins until its sidecar restates its cache; from then on the bus's event
source keeps that state (stale: out of sync or silent). ZMQ-fed workers stay trusted
(their sources recover by replay). Without a bus a NATS-relaying worker falls back to
its ZMQ endpoints. A worker that leaves has its source and probe stopped
(the router itself drops its index and load state). Failed forwards mark a worker down
at once; its next successful health poll brings it back.

Never routes and never touches a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from kvgate.gateway.config import GatewayConfig
from kvgate.gateway.replicas import GatewayBus
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.indexer.zmq_source import ReplayDispatcher, ZmqEventSource, ZmqSourceConfig
from kvgate.protocol.engine_metrics import EngineMetricsError, parse_engine_load
from kvgate.protocol.events import WorkerKey
from kvgate.protocol.worker_record import WorkerInfo
from kvgate.router.engine_load import EngineLoadFeed
from kvgate.router.load import LoadTracker
from kvgate.router.registry import RegistryChange, WorkerRegistry

log = logging.getLogger(__name__)


class Fleet:
    def __init__(
        self,
        config: GatewayConfig,
        registry: WorkerRegistry,
        indexer: KvIndexer,
        load: LoadTracker,
        replay: ReplayDispatcher,
        bus: GatewayBus | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.indexer = indexer
        self.engine_load = EngineLoadFeed(load, registry)
        self.replay = replay
        self.bus = bus
        self.sources: dict[str, ZmqEventSource] = {}
        # Workers whose events and load arrive over the bus.
        self.nats_fed: set[str] = set()
        self.up: dict[str, bool] = {}
        # Keys the router must not pick right now; rebuilt on every health change only.
        self.down_keys: frozenset[WorkerKey] = frozenset()
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.probe_timeout),
            connector=aiohttp.TCPConnector(limit=0),
        )
        self._unsubscribe = self.registry.subscribe(self._on_change)
        for info in self.registry.all():
            self._added(info)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        for worker_id in list(self._probes):
            self._probes.pop(worker_id).cancel()
        await asyncio.gather(*(s.stop() for s in self.sources.values()), *self._stopping, return_exceptions=True)
        self.sources.clear()
        if self._session is not None:
            await self._session.close()

    def any_up(self) -> bool:
        return any(self.up.values())

    def is_stale(self, worker_id: str) -> bool:
        """True while a NATS-fed worker's event stream cannot be trusted (ZMQ sources recover by replay)."""
        return worker_id in self.nats_fed and not self.indexer.trusted(worker_id)

    def events_of(self, worker_id: str) -> str:
        """How the worker's KV events arrive: ``nats``, ``nats-stale``, ``zmq`` or ``none``."""
        if worker_id in self.nats_fed:
            return "nats-stale" if self.is_stale(worker_id) else "nats"
        return "zmq" if worker_id in self.sources else "none"

    def mark_down(self, worker_id: str, reason: str) -> None:
        """A forward could not reach the worker: stop routing to it until /health answers."""
        if self.up.get(worker_id):
            log.warning("worker %s marked down: %s", worker_id, reason)
            self._set_up(worker_id, False)

    # -- registry changes -----------------------------------------------------------------

    def _on_change(self, change: RegistryChange) -> None:
        if change.kind == "added":
            self._added(change.worker)
        else:
            self._removed(change.worker.worker_id)

    def _added(self, info: WorkerInfo) -> None:
        self.up.setdefault(info.worker_id, False)
        self._rebuild_down()
        if self.bus is not None and info.metadata.get("events") == "nats":
            self.nats_fed.add(info.worker_id)
            # Nothing of its cache is known yet: untrusted until its sidecar restates it.
            self.indexer.set_trusted(info.worker_id, False)
            self.bus.worker_added(info.worker_id)
        elif info.kv_events_endpoint is not None:
            self.start_events(info)
        self._probes[info.worker_id] = asyncio.get_running_loop().create_task(self._probe(info))

    def start_events(self, info: WorkerInfo) -> None:
        source = ZmqEventSource(
            info.worker_id,
            info.kv_events_endpoint,
            info.kv_events_replay_endpoint,
            self.indexer,
            dp_size=info.dp_size,
            config=ZmqSourceConfig(catch_up_interval=self.config.events_catch_up_interval),
        )
        self.sources[info.worker_id] = source
        self.replay.add(source)
        source.start()

    def _removed(self, worker_id: str) -> None:
        if worker_id in self.nats_fed:
            self.nats_fed.discard(worker_id)
            assert self.bus is not None
            self.bus.worker_removed(worker_id)
        probe = self._probes.pop(worker_id, None)
        if probe is not None:
            probe.cancel()
        source = self.sources.pop(worker_id, None)
        if source is not None:
            self.replay.discard(worker_id)
            task = asyncio.get_running_loop().create_task(source.stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        self.up.pop(worker_id, None)
        self._rebuild_down()

    # -- health and load ------------------------------------------------------------------

    async def _probe(self, info: WorkerInfo) -> None:
        next_health = next_load = 0.0
        while True:
            now = time.monotonic()
            if now >= next_health:
                next_health = now + self.config.health_interval
                self._set_up(info.worker_id, await self._healthy(info))
            if info.worker_id in self.nats_fed:
                next_load = next_health  # its sidecar publishes the load
            elif now >= next_load and self.up.get(info.worker_id):
                next_load = now + self.config.load_interval
                await self._scrape_load(info)
            await asyncio.sleep(max(0.0, min(next_health, next_load) - time.monotonic()))

    async def _healthy(self, info: WorkerInfo) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(info.base_url + "/health") as response:
                await response.read()
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def _scrape_load(self, info: WorkerInfo) -> None:
        assert self._session is not None
        try:
            async with self._session.get(info.base_url + "/metrics") as response:
                if response.status != 200:
                    return
                text = await response.text()
        except (TimeoutError, aiohttp.ClientError, UnicodeDecodeError):
            return
        try:
            per_rank = parse_engine_load(text, info.dp_size)
        except EngineMetricsError as err:
            log.debug("unusable /metrics from %s: %s", info.worker_id, err)
            return
        for rank, (running, waiting, kv_usage) in per_rank.items():
            self.engine_load.report(WorkerKey(info.worker_id, rank), running, waiting, kv_usage)

    def _set_up(self, worker_id: str, ok: bool) -> None:
        if worker_id not in self.up or self.up[worker_id] == ok:
            return
        self.up[worker_id] = ok
        log.info("worker %s is %s", worker_id, "up" if ok else "down")
        self._rebuild_down()

    def _rebuild_down(self) -> None:
        self.down_keys = frozenset(
            key for info in self.registry.all() if not self.up.get(info.worker_id) for key in info.keys
        )
