"""The gateway replica's end of the NATS bus: events in, load in, in-flight load both ways.

With ``nats_url`` set, ``GatewayBus`` holds one NATS connection and

* feeds ``kvgate.<ns>.events.*`` into the ``KvIndexer`` through a ``NatsEventSource``
  (every replica consumes every event, so their indexes agree), accepting only workers
  the registry knows; the source tells the index which workers' streams are stale
  (``KvIndexer.set_trusted``), and the index leaves their matches out, so those
  workers are routed by load only until their stream is back in sync;
* feeds ``kvgate.<ns>.load.*`` (the sidecars' scrapes of ``/metrics``) into the
  ``LoadTracker`` as engine load, through ``router.engine_load.EngineLoadFeed``;
* listens to the router's request lifecycle (a ``RequestListener``) to share this
  replica's in-flight requests on ``kvgate.<ns>.active.<router_id>``, and counts the
  other replicas' ones (``ActiveSync``, pure, their only writer into the tracker), so
  two replicas under the same load do not pile onto the same worker.

Recovery: the connection never gives up (``connect_nats``). After a (re)connect the
replica asks every known worker's sidecar to restate its cache (``resync``), restates
its own in-flight requests (``leave`` + one ``add`` each) and asks the other replicas
to do the same (``sync``), since anything may have been lost meanwhile. Messages are
not queued while disconnected: the restatement replaces them. A replica that dies
without ``leave`` stops heartbeating (``alive``) and is forgotten after
``replica_timeout``.

Trust (configs/DEPLOY.md has the threat model): ``kvgate.bus.Bus`` drops messages whose
id is not their subject's and, with a bus secret, unsigned ones. What is left is bounded
here even without a secret: another replica's request must name a worker in discovery
and stay within ``max_request_tokens`` (and as many blocks), a replica holds at most
``max_requests_per_replica`` requests, and at most ``max_replicas`` replicas are counted;
anything beyond is dropped and counted (``kvgate_bus_active_rejected``).
``GatewaySecurity`` turns the gateway's options into NATS and etcd credentials and the
bus secret.

Never routes and never touches a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric

from kvgate.bus import Bus, NatsCredentials, connect_nats
from kvgate.etcd import EtcdCredentials
from kvgate.gateway.config import GatewayConfig
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.indexer.nats_source import NatsEventSource
from kvgate.protocol.messages import ActiveMessage, LoadMessage, check_token
from kvgate.router.engine_load import EngineLoadFeed
from kvgate.router.lifecycle import InFlight
from kvgate.router.load import LoadTracker, RemoteRequest
from kvgate.router.registry import WorkerRegistry
from kvgate.secret import Secret, read_secret
from kvgate.stats import counter, counters, every_field
from kvgate.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MAX_REQUEST_TOKENS = 1 << 20
"""Beyond any model's context: a larger claim is forged (blocks are bounded by it too)."""
MAX_REQUESTS_PER_REPLICA = 4096
MAX_REPLICAS = 64


@dataclass(frozen=True, slots=True)
class GatewaySecurity:
    """The gateway's NATS and etcd credentials and bus secret, from its options."""

    nats: NatsCredentials = field(default_factory=NatsCredentials)
    etcd: EtcdCredentials = field(default_factory=EtcdCredentials)
    bus_secret: Secret | None = None

    @classmethod
    def from_config(cls, config: GatewayConfig) -> GatewaySecurity:
        """Raises ValueError naming the option (never its value) when they do not fit together."""
        return cls(
            nats=NatsCredentials.from_options(
                user=config.nats_user,
                password=config.nats_password,
                password_file=config.nats_password_file,
                token=config.nats_token,
                token_file=config.nats_token_file,
                nkey_seed_file=config.nats_nkey_seed_file,
                creds_file=config.nats_creds_file,
                ca_file=config.nats_tls_ca,
                cert_file=config.nats_tls_cert,
                key_file=config.nats_tls_key,
            ),
            etcd=EtcdCredentials.from_options(
                user=config.etcd_user,
                password=config.etcd_password,
                password_file=config.etcd_password_file,
                ca_file=config.etcd_tls_ca,
                cert_file=config.etcd_tls_cert,
                key_file=config.etcd_tls_key,
            ),
            bus_secret=read_secret("bus secret", value=config.bus_secret, file=config.bus_secret_file),
        )


@dataclass(slots=True)
class ActiveStats:
    sent: int = 0
    received: int = 0
    restatements: int = 0
    replicas_expired: int = 0
    rejected: int = 0
    """Requests dropped: unknown worker, over a bound, or a malformed id."""


