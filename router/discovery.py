"""etcd discovery: the gateway's watch over the worker prefix, and the sidecar's registration.

Key layout (ARCHITECTURE.md): ``/kvgate/<namespace>/workers/<worker_id>`` -> JSON of
``WorkerInfo.to_dict()`` (base URL, model, block size, event endpoints, dp size, tiers),
written under a lease a sidecar keeps alive (TTL 10 s by default).

``EtcdDiscovery`` mirrors the prefix into a ``WorkerRegistry``: an initial get-prefix,
then a watch from the revision after it. When etcd goes away it reconnects (rotating
through the endpoints, with backoff) and resumes the watch from the last revision it
applied, so nothing that happened meanwhile is missed; if etcd compacted that history
it lists the prefix again and diffs it against what it had put into the registry. It
only ever removes workers it added itself. Registry listeners (the gateway) drop a
departed worker's index and load state.

``EtcdRegistration`` is the other side: grant a lease, put the worker's key under it,
keep it alive, grant and put again when the lease is lost (etcd restarted empty, a
long partition), revoke it when the worker should stop receiving traffic or shuts
down cleanly.

Neither decides routes; neither touches NATS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions

from router.registry import WorkerConfigError, WorkerInfo, WorkerRegistry

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 10
KEY_ROOT = "/kvgate"

# Keepalive pings detect a silently dead etcd (partition, SIGSTOP) on a watch stream that
# would otherwise wait forever; etcd refuses pings more often than every 5 s by default.
_GRPC_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
}


def workers_prefix(namespace: str) -> str:
    if not namespace or "/" in namespace:
        raise ValueError(f"namespace must be non-empty and contain no '/', got {namespace!r}")
    return f"{KEY_ROOT}/{namespace}/workers/"


def worker_key(namespace: str, worker_id: str) -> str:
    return workers_prefix(namespace) + worker_id


def encode_worker(info: WorkerInfo) -> bytes:
    return json.dumps(info.to_dict(), sort_keys=True).encode()


def decode_worker(worker_id: str, value: bytes) -> WorkerInfo:
    """The ``WorkerInfo`` a key's JSON value describes; raises ``WorkerConfigError`` if invalid."""
    try:
        record = json.loads(value)
    except (ValueError, UnicodeDecodeError) as err:
        raise WorkerConfigError(f"worker {worker_id!r}: value is not JSON ({err})") from None
    if not isinstance(record, dict):
        raise WorkerConfigError(f"worker {worker_id!r}: value must be a JSON object")
    if record.get("worker_id", worker_id) != worker_id:
        raise WorkerConfigError(f"worker {worker_id!r}: value names worker {record['worker_id']!r}")
    if "base_url" not in record:
        raise WorkerConfigError(f"worker {worker_id!r}: missing base_url")
    fields: dict[str, Any] = {k: record[k] for k in (
        "base_url", "model", "block_size", "dp_size", "kv_events_endpoint",
        "kv_events_replay_endpoint", "tiers", "metadata") if k in record}
    fields.setdefault("model", "")
    try:
        return WorkerInfo(worker_id=worker_id, **fields)
    except TypeError as err:
        raise WorkerConfigError(f"worker {worker_id!r}: {err}") from None


