"""etcd registration: keep this worker's record under a lease while it should get traffic.

Grant a lease, put the worker's key under it, keep it alive, grant and put again when
the lease is lost (etcd restarted empty, a long partition), revoke it when the worker
should stop receiving traffic or shuts down cleanly. The gateway's side is
``kvgate.router.discovery.EtcdDiscovery``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import aetcd
import aetcd.exceptions

from kvgate.etcd import Endpoints, EtcdCredentials, close_client
from kvgate.protocol.worker_record import DEFAULT_LEASE_TTL, WorkerInfo, encode_worker, worker_key
from kvgate.tasks import cancel_and_wait

log = logging.getLogger(__name__)


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

    def __init__(
        self,
        endpoints: str | Sequence[str],
        namespace: str,
        info: WorkerInfo,
        *,
        ttl: int = DEFAULT_LEASE_TTL,
        timeout: float = 5.0,
        retry_interval: float = 0.25,
        max_retry_interval: float = 2.0,
        credentials: EtcdCredentials | None = None,
        wanted: bool = True,
    ) -> None:
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
        self._endpoints = Endpoints(endpoints, timeout, credentials)
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
        await cancel_and_wait(task)
        if deregister:
            await self._revoke()
        await close_client(self._client)
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
                await close_client(self._client)
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
        except TimeoutError:
            pass
        self._changed.clear()
