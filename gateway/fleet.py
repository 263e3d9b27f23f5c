"""The gateway's live view of its workers: event feeds, health and engine load.

``Fleet`` listens to the ``WorkerRegistry`` (filled by the static list or by etcd
discovery). For each worker that appears it starts a ``ZmqEventSource`` (when the
worker publishes KV events; it catches up every ``events_catch_up_interval`` on what
its SUB socket missed) feeding the shared ``KvIndexer``, and a probe task that
polls ``/health`` (skipped while it completes answers: each one says as much) and
scrapes ``/metrics`` (``vllm:num_requests_running`` /
``_waiting`` / ``vllm:kv_cache_usage_perc`` and the KV pool's size) into the ``LoadTracker`` (through
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

Endpoints: a worker given without ``kv_events_endpoint`` (and not NATS-fed) is asked
``GET /kv_event_sources`` (vLLM's own description, ``protocol.kv_event_sources``), again
every ``health_interval`` while it cannot be reached; ``{}``, a 404 or an unusable
answer leave it load-only (``events_of`` says ``none``). Static endpoints always win.

Engine lost: a worker going from up to down (a failed health poll, or a forward's
connect failure) has its index forgotten at once (``KvIndexer.engine_lost``; its
source's ``engine_lost`` so the next catch-up asks from seq 0): it is not routed again
before its health poll succeeds, by then nothing of the old engine is left to route
on, and a restarted engine's seqs starting over at 0 cannot be mistaken for a gap. If
it was only a blip, the catch-up re-learns the engine's cache from its replay buffer.

Missing events: the fleet hears every request's end (it is a ``RequestListener`` on the
router). A 200 from a ZMQ-fed worker whose prompt had a full block beyond the cached
tokens the worker reported (the index's prediction when it reported none) must have
made its engine publish a store. If no batch from that worker (live, caught up or
replayed) arrives after the request did, ``events_missing_after`` seconds past its end
the worker's events are declared missing: one warning naming the likely cause, the
``kvgate_worker_events_missing`` gauge at 1, ``/health`` saying ``zmq-missing``, and its
blocks untrusted (``KvIndexer.set_trusted``; routed by load only), until a batch
arrives again. NATS-fed workers have their own staleness (``replicas.py``).

Never routes and never touches a request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import orjson
from prometheus_client.core import Metric

from kvgate.gateway.config import GatewayConfig
from kvgate.gateway.metrics import Outcome
from kvgate.gateway.relay import Exchange
from kvgate.gateway.replicas import GatewayBus
from kvgate.gateway.upstream import Upstream, UpstreamFailure
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.indexer.zmq_source import ReplayDispatcher, ZmqEventSource, ZmqSourceConfig, rank_endpoint
from kvgate.protocol.engine_metrics import EngineMetricsError, parse_engine_load
from kvgate.protocol.events import WorkerKey
from kvgate.protocol.kv_event_sources import EventSources, KvEventSourcesError, parse_kv_event_sources
from kvgate.protocol.worker_record import WorkerInfo
from kvgate.router.engine_load import EngineLoadFeed
from kvgate.router.lifecycle import InFlight
from kvgate.router.load import LoadTracker
from kvgate.router.registry import RegistryChange, WorkerRegistry
from kvgate.stats import counter, gauge
from kvgate.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MISSING_HINT = (
    "vLLM binds its KV-event socket only for tcp://*:PORT; with tcp://HOST:PORT it connects instead — "
    "check --kv-events-config endpoint, the topic, and that kvgate's kv_events_endpoint points at it"
)


@dataclass(slots=True)
class _EventWatch:
    """One ZMQ-fed worker's event flow as the missing-events alarm sees it (``perf_counter`` times)."""

    owed_since: float | None = None
    """Arrival of the earliest request that must have produced events none of which came yet."""
    owed_until: float = 0.0
    """When that request ended: the alarm counts ``events_missing_after`` from here."""
    owed: int = 0
    """Requests owed events since the last batch (for the warning)."""
    missing_since: float | None = None
    """When the events were declared missing; None while they flow."""


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
        # Workers whose /kv_event_sources is still being asked, and those that publish nothing.
        self.discovering: set[str] = set()
        self.load_only: set[str] = set()
        self.up: dict[str, bool] = {}
        # Keys the router must not pick right now; rebuilt on every health change only.
        self.down_keys: frozenset[WorkerKey] = frozenset()
        self.engine_losses: Counter[str] = Counter()
        self._watches: dict[str, _EventWatch] = {}
        # When each worker last completed an answer (time.monotonic()): proof of health.
        self._answered: dict[str, float] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._discoveries: dict[str, asyncio.Task[None]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        # Health polls, load scrapes and /kv_event_sources: the forwarding path's lean client, on its own
        # connections.
        self._http = Upstream(config)
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        self._unsubscribe = self.registry.subscribe(self._on_change)
        for info in self.registry.all():
            self._added(info)
        if self.config.events_missing_after > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_events())

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        tasks = [*self._probes.values(), *self._discoveries.values()]
        if self._watcher is not None:
            tasks.append(self._watcher)
        for task in tasks:
            task.cancel()  # now, before anything below yields (cancel_and_wait repeats it while one runs on)
        self._probes.clear()
        self._discoveries.clear()
        await asyncio.gather(
            cancel_and_wait(*tasks), *(s.stop() for s in self.sources.values()), *self._stopping, return_exceptions=True
        )
        self.sources.clear()
        await self._http.close()

    def any_up(self) -> bool:
        return any(self.up.values())

    def is_stale(self, worker_id: str) -> bool:
        """True while a NATS-fed worker's event stream cannot be trusted (ZMQ sources recover by replay)."""
        return worker_id in self.nats_fed and not self.indexer.trusted(worker_id, reason="events")

    def events_missing(self, worker_id: str) -> bool:
        """True while a ZMQ-fed worker serves requests whose KV events never arrive."""
        watch = self._watches.get(worker_id)
        return watch is not None and watch.missing_since is not None

    def events_of(self, worker_id: str) -> str:
        """How the worker's KV events arrive: ``nats``, ``nats-stale``, ``zmq``, ``zmq-missing``,
        ``discovering`` (its ``/kv_event_sources`` not answered yet) or ``none`` (load only)."""
        if worker_id in self.nats_fed:
            return "nats-stale" if self.is_stale(worker_id) else "nats"
        if worker_id in self.sources:
            return "zmq-missing" if self.events_missing(worker_id) else "zmq"
        return "discovering" if worker_id in self.discovering else "none"

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
            self._http.forget(change.worker.base_url)

    def _added(self, info: WorkerInfo) -> None:
        self.up.setdefault(info.worker_id, False)
        self._rebuild_down()
        if self.config.kv_events == "off":
            pass  # approximate mode: the router's predictions are the only model of caches
        elif self.bus is not None and info.metadata.get("events") == "nats":
            self.nats_fed.add(info.worker_id)
            # Nothing of its cache is known yet: untrusted until its sidecar restates it.
            self.indexer.set_trusted(info.worker_id, False)
            self.bus.worker_added(info.worker_id)
        elif info.kv_events_endpoint is not None:
            self.start_events(info.worker_id, info.kv_events_endpoint, info.kv_events_replay_endpoint, info.dp_size)
        else:
            self.discovering.add(info.worker_id)
            self._discoveries[info.worker_id] = asyncio.get_running_loop().create_task(self._discover(info))
        self._probes[info.worker_id] = asyncio.get_running_loop().create_task(self._probe(info))

    def start_events(
        self, worker_id: str, endpoint: str, replay_endpoint: str | None, dp_size: int, topic: str = ""
    ) -> None:
        source = ZmqEventSource(
            worker_id,
            endpoint,
            replay_endpoint,
            self.indexer,
            topic.encode(),
            dp_size=dp_size,
            config=ZmqSourceConfig(
                catch_up_interval=self.config.events_catch_up_interval,
                max_batch_blocks=self.config.events_max_batch_blocks,
            ),
        )
        self.sources[worker_id] = source
        self._watches[worker_id] = _EventWatch()
        self.replay.add(source)
        source.start()

    def _removed(self, worker_id: str) -> None:
        if worker_id in self.nats_fed:
            self.nats_fed.discard(worker_id)
            assert self.bus is not None
            self.bus.worker_removed(worker_id)
        for tasks in (self._probes, self._discoveries):
            task = tasks.pop(worker_id, None)
            if task is not None:
                task.cancel()
        self.discovering.discard(worker_id)
        self.load_only.discard(worker_id)
        self._watches.pop(worker_id, None)
        self._answered.pop(worker_id, None)
        self.engine_losses.pop(worker_id, None)
        source = self.sources.pop(worker_id, None)
        if source is not None:
            self.replay.discard(worker_id)
            task = asyncio.get_running_loop().create_task(source.stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        self.up.pop(worker_id, None)
        self._rebuild_down()

    # -- endpoint discovery ---------------------------------------------------------------

    async def _discover(self, info: WorkerInfo) -> None:
        """Ask the worker where it publishes, until it answers; then start its source (or none)."""
        while True:
            found = await self._ask_event_sources(info)
            if found is not None:
                break
            await asyncio.sleep(self.config.health_interval)
        self._discoveries.pop(info.worker_id, None)
        self.discovering.discard(info.worker_id)
        sources = found[0]
        if sources is None:
            self.load_only.add(info.worker_id)
            log.info("worker %s publishes no KV events (%s): routing it by load only", info.worker_id, found[1])
            return
        first = sources.ranks[0]
        if len(sources.ranks) != info.dp_size:
            log.warning(
                "worker %s: /kv_event_sources lists %d rank(s), its dp_size is %d: subscribing to %d",
                info.worker_id,
                len(sources.ranks),
                info.dp_size,
                info.dp_size,
            )
        for rank, ranked in enumerate(sources.ranks):
            if ranked.endpoint != rank_endpoint(first.endpoint, rank):
                log.warning("worker %s rank %d: %s is not at vLLM's port offset", info.worker_id, rank, ranked.endpoint)
        for endpoint in sources.connecting:
            log.warning("worker %s: KV events on %s: %s", info.worker_id, endpoint, MISSING_HINT)
        log.info(
            "worker %s publishes KV events on %s (replay %s, topic %r)",
            info.worker_id,
            first.endpoint,
            first.replay_endpoint,
            first.topic,
        )
        self.start_events(info.worker_id, first.endpoint, first.replay_endpoint, info.dp_size, first.topic)

    async def _ask_event_sources(self, info: WorkerInfo) -> tuple[EventSources | None, str] | None:
        """(sources or None, why none) once the worker answered; None while it cannot be reached."""
        try:
            status, body = await self._http.get(info.base_url, "/kv_event_sources", self.config.probe_timeout)
        except (TimeoutError, UpstreamFailure):
            return None
        if status == 404:
            return None, "its /kv_event_sources is 404"
        if status != 200:
            return None if status >= 500 else (None, f"its /kv_event_sources answered {status}")
        try:
            sources = parse_kv_event_sources(info.base_url, orjson.loads(body))
        except (ValueError, KvEventSourcesError) as err:
            log.warning("worker %s: unusable /kv_event_sources: %s", info.worker_id, err)
            return None, "its /kv_event_sources is unusable"
        return sources, "its /kv_event_sources is empty"

    # -- health and load ------------------------------------------------------------------

    async def _probe(self, info: WorkerInfo) -> None:
        next_health = next_load = 0.0
        while True:
            now = time.monotonic()
            if now >= next_health:
                # An answer it completed since the last poll says what a poll would: it is up.
                # A busy worker is then never polled (nor a busy fleet's gateway loaded by it).
                answered = self._answered.get(info.worker_id, -math.inf) >= next_health - self.config.health_interval
                next_health = now + self.config.health_interval
                if not (answered and self.up.get(info.worker_id)):
                    self._set_up(info.worker_id, await self._healthy(info))
            if info.worker_id in self.nats_fed:
                next_load = next_health  # its sidecar publishes the load
            elif now >= next_load and self.up.get(info.worker_id):
                next_load = now + self.config.load_interval
                await self._scrape_load(info)
            await asyncio.sleep(max(0.0, min(next_health, next_load) - time.monotonic()))

    async def _healthy(self, info: WorkerInfo) -> bool:
        try:
            status, _ = await self._http.get(info.base_url, "/health", self.config.probe_timeout)
        except (TimeoutError, UpstreamFailure):
            return False
        return status == 200

    async def _scrape_load(self, info: WorkerInfo) -> None:
        try:
            status, body = await self._http.get(info.base_url, "/metrics", self.config.probe_timeout)
            if status != 200:
                return
            text = body.decode("utf-8")
        except (TimeoutError, UpstreamFailure, UnicodeDecodeError):
            return
        try:
            per_rank = parse_engine_load(text, info.dp_size)
        except EngineMetricsError as err:
            log.debug("unusable /metrics from %s: %s", info.worker_id, err)
            return
        for rank, load in per_rank.items():
            self.engine_load.report(
                WorkerKey(info.worker_id, rank),
                load.running,
                load.waiting,
                load.kv_usage,
                capacity_tokens=load.capacity_tokens,
            )

    def _set_up(self, worker_id: str, ok: bool) -> None:
        if worker_id not in self.up or self.up[worker_id] == ok:
            return
        self.up[worker_id] = ok
        log.info("worker %s is %s", worker_id, "up" if ok else "down")
        self._rebuild_down()
        if not ok:
            self._engine_lost(worker_id)

    def _engine_lost(self, worker_id: str) -> None:
        """Its engine went away (maybe to restart on the same ports): forget its index now,
        while it is excluded from routing, so it comes back with nothing of the old engine."""
        source = self.sources.get(worker_id)
        if source is None:
            return  # no ZMQ feed: nothing indexed, or its sidecar clears it (NATS)
        self.indexer.engine_lost(worker_id)
        source.engine_lost()
        self.engine_losses[worker_id] += 1
        watch = self._watches[worker_id]
        # A dead engine never publishes what its last requests stored.
        watch.owed_since, watch.owed = None, 0
        log.info("worker %s: engine lost, its index is forgotten until its events say again", worker_id)

    # -- missing events (a RequestListener on the router) ---------------------------------

    def on_begin(self, flight: InFlight) -> None:
        """Nothing to check before a request ends."""

    def on_first_token(self, flight: InFlight) -> None:
        """Nothing to check before a request ends."""

    def on_finish(self, flight: InFlight) -> None:
        source = self.sources.get(flight.key.worker_id)
        if source is not None:
            source.activity()  # it may have published: ask its replay socket at the usual pace again
        outcome = flight.outcome
        if not isinstance(outcome, Outcome) or outcome.status != "200" or outcome.exchange is None:
            return
        worker = flight.key.worker_id
        if outcome.exchange.complete:
            self._answered[worker] = time.monotonic()
        watch = self._watches.get(worker)
        if watch is None or source is None or watch.missing_since is not None:
            return
        exchange = outcome.exchange
        if not self._must_publish(flight, exchange):
            return
        if source.last_batch is not None and source.last_batch >= exchange.started:
            return  # a batch came while it ran: the stream is alive
        watch.owed += 1
        if watch.owed_since is None:
            watch.owed_since, watch.owed_until = exchange.started, time.perf_counter()

    def _must_publish(self, flight: InFlight, exchange: Exchange) -> bool:
        """Whether serving ``flight`` stored a block the engine did not hold before."""
        block = self.indexer.block_size
        cached = exchange.cached_tokens if exchange.cached_tokens is not None else flight.cached_tokens
        # The engine always computes a prompt's last token: the block holding it may be
        # recomputed from cache without a new store, so only the blocks before it count.
        return (flight.prompt_tokens - 1) // block > cached // block

    async def _watch_events(self) -> None:
        after = self.config.events_missing_after
        while True:
            await asyncio.sleep(min(0.5, after / 4))
            self.check_events(time.perf_counter())

    def check_events(self, now: float) -> None:
        """Declare missing the events owed for ``events_missing_after``; trust again on a batch."""
        after = self.config.events_missing_after
        for worker_id, watch in self._watches.items():
            last = self.sources[worker_id].last_batch
            if watch.missing_since is not None:
                if last is not None and last > watch.missing_since:
                    watch.missing_since = None
                    self.indexer.set_trusted(worker_id, True)
                    log.warning("worker %s: KV events arrive again; its index is used for routing", worker_id)
            elif watch.owed_since is not None:
                if last is not None and last >= watch.owed_since:
                    watch.owed_since, watch.owed = None, 0
                elif now - watch.owed_until >= after:
                    self._declare_missing(worker_id, watch, now)

    def _declare_missing(self, worker_id: str, watch: _EventWatch, now: float) -> None:
        watch.missing_since = now
        self.indexer.set_trusted(worker_id, False)
        source = self.sources[worker_id]
        log.warning(
            "worker %s served %d request(s) that stored new KV blocks, but no KV event batch came from %s "
            "for %.1fs: routing it by load only until one does. %s",
            worker_id,
            watch.owed,
            source.endpoint,
            now - watch.owed_until,
            MISSING_HINT,
        )
        watch.owed_since, watch.owed = None, 0

    def collect(self) -> Iterable[Metric]:
        """``kvgate_worker_events_missing`` and ``kvgate_worker_engine_losses``, read at scrape time."""
        yield gauge(
            "kvgate_worker_events_missing",
            "1 while a ZMQ-fed worker serves requests whose KV events do not arrive (routed by load only)",
            {w: self.events_missing(w) for w in sorted(self._watches)},
            label="worker",
        )
        yield counter(
            "kvgate_worker_engine_losses",
            "Times a ZMQ-fed worker went down and had its index forgotten",
            dict(sorted(self.engine_losses.items())),
            label="worker",
        )

    def _rebuild_down(self) -> None:
        self.down_keys = frozenset(
            key for info in self.registry.all() if not self.up.get(info.worker_id) for key in info.keys
        )