class ActiveSync:
    """This replica's request lifecycle out as ``ActiveMessage``s, the others' in.

    Pure: reads this replica's entries from the ``LoadTracker`` (each request's
    ``InFlight`` handle put them there), writes the other replicas' entries into it (the
    only writer of those), keeps the time each replica was last heard from. The caller
    publishes what the methods return.

    Bounds on what another replica may claim (see the module doc): ``known(worker_id)``
    (the registry's ``__contains__``) says which workers exist.
    """

    def __init__(
        self,
        router_id: str,
        load: LoadTracker,
        *,
        replica_timeout: float = 5.0,
        known: Callable[[str], bool] | None = None,
        max_request_tokens: int = MAX_REQUEST_TOKENS,
        max_requests_per_replica: int = MAX_REQUESTS_PER_REPLICA,
        max_replicas: int = MAX_REPLICAS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if replica_timeout <= 0:
            raise ValueError(f"replica_timeout must be > 0, got {replica_timeout}")
        for name, value in (
            ("max_request_tokens", max_request_tokens),
            ("max_requests_per_replica", max_requests_per_replica),
            ("max_replicas", max_replicas),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.router_id = check_token("router_id", router_id)
        self.load = load
        self.replica_timeout = replica_timeout
        self.known = known
        self.max_request_tokens = max_request_tokens
        self.max_requests_per_replica = max_requests_per_replica
        self.max_replicas = max_replicas
        self.clock = clock
        self.stats = ActiveStats()
        self._own: set[str] = set()
        self._replicas: dict[str, float] = {}
        self._remote: dict[str, set[str]] = {}

    # -- this replica -------------------------------------------------------------------

    def began(self, request_id: str) -> ActiveMessage | None:
        """``request_id`` began (or moved, on a retry): announce where it went."""
        self._own.add(request_id)
        return self._state_of(request_id)

    def prefill_done(self, request_id: str) -> ActiveMessage | None:
        return self._state_of(request_id) if request_id in self._own else None

    def finished(self, request_id: str) -> ActiveMessage | None:
        if request_id not in self._own:
            return None
        self._own.discard(request_id)
        return self._message("finish", request_id)

    def restatement(self) -> list[ActiveMessage]:
        """``leave`` (drop whatever the others hold of us), then every request still in flight."""
        self.stats.restatements += 1
        out = [self._message("leave")]
        for request_id in sorted(self._own):
            msg = self._state_of(request_id)
            if msg is None:
                self._own.discard(request_id)  # expired in the tracker: its finish was lost
            else:
                out.append(msg)
        return out

    def alive(self) -> ActiveMessage:
        return self._message("alive")

    def sync_request(self) -> ActiveMessage:
        return self._message("sync")

    def leave(self) -> ActiveMessage:
        return self._message("leave")

    # -- the other replicas -------------------------------------------------------------

    def receive(self, msg: ActiveMessage, now: float | None = None) -> bool:
        """Apply another replica's message; True when it asks us to restate (``sync``)."""
        origin = msg.router_id
        if origin == self.router_id:
            return False  # NATS echoes our own messages back
        self.stats.received += 1
        if msg.op == "leave":
            self._forget(origin)
            return False
        if origin not in self._replicas and len(self._replicas) >= self.max_replicas:
            self.stats.rejected += 1
            log.warning("ignored replica %s: already %d replicas (max_replicas)", origin, len(self._replicas))
            return False
        now = self.clock() if now is None else now
        self._replicas[origin] = now
        try:
            if msg.op in ("add", "prefill_done"):
                self._check_claim(origin, msg)
                prefill = msg.new_prefill_tokens if msg.op == "add" else 0
                self.load.add_remote(origin, [RemoteRequest(msg.request_id, msg.key, prefill, msg.blocks)], now)
                self._remote.setdefault(origin, set()).add(msg.request_id)
            elif msg.op == "finish":
                self.load.remove_remote(origin, [msg.request_id])
                self._remote.get(origin, set()).discard(msg.request_id)
        except ValueError as err:
            self.stats.rejected += 1
            log.warning("ignored an active message from %s: %s", origin, err)
        return msg.op == "sync"

    def _check_claim(self, origin: str, msg: ActiveMessage) -> None:
        """Raise ValueError for a request no honest replica sends."""
        check_token("worker_id", msg.worker_id)
        if self.known is not None and not self.known(msg.worker_id):
            raise ValueError(f"unknown worker {msg.worker_id!r}")
        limit = self.max_request_tokens
        if max(msg.prompt_tokens, msg.new_prefill_tokens, msg.blocks) > limit:
            raise ValueError(f"request {msg.request_id!r} claims more than {limit} tokens or blocks")
        held = self._remote.get(origin, set())
        if msg.request_id not in held and len(held) >= self.max_requests_per_replica:
            raise ValueError(f"more than {self.max_requests_per_replica} requests in flight")

    def _forget(self, origin: str) -> None:
        self._replicas.pop(origin, None)
        self._remote.pop(origin, None)
        self.load.remove_remote(origin)

    def expire(self, now: float | None = None) -> list[str]:
        """Forget replicas silent for ``replica_timeout`` (died without ``leave``)."""
        now = self.clock() if now is None else now
        gone = [rid for rid, seen in self._replicas.items() if now - seen > self.replica_timeout]
        for rid in gone:
            self._forget(rid)
            self.stats.replicas_expired += 1
            log.warning("replica %s went silent: its in-flight requests are forgotten", rid)
        return gone

    def replicas(self) -> list[str]:
        """Other replicas heard from (and not gone)."""
        return sorted(self._replicas)

    def _state_of(self, request_id: str) -> ActiveMessage | None:
        entry = self.load.get(request_id)
        if entry is None:
            return None
        op = "add" if entry.in_prefill else "prefill_done"
        return ActiveMessage(
            router_id=self.router_id,
            op=op,
            request_id=request_id,
            worker_id=entry.key.worker_id,
            dp_rank=entry.key.dp_rank,
            prompt_tokens=entry.prompt_tokens,
            new_prefill_tokens=entry.prefill_tokens,
            blocks=entry.blocks,
            ts=time.time(),
        )

    def _message(self, op: str, request_id: str = "") -> ActiveMessage:
        return ActiveMessage(router_id=self.router_id, op=op, request_id=request_id, ts=time.time())


class GatewayBus:
    """One replica's NATS connection and everything that flows over it (see the module doc)."""

    def __init__(
        self,
        nats_url: str,
        namespace: str,
        router_id: str,
        indexer: KvIndexer,
        registry: WorkerRegistry,
        load: LoadTracker,
        *,
        events_stale_after: float = 6.0,
        replica_timeout: float = 5.0,
        resync_interval: float = 1.0,
        credentials: NatsCredentials | None = None,
        secret: Secret | None = None,
        events: bool = True,
    ) -> None:
        self.nats_url = nats_url
        self.events = events
        self.credentials = credentials
        self.secret = secret
        self.namespace = namespace
        self.indexer = indexer
        self.registry = registry
        self.engine_load = EngineLoadFeed(load, registry)
        self.events_stale_after = events_stale_after
        self.resync_interval = resync_interval
        self.sync = ActiveSync(router_id, load, replica_timeout=replica_timeout, known=registry.__contains__)
        self.nc = None
        self.bus: Bus | None = None
        self.source: NatsEventSource | None = None
        self.reconnects = 0
        self._outbox: deque[ActiveMessage] = deque()
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def router_id(self) -> str:
        return self.sync.router_id

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def start(self) -> None:
        """Connect in the background: the gateway serves (routing by load) until NATS answers."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name="gateway-bus"),
            loop.create_task(self._heartbeat(), name="gateway-bus-heartbeat"),
        ]

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the first connection and subscriptions."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        """Tell the other replicas we leave, then close (buffered messages are flushed)."""
        await cancel_and_wait(*self._tasks, *self._pending)
        if self.source is not None:
            await self.source.stop()
        if self.nc is None:
            return
        try:
            if self.connected and self.bus is not None:
                await self.bus.publish_active(self.sync.leave())
            await asyncio.wait_for(self.nc.close(), 2)
        except Exception as exc:  # shutting down anyway; the others time us out
            log.info("nats close: %s", exc)

    # -- this replica's requests (a RequestListener on the router) ----------------------

    def on_begin(self, flight: InFlight) -> None:
        self._post(self.sync.began(flight.request_id))

    def on_first_token(self, flight: InFlight) -> None:
        self._post(self.sync.prefill_done(flight.request_id))

    def on_finish(self, flight: InFlight) -> None:
        self._post(self.sync.finished(flight.request_id))

    # -- what the gateway calls --------------------------------------------------------

    def worker_added(self, worker_id: str) -> None:
        """A NATS-fed worker joined discovery: ask for its whole cache now rather than at its next heartbeat."""
        if self.connected and self.source is not None:
            self._spawn(self._request_resync([worker_id]))

    def worker_removed(self, worker_id: str) -> None:
        if self.source is not None:
            self.source.forget(worker_id)

    # -- the connection ------------------------------------------------------------------

    async def _run(self) -> None:
        self.nc = await connect_nats(
            self.nats_url,
            name=f"kvgate-gateway-{self.router_id}",
            credentials=self.credentials,
            on_reconnected=self._on_reconnected,
        )
        self.bus = Bus(self.nc, self.namespace, secret=self.secret)
        if self.events:
            self.source = NatsEventSource(
                self.bus,
                self.indexer,
                stale_after=self.events_stale_after,
                resync_interval=self.resync_interval,
                accept=self.registry.__contains__,
                ranks=self._dp_size,
                consumer_id=self.router_id,
            )
            await self.source.start()
        await self.bus.on_load(self._on_load)
        await self.bus.on_active(self._on_active)
        log.info(
            "replica %s on NATS %s (namespace %s, messages %s)",
            self.router_id,
            self.nats_url,
            self.namespace,
            "signed" if self.bus.signing else "unsigned",
        )
        await self._catch_up()
        self._ready.set()
        await self._publish_loop()

    def _dp_size(self, worker_id: str) -> int:
        info = self.registry.get(worker_id)
        return 0 if info is None else info.dp_size

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        if self.source is not None:
            await self.source.resync_all()
        await self._catch_up()

    async def _catch_up(self) -> None:
        """After any (re)connect: workers and replicas restate what we may have missed."""
        await self._request_resync(
            [info.worker_id for info in self.registry.all() if info.metadata.get("events") == "nats"]
        )
        for msg in self.sync.restatement():
            self._post(msg)
        self._post(self.sync.sync_request())

    async def _request_resync(self, worker_ids: Iterable[str]) -> None:
        if self.bus is None:
            return
        for worker_id in worker_ids:
            try:
                await self.bus.request_resync(worker_id, self.router_id)
            except Exception as exc:  # disconnected: the reconnect asks again
                log.info("resync request for %s not sent: %s", worker_id, exc)

    def _post(self, msg: ActiveMessage | None) -> None:
        # While disconnected nothing is queued: the restatement after the reconnect says it all.
        if msg is not None and self.connected:
            self._outbox.append(msg)
            self._wake.set()

    async def _publish_loop(self) -> None:
        assert self.bus is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                msg = self._outbox.popleft()
                try:
                    await self.bus.publish_active(msg)
                    self.sync.stats.sent += 1
                except Exception as exc:  # lost with the connection; the restatement covers it
                    log.debug("active message not published: %s", exc)

    async def _heartbeat(self) -> None:
        interval = self.sync.replica_timeout / 4
        while True:
            await asyncio.sleep(interval)
            self._post(self.sync.alive())
            self.sync.expire()

    def _on_load(self, msg: LoadMessage) -> None:
        self.engine_load.report(
            msg.key, msg.running, msg.waiting, msg.kv_usage, measured_at=msg.ts, capacity_tokens=msg.capacity_tokens
        )

    def _on_active(self, msg: ActiveMessage) -> None:
        if self.sync.receive(msg):
            for out in self.sync.restatement():
                self._post(out)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # -- metrics -------------------------------------------------------------------------

    def collect(self, nats_fed: Iterable[str]) -> Iterable[Metric]:
        """``kvgate_bus_*`` families, read at scrape time; ``nats_fed``: workers whose events come over NATS."""
        yield GaugeMetricFamily("kvgate_bus_connected", "1 while connected to NATS", value=float(self.connected))
        yield GaugeMetricFamily(
            "kvgate_bus_replicas", "Other gateway replicas heard from", value=float(len(self.sync.replicas()))
        )
        stale = GaugeMetricFamily(
            "kvgate_worker_events_stale",
            "1 while a NATS-fed worker's event stream is stale (routed by load only)",
            labels=("worker",),
        )
        for worker_id in sorted(nats_fed):
            stale.add_metric((worker_id,), float(not self.indexer.trusted(worker_id, reason="events")))
        yield stale
        if self.source is not None:
            stats = self.source.stats
            yield from counters(
                "kvgate_bus_event_stream_", stats, every_field(stats, "Event messages over NATS: {name}")
            )
        for name, value, doc in (
            ("load_messages", self.engine_load.received, "Load messages received"),
            (
                "load_ignored",
                self.engine_load.ignored,
                "Load messages ignored (unknown worker or rank, too old, invalid)",
            ),
            ("active_sent", self.sync.stats.sent, "In-flight request messages published to the other replicas"),
            ("active_received", self.sync.stats.received, "In-flight request messages from the other replicas"),
            (
                "active_rejected",
                self.sync.stats.rejected,
                "Other replicas' requests dropped (unknown worker, over a bound, malformed)",
            ),
            ("restatements", self.sync.stats.restatements, "Restatements of this replica's in-flight requests"),
            (
                "replicas_expired",
                self.sync.stats.replicas_expired,
                "Replicas forgotten after replica_timeout of silence",
            ),
            ("reconnects", self.reconnects, "NATS reconnections"),
        ):
            yield counter(f"kvgate_bus_{name}", doc, value)
        yield counter(
            "kvgate_bus_rejected",
            "Bus messages dropped, by reason (malformed, subject_mismatch, unsigned, bad_signature, stale_signature)",
            dict(sorted(self.bus.rejected.items())) if self.bus is not None else {},
        )