def parse_endpoints(endpoints: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` (or a list; ``http://`` prefixes allowed) -> [(host, port)]."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed: list[tuple[str, int]] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        parts = urlsplit(item if "://" in item else f"http://{item}")
        try:
            port = parts.port or 2379
        except ValueError:
            raise ValueError(f"bad etcd endpoint {item!r}") from None
        if not parts.hostname:
            raise ValueError(f"bad etcd endpoint {item!r}")
        parsed.append((parts.hostname, port))
    if not parsed:
        raise ValueError("at least one etcd endpoint is required")
    return parsed


class _Endpoints:
    """Round-robin over etcd endpoints; a fresh client per connection attempt."""

    def __init__(self, endpoints: str | Sequence[str], timeout: float) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.timeout = timeout
        self._next = random.randrange(len(self.endpoints))

    def client(self) -> aetcd.Client:
        host, port = self.endpoints[self._next % len(self.endpoints)]
        self._next += 1
        return aetcd.Client(host=host, port=port, timeout=self.timeout, options=dict(_GRPC_OPTIONS))


async def _close(client: aetcd.Client | None) -> None:
    if client is None:
        return
    try:
        await client.close()
    except Exception as exc:  # closing a broken channel can itself fail; nothing to keep
        log.debug("etcd client close: %s", exc)


@dataclass(slots=True)
class DiscoveryStats:
    resyncs: int = 0
    compactions: int = 0
    watch_restarts: int = 0
    puts: int = 0
    deletes: int = 0
    invalid_records: int = 0


class EtcdDiscovery:
    """Mirror ``/kvgate/<namespace>/workers/`` into ``registry``, live."""

    def __init__(self, endpoints: str | Sequence[str], namespace: str, registry: WorkerRegistry, *,
                 timeout: float = 5.0, retry_interval: float = 0.25, max_retry_interval: float = 2.0) -> None:
        self.prefix = workers_prefix(namespace)
        self.registry = registry
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.stats = DiscoveryStats()
        self.revision = 0
        self.connected = False
        self._endpoints = _Endpoints(endpoints, timeout)
        self._owned: set[str] = set()
        self._need_listing = True
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="etcd-discovery")

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the first complete listing of the prefix."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        """Stop watching; the registry keeps what it has."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        delay = self.retry_interval
        while True:
            client = self._endpoints.client()
            try:
                if self._need_listing:
                    await self._list(client)
                    self._need_listing = False
                watch = await client.watch_prefix(self.prefix.encode(), start_revision=self.revision + 1)
                self.connected = True
                delay = self.retry_interval
                async for event in watch:
                    self._apply(event)
                # The stream ended without an error: etcd is going away; resume below.
            except aetcd.exceptions.RevisionCompactedError as err:
                self.stats.compactions += 1
                log.warning("etcd history compacted past revision %d (%s): listing again", self.revision + 1, err)
                self._need_listing = True
                continue
            except aetcd.exceptions.ClientError as err:
                log.info("etcd discovery: %s; retrying in %.2fs", err, delay)
            finally:
                self.connected = False
                await _close(client)
            self.stats.watch_restarts += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_retry_interval)

    async def _list(self, client: aetcd.Client) -> None:
        listing = await client.get_prefix(self.prefix.encode())
        seen: set[str] = set()
        for kv in listing:
            worker_id = self._worker_id(kv.key)
            if worker_id is None:
                continue
            seen.add(worker_id)
            self._put(worker_id, kv.value)
        for gone in sorted(self._owned - seen):
            self._owned.discard(gone)
            self.registry.remove(gone)
        self.revision = listing.header.revision
        self.stats.resyncs += 1
        self._ready.set()

    def _apply(self, event) -> None:
        self.revision = max(self.revision, event.kv.mod_revision)
        worker_id = self._worker_id(event.kv.key)
        if worker_id is None:
            return
        if event.kind == "PUT":
            self.stats.puts += 1
            self._put(worker_id, event.kv.value)
        else:
            self.stats.deletes += 1
            if worker_id in self._owned:
                self._owned.discard(worker_id)
                self.registry.remove(worker_id)

    def _put(self, worker_id: str, value: bytes) -> None:
        try:
            info = decode_worker(worker_id, value)
        except WorkerConfigError as err:
            # A worker whose record no longer parses cannot be routed to; never crash the watch.
            self.stats.invalid_records += 1
            log.warning("ignoring worker record: %s", err)
            if worker_id in self._owned:
                self._owned.discard(worker_id)
                self.registry.remove(worker_id)
            return
        self._owned.add(worker_id)
        self.registry.put(info)

    def _worker_id(self, key: bytes) -> str | None:
        name = key.decode(errors="replace")[len(self.prefix):]
        return name if name and "/" not in name else None


@dataclass(slots=True)
class RegistrationStats:
    registrations: int = 0
    lease_losses: int = 0
    deregistrations: int = 0
    errors: int = 0


class EtcdRegistration:
    """Keep one worker's key alive under a lease while it is ``wanted``.

    ``set_wanted(False)`` (engine unhealthy) revokes the lease so the key disappears at
    once; ``set_wanted(True)`` registers again. ``stop()`` revokes too (clean shutdown);
    a killed process simply stops refreshing and etcd drops the key after ``ttl``.
    """

    def __init__(self, endpoints: str | Sequence[str], namespace: str, info: WorkerInfo, *,
                 ttl: int = DEFAULT_LEASE_TTL, timeout: float = 5.0, retry_interval: float = 0.25,
                 max_retry_interval: float = 2.0, wanted: bool = True) -> None:
        if ttl < 2:
            raise ValueError(f"lease ttl must be >= 2 s (etcd's minimum), got {ttl}")
        self.key = worker_key(namespace, info.worker_id).encode()
        self.value = encode_worker(info)
        self.ttl = ttl
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.stats = RegistrationStats()
        self.registered = False
        self.lease_id: int | None = None
        self._endpoints = _Endpoints(endpoints, timeout)
        self._wanted = wanted
        self._changed = asyncio.Event()
        self._client: aetcd.Client | None = None
        self._task: asyncio.Task | None = None

    @property
    def wanted(self) -> bool:
        return self._wanted

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="etcd-registration")

    def set_wanted(self, wanted: bool) -> None:
        if wanted != self._wanted:
            self._wanted = wanted
            self._changed.set()

    async def stop(self, deregister: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if deregister:
            await self._revoke()
        await _close(self._client)
        self._client = None

    async def _run(self) -> None:
        delay = self.retry_interval
        while True:
            try:
                if self._wanted:
                    await self._keep_alive()
                else:
                    await self._revoke()
                    await self._wait_change(None)
                delay = self.retry_interval
            except aetcd.exceptions.ClientError as err:
                self.stats.errors += 1
                self.registered = False
                log.info("etcd registration: %s; retrying in %.2fs", err, delay)
                await _close(self._client)
                self._client = None
                await self._wait_change(delay)
                delay = min(delay * 2, self.max_retry_interval)

    async def _keep_alive(self) -> None:
        client = self._connect()
        if self.lease_id is not None and not self.registered:
            # Back after an error: the lease may have survived (etcd restarts keep leases).
            if await self._refresh(client):
                await client.put(self.key, self.value, lease=self.lease_id)
                self.registered = True
        if self.lease_id is None:
            lease = await client.lease(self.ttl)
            self.lease_id = lease.id
            await client.put(self.key, self.value, lease=lease.id)
            self.registered = True
            self.stats.registrations += 1
            log.info("registered %s under lease %x (ttl %ds)", self.key.decode(), lease.id, self.ttl)
        while self._wanted and self.lease_id is not None:
            await self._wait_change(self.ttl / 3)
            if not self._wanted:
                return
            if not await self._refresh(client):
                return

    async def _refresh(self, client: aetcd.Client) -> bool:
        """Refresh the lease; on a lost lease forget it (the caller grants a new one)."""
        try:
            reply = await client.refresh_lease(self.lease_id)
            alive = reply is not None and reply.TTL > 0
        except aetcd.exceptions.ClientError as err:
            if "not found" not in str(err):
                raise
            alive = False
        if not alive:
            self.stats.lease_losses += 1
            log.warning("lease %x of %s was lost; registering again", self.lease_id or 0, self.key.decode())
            self.lease_id = None
            self.registered = False
        return alive

    async def _revoke(self) -> None:
        lease_id, self.lease_id = self.lease_id, None
        was_registered, self.registered = self.registered, False
        if lease_id is None:
            return
        try:
            await self._connect().revoke_lease(lease_id)
            if was_registered:
                self.stats.deregistrations += 1
            log.info("deregistered %s", self.key.decode())
        except aetcd.exceptions.ClientError as err:
            # etcd unreachable: the lease runs out on its own within ttl.
            log.info("revoking lease %x failed (%s); it expires within %ds", lease_id, err, self.ttl)

    def _connect(self) -> aetcd.Client:
        if self._client is None:
            self._client = self._endpoints.client()
        return self._client

    async def _wait_change(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self._changed.clear()
