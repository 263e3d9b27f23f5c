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

Both authenticate as the ``EtcdCredentials`` they are given (user / password, TLS).
Whoever can write under the prefix adds workers that every gateway forwards client
requests to, Authorization headers included: etcd write access must be restricted
(configs/DEPLOY.md).

Neither decides routes; neither touches NATS.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.exceptions

from kvgate.etcd import Endpoints, EtcdCredentials, close_client
from kvgate.protocol.worker_record import WorkerConfigError, decode_worker, workers_prefix
from kvgate.router.registry import WorkerRegistry
from kvgate.tasks import cancel_and_wait

log = logging.getLogger(__name__)


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

    def __init__(
        self,
        endpoints: str | Sequence[str],
        namespace: str,
        registry: WorkerRegistry,
        *,
        timeout: float = 5.0,
        retry_interval: float = 0.25,
        max_retry_interval: float = 2.0,
        credentials: EtcdCredentials | None = None,
    ) -> None:
        self.prefix = workers_prefix(namespace)
        self.registry = registry
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.stats = DiscoveryStats()
        self.revision = 0
        self.connected = False
        self._endpoints = Endpoints(endpoints, timeout, credentials)
        self._owned: set[str] = set()
        self._need_listing = True
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="etcd-discovery")

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the first complete listing of the prefix."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        """Stop watching; the registry keeps what it has."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

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
                await close_client(client)
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

    def _apply(self, event: Any) -> None:
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
        name = key.decode(errors="replace")[len(self.prefix) :]
        return name if name and "/" not in name else None
