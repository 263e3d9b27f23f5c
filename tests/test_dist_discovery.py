"""etcd discovery against a real etcd: live add / remove, lease expiry, restarts, compaction."""

from __future__ import annotations

import asyncio
import random
import time

import aetcd
import pytest

from kvgate.etcd import close_client, parse_endpoints
from kvgate.protocol.worker_record import WorkerConfigError, WorkerInfo, decode_worker, encode_worker, worker_key
from kvgate.router.discovery import EtcdDiscovery
from kvgate.router.registry import RegistryChange, WorkerRegistry
from kvgate.worker.sidecar.registration import EtcdRegistration
from tests.helpers import until
from tests.servers import EtcdServer

pytestmark = pytest.mark.integration

NS = "t"


def info(worker_id: str, port: int = 9000) -> WorkerInfo:
    return WorkerInfo(
        worker_id,
        f"http://127.0.0.1:{port}",
        "tiny",
        block_size=64,
        dp_size=2,
        kv_events_endpoint="tcp://127.0.0.1:5557",
        kv_events_replay_endpoint="tcp://127.0.0.1:5558",
        tiers=("GPU", "CPU"),
    )


class Changes:
    def __init__(self, registry: WorkerRegistry) -> None:
        self.log: list[tuple[str, str]] = []
        registry.subscribe(self)

    def __call__(self, change: RegistryChange) -> None:
        self.log.append((change.kind, change.worker.worker_id))

    def removed(self) -> list[str]:
        return [wid for kind, wid in self.log if kind == "removed"]


def test_worker_record_round_trip_and_bad_records():
    w = info("w1")
    assert decode_worker("w1", encode_worker(w)) == w
    with pytest.raises(WorkerConfigError):
        decode_worker("w1", b"{not json")
    with pytest.raises(WorkerConfigError):
        decode_worker("w1", encode_worker(info("w2")))
    with pytest.raises(WorkerConfigError):
        decode_worker("w1", b'{"base_url": "ftp://x", "model": "m"}')
    with pytest.raises(WorkerConfigError):
        decode_worker("w1", b'["a list"]')
    assert parse_endpoints("127.0.0.1:1, http://h:2 ,") == [("127.0.0.1", 1), ("h", 2)]
    with pytest.raises(ValueError):
        parse_endpoints(" , ")


@pytest.mark.slow
async def test_registration_adds_and_lease_expiry_removes(etcd_server: EtcdServer):
    registry = WorkerRegistry()
    changes = Changes(registry)
    discovery = EtcdDiscovery(etcd_server.endpoint, NS, registry)
    await discovery.start()
    await discovery.wait_ready(10)
    killed = EtcdRegistration(etcd_server.endpoint, NS, info("w1"), ttl=2)
    clean = EtcdRegistration(etcd_server.endpoint, NS, info("w2", 9001), ttl=2)
    try:
        await killed.start()
        await clean.start()
        await until(lambda: "w1" in registry and "w2" in registry, what="both workers registered")
        assert registry.get("w1") == info("w1")
        assert registry.get("w2").base_url == "http://127.0.0.1:9001"

        # Outlive several TTLs: keepalive holds the registration.
        await asyncio.sleep(5)
        assert "w1" in registry and changes.removed() == []

        await clean.stop()  # clean shutdown revokes: gone at once
        await until(lambda: "w2" not in registry, timeout=2, what="w2 deregistered")

        await killed.stop(deregister=False)  # a SIGKILLed sidecar: the lease simply runs out
        took = await until(lambda: "w1" not in registry, timeout=8, what="w1 lease expiry")
        print(f"lease expiry (ttl 2 s) removed the worker after {took:.2f}s")
        assert changes.removed() == ["w2", "w1"]
    finally:
        await killed.stop()
        await clean.stop()
        await discovery.stop()


@pytest.mark.slow
async def test_unwanted_registration_deregisters_and_comes_back(etcd_server: EtcdServer):
    registry = WorkerRegistry()
    discovery = EtcdDiscovery(etcd_server.endpoint, NS, registry)
    reg = EtcdRegistration(etcd_server.endpoint, NS, info("w1"), ttl=3)
    await discovery.start()
    await reg.start()
    try:
        await until(lambda: "w1" in registry, what="registered")
        reg.set_wanted(False)
        await until(lambda: "w1" not in registry, timeout=2, what="deregistered when unwanted")
        reg.set_wanted(True)
        await until(lambda: "w1" in registry, timeout=5, what="registered again")
        # The watch can show the key before the registration task counts its put.
        await until(lambda: reg.stats.registrations >= 2, timeout=5, what="the second registration counted")
        assert reg.stats.registrations == 2 and reg.stats.deregistrations == 1

        # The lease vanishes behind its back (as after etcd lost its data): granted and put again.
        async with aetcd.Client("127.0.0.1", etcd_server.client_port) as client:
            await client.revoke_lease(reg.lease_id)
        await until(lambda: "w1" not in registry, what="key gone with the lease")
        await until(lambda: "w1" in registry, what="registered under a new lease")
        await until(lambda: reg.stats.registrations >= 3, timeout=5, what="the third registration counted")
        assert reg.stats.lease_losses == 1 and reg.stats.registrations == 3
    finally:
        await reg.stop()
        await discovery.stop()


class _SwallowingClose:
    """Closes the way aetcd's watcher shutdown does: it awaits its stream task and catches ``CancelledError``."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.closed = False

    async def close(self) -> None:
        stream = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        self.closing.set()
        stream_cancelled = False
        while not stream.done():
            try:
                await stream
            except asyncio.CancelledError:
                stream_cancelled = True
                stream.cancel()
        assert stream_cancelled
        self.closed = True


async def test_close_client_keeps_a_cancellation_the_close_swallowed():
    # A stop that lands while discovery closes its client (after a compacted watch, say)
    # must still stop it: the close finishes, then the cancellation goes on.
    client = _SwallowingClose()
    task = asyncio.get_running_loop().create_task(close_client(client))  # type: ignore[arg-type]
    await client.closing.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert client.closed and task.cancelled()
    # The close's own timeout, swallowed the same way, is not taken for a stop.
    await close_client(_SwallowingClose(), timeout=0.05)


@pytest.mark.slow
async def test_stop_lands_whenever_it_comes_during_compaction_resyncs(etcd_server: EtcdServer):
    # Stops at random moments around a compacted watch (the stop may land while the
    # client closes): each returns and the watch task is gone.
    rng = random.Random(7)
    registry = WorkerRegistry()
    discovery = EtcdDiscovery(etcd_server.endpoint, NS, registry)
    async with aetcd.Client("127.0.0.1", etcd_server.client_port, timeout=10) as client:
        await discovery.start()
        await discovery.wait_ready(10)
        for i in range(40):
            await discovery.stop()
            await client.put(worker_key(NS, f"w{i}").encode(), encode_worker(info(f"w{i}")))
            await client.compact((await client.get_prefix(b"/")).header.revision)
            await discovery.start()
            task = discovery._task
            await asyncio.sleep(rng.uniform(0, 0.03))
            await asyncio.wait_for(discovery.stop(), 10)
            assert task is not None and task.done()
        await discovery.start()
        await until(lambda: len(registry) == 40, what="every worker listed after the last compaction")
        assert discovery.stats.compactions >= 1
    await discovery.stop()


@pytest.mark.slow
async def test_bad_records_are_skipped_not_fatal(etcd_server: EtcdServer):
    registry = WorkerRegistry()
    discovery = EtcdDiscovery(etcd_server.endpoint, NS, registry)
    async with aetcd.Client("127.0.0.1", etcd_server.client_port) as client:
        await client.put(worker_key(NS, "bad").encode(), b"{oops")
        await client.put(worker_key(NS, "nested/deeper").encode(), encode_worker(info("w9")))
        await discovery.start()
        await discovery.wait_ready(10)
        assert len(registry) == 0 and discovery.stats.invalid_records == 1
        await client.put(worker_key(NS, "good").encode(), encode_worker(info("good")))
        await until(lambda: "good" in registry, what="good worker after a bad one")
        # A record that turns invalid takes its worker out of routing.
        await client.put(worker_key(NS, "good").encode(), b'{"base_url": 3}')
        await until(lambda: "good" not in registry, what="invalid update removes the worker")
    await discovery.stop()


@pytest.mark.slow
async def test_resume_from_last_revision_then_resync_after_compaction(etcd_server: EtcdServer):
    registry = WorkerRegistry()
    changes = Changes(registry)
    discovery = EtcdDiscovery(etcd_server.endpoint, NS, registry)
    async with aetcd.Client("127.0.0.1", etcd_server.client_port) as client:
        for wid in ("a", "b"):
            await client.put(worker_key(NS, wid).encode(), encode_worker(info(wid)))
        await discovery.start()
        await discovery.wait_ready(10)
        assert sorted(w.worker_id for w in registry.all()) == ["a", "b"]
        await discovery.stop()

        # Changes while the watcher is away are replayed from its last revision: no listing.
        await client.put(worker_key(NS, "c").encode(), encode_worker(info("c")))
        await client.delete(worker_key(NS, "a").encode())
        await discovery.start()
        await until(lambda: "c" in registry and "a" not in registry, what="missed changes replayed")
        assert discovery.stats.resyncs == 1 and discovery.stats.compactions == 0
        await discovery.stop()

        # History compacted past its revision: it lists again and diffs.
        await client.delete(worker_key(NS, "b").encode())
        await client.put(worker_key(NS, "d").encode(), encode_worker(info("d")))
        latest = (await client.get_prefix(b"/")).header.revision
        await client.compact(latest)
        await discovery.start()
        await until(lambda: sorted(w.worker_id for w in registry.all()) == ["c", "d"], what="resync after compaction")
        assert discovery.stats.compactions == 1 and discovery.stats.resyncs == 2
        assert sorted(changes.removed()) == ["a", "b"]
    await discovery.stop()


@pytest.mark.slow
async def test_watch_and_leases_survive_etcd_kill_and_restart(etcd_server: EtcdServer):
    registry = WorkerRegistry()
    changes = Changes(registry)
    discovery = EtcdDiscovery(etcd_server.endpoint, NS, registry)
    regs = [EtcdRegistration(etcd_server.endpoint, NS, info(f"w{i}", 9000 + i), ttl=3) for i in range(2)]
    await discovery.start()
    for reg in regs:
        await reg.start()
    try:
        await until(lambda: len(registry) == 2, what="two workers")
        await asyncio.to_thread(etcd_server.kill)
        await until(lambda: not discovery.connected, what="watch noticed etcd is gone")
        await asyncio.sleep(1)
        assert len(registry) == 2  # an unreachable etcd removes nobody
        down_at = time.monotonic()
        await asyncio.to_thread(etcd_server.start)
        late = EtcdRegistration(etcd_server.endpoint, NS, info("w9", 9009), ttl=3)
        await late.start()
        took = await until(lambda: "w9" in registry, timeout=15, what="watch resumed after restart")
        print(
            f"etcd restart: watch resumed {took:.2f}s after etcd answered "
            f"({time.monotonic() - down_at:.2f}s after restart began)"
        )
        # Longer than the TTL: the old leases are being refreshed again, nobody was lost.
        await asyncio.sleep(4)
        assert sorted(w.worker_id for w in registry.all()) == ["w0", "w1", "w9"]
        assert changes.removed() == []
        assert all(reg.registered for reg in regs)
        assert discovery.stats.watch_restarts >= 1
        await late.stop()
    finally:
        for reg in regs:
            await reg.stop()
        await discovery.stop()
