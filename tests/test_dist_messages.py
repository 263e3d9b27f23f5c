"""The NATS event bus: codec, stream tracking, the relay core, and a real nats-server round trip."""

from __future__ import annotations

import msgspec
import pytest

from kvgate.bus import Bus, connect_nats
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.indexer.nats_source import NatsEventSource, StreamTracker
from kvgate.indexer.pipeline import StreamPosition
from kvgate.protocol.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    RouterCleared,
    RouterRemoved,
    RouterStored,
    Tier,
    WorkerKey,
)
from kvgate.protocol.hashing import sequence_hashes
from kvgate.protocol.messages import (
    ActiveMessage,
    BusDecodeError,
    EventsMessage,
    LoadMessage,
    Subjects,
    decode_active,
    decode_events,
    decode_load,
    encode_active,
    encode_events,
    encode_load,
)
from kvgate.worker.sidecar.relay import EventRelay
from tests.helpers import until
from tests.servers import NatsServer

BIG = (1 << 64) - 1


def test_subjects_follow_the_architecture():
    s = Subjects("prod")
    assert s.events("w1") == "kvgate.prod.events.w1"
    assert s.load("w1") == "kvgate.prod.load.w1"
    assert s.active("gw-a") == "kvgate.prod.active.gw-a"
    assert s.all_events == "kvgate.prod.events.*"
    for bad in ("a.b", "a*", ">", "", "a b"):
        with pytest.raises(ValueError):
            s.events(bad)
    with pytest.raises(ValueError):
        Subjects("x.y")


def test_events_round_trip_keeps_every_event_and_u64_hashes():
    msg = EventsMessage(
        "w1",
        1,
        42,
        BIG,
        [
            RouterStored([0, 1, BIG], Tier.GPU),
            RouterRemoved([7], Tier.CPU),
            RouterCleared(),
            RouterStored([5], Tier.DISK),
        ],
        reset=True,
    )
    back = decode_events(encode_events(msg))
    assert back == msg
    assert back.key == WorkerKey("w1", 1)


def test_load_and_active_round_trip():
    load = LoadMessage(worker_id="w1", dp_rank=0, running=3, waiting=1, kv_usage=0.25, ts=1.5)
    assert decode_load(encode_load(load)) == load and load.capacity_tokens is None
    # The KV pool's size rides along when the sidecar's scrape found it; older sidecars omit it.
    sized = LoadMessage(worker_id="w1", running=3, waiting=1, kv_usage=0.25, ts=1.5, capacity_tokens=65_536)
    assert decode_load(encode_load(sized)).capacity_tokens == 65_536
    active = ActiveMessage(
        router_id="gw-a",
        op="add",
        request_id="r1",
        worker_id="w1",
        dp_rank=0,
        prompt_tokens=300,
        new_prefill_tokens=100,
        blocks=5,
        ts=2.0,
    )
    assert decode_active(encode_active(active)) == active
    assert decode_active(encode_active(ActiveMessage(router_id="gw-a", op="leave"))).op == "leave"


@pytest.mark.parametrize(
    "payload, kind",
    [
        (b"", "empty"),
        (b"\xc1", "not_msgpack"),
        (msgspec.msgpack.encode(["w1", 0, 1, 2, [[9, [1]]]]), "bad_shape"),  # unknown event tag
        (msgspec.msgpack.encode(["w1", 0, -1, 2, []]), "bad_shape"),  # negative seq
        (msgspec.msgpack.encode(["w.1", 0, 1, 2, []]), "bad_shape"),  # not a subject token
        (msgspec.msgpack.encode(["w1", 0, 1, 2, [[0, [-5], 0]]]), "bad_shape"),  # negative hash
        (msgspec.msgpack.encode(["w1", 0, 1, 2, [[0, [5], 3]]]), "bad_shape"),  # no such tier
        (msgspec.msgpack.encode({"worker_id": "w1"}), "bad_shape"),
    ],
)
def test_bad_event_payloads_raise_typed_errors(payload: bytes, kind: str):
    with pytest.raises(BusDecodeError) as err:
        decode_events(payload)
    assert err.value.kind == kind


def test_bad_load_and_active_payloads_raise_typed_errors():
    with pytest.raises(BusDecodeError):
        decode_load(msgspec.msgpack.encode({"worker_id": "w1", "running": 1, "waiting": 0, "kv_usage": 1.5, "ts": 0}))
    with pytest.raises(BusDecodeError):
        decode_load(
            msgspec.msgpack.encode(
                {"worker_id": "w1", "running": 1, "waiting": 0, "kv_usage": 0.5, "ts": 0, "capacity_tokens": 0}
            )
        )
    with pytest.raises(BusDecodeError):
        decode_active(msgspec.msgpack.encode({"router_id": "g", "op": "explode"}))


def msg(seq: int, epoch: int = 1, reset: bool = False, events=None, worker: str = "w1", rank: int = 0) -> EventsMessage:
    return EventsMessage(worker, rank, seq, epoch, events or [], reset)


def test_tracker_syncs_on_reset_and_detects_gaps_duplicates_and_new_sessions():
    t = StreamTracker(stale_after=5.0, resync_interval=1.0)
    # Joining mid-stream: applied best effort, but stale until a reset; resync asked once per interval.
    assert t.observe(msg(7), 0.0).request_resync
    assert not t.observe(msg(8), 0.5).request_resync
    assert not t.in_sync("w1")
    assert t.observe(msg(9), 1.2).request_resync
    v = t.observe(msg(10, reset=True), 1.3)
    assert v.apply and v.reset and t.in_sync("w1") and t.silent(1.3) == []
    assert t.observe(msg(11), 1.4) == t.observe(msg(12), 1.4)  # plain applies
    assert not t.observe(msg(12), 1.5).apply  # duplicate
    assert t.stats.duplicates == 1
    v = t.observe(msg(15), 1.6)  # gap: 13 and 14 were lost
    assert v.apply and v.request_resync and not t.in_sync("w1") and t.stats.gaps == 1
    t.observe(msg(16, reset=True), 1.7)
    assert t.in_sync("w1")
    # A restarted sidecar (new epoch) with seq 0 is not a duplicate; its reset resyncs.
    v = t.observe(msg(0, epoch=2, reset=True), 1.8)
    assert v.apply and v.reset and t.in_sync("w1") and t.stats.epochs_changed == 1
    # Silence makes a worker stale even in sync.
    assert t.silent(1.8 + 5.0) == [] and t.silent(1.8 + 5.1) == ["w1"]


def test_tracker_desync_all_after_a_consumer_reconnect():
    t = StreamTracker(resync_interval=1.0)
    t.observe(msg(0, reset=True), 0.0)
    t.observe(msg(0, reset=True, worker="w2"), 0.0)
    assert t.desync_all(5.0) == ["w1", "w2"] and not t.in_sync("w1")
    assert not t.observe(msg(1), 5.1).request_resync  # just asked; the reset will come
    assert t.observe(msg(2, reset=True), 5.2).reset and t.in_sync("w1")


def test_tracker_ignores_workers_it_does_not_accept_until_they_are_known():
    known: set[str] = set()
    t = StreamTracker(accept=known.__contains__)
    assert not t.observe(msg(0, reset=True), 0.0).apply
    known.add("w1")
    v = t.observe(msg(1), 0.1)  # accepted now, but its reset was missed: ask again
    assert v.apply and v.request_resync and not t.in_sync("w1")
    t.forget("w1")
    assert t.workers() == []


def stored(hashes, parent=None, tokens=None, medium=Tier.GPU, block_size=4) -> BlockStored:
    return BlockStored(hashes, parent, tokens if tokens is not None else [], block_size, medium=medium)


def test_relay_translates_numbers_mirrors_and_snapshots():
    out: list[EventsMessage] = []
    relay = EventRelay("w1", out.append, block_size=4, epoch=9, snapshot_chunk=2)
    tokens = list(range(12))
    router = sequence_hashes(tokens, 4)
    relay.apply_engine_batch("w1", 0, EventBatch(0.0, [stored([101, 102, 103], tokens=tokens)]))
    relay.apply_engine_batch("w1", 1, EventBatch(0.0, [stored([102], medium=Tier.CPU), BlockRemoved([103])]))
    assert [m.seq for m in out] == [0, 1] and all(m.epoch == 9 for m in out)
    assert out[0].events == [RouterStored(router, Tier.GPU)]
    assert out[1].events == [RouterStored([router[1]], Tier.CPU), RouterRemoved([router[2]], Tier.GPU)]
    assert relay.block_counts() == [(2, 1, 0)]

    out.clear()
    relay.snapshot()
    assert out[0].reset and not any(m.reset for m in out[1:])
    assert isinstance(out[0].events[0], RouterCleared)
    restated = {(h, e.tier) for m in out for e in m.events if isinstance(e, RouterStored) for h in e.hashes}
    assert restated == {(router[0], Tier.GPU), (router[1], Tier.GPU), (router[1], Tier.CPU)}
    assert relay.block_counts() == [(2, 1, 0)]  # a snapshot leaves the mirror as it was

    # The engine restarted (seq fell back): a clear for the rank, then the new state.
    out.clear()
    relay.apply_engine_batch("w1", 0, EventBatch(0.0, [stored([201], tokens=tokens[:4])]))
    assert [type(e) for m in out for e in m.events] == [RouterCleared, RouterStored]
    assert relay.block_counts() == [(1, 0, 0)] and relay.stats.restarts == 1
    out.clear()
    relay.apply_engine_batch("w1", 1, EventBatch(0.0, [AllBlocksCleared()]))
    assert out[0].events == [RouterCleared()] and relay.block_counts() == [(0, 0, 0)]


class Replays:
    """A ``ReplaySource`` that records (rank, from, to) and who the answer goes to."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, int, int]] = []
        self.answer_to: list[object] = []

    def request_replay(self, sink: object, worker_id: str, rank: int, from_seq: int, to_seq: int) -> None:
        self.asked.append((rank, from_seq, to_seq))
        self.answer_to.append(sink)


def test_relay_asks_for_replay_on_a_gap_and_applies_it_in_order():
    out: list[EventsMessage] = []
    replays = Replays()
    asked = replays.asked
    relay = EventRelay("w1", out.append, block_size=4, replay=replays)
    t = list(range(8))
    relay.apply_engine_batch("w1", 0, EventBatch(0.0, [stored([1], tokens=t[:4])]))
    relay.apply_engine_batch("w1", 2, EventBatch(0.0, [BlockRemoved([1])]))
    assert asked == [(0, 1, 2)] and len(out) == 1 and replays.answer_to == [relay]
    relay.apply_engine_batch("w1", 1, EventBatch(0.0, [stored([2], parent=1, tokens=t[4:])]), replayed=True)
    relay.replay_finished("w1", 0, True)
    kinds = [type(e) for m in out for e in m.events]
    assert kinds == [RouterStored, RouterStored, RouterRemoved]
    assert relay.block_counts() == [(1, 0, 0)]


def test_relay_engine_lost_starts_every_rank_over():
    out: list[EventsMessage] = []
    replays = Replays()
    relay = EventRelay("w1", out.append, block_size=4, dp_size=2, replay=replays)
    t = list(range(8))
    relay.apply_engine_batch("w1", 0, EventBatch(0.0, [stored([1], tokens=t[:4])]))
    relay.apply_engine_batch("w1", 3, EventBatch(0.0, [stored([2], parent=1, tokens=t[4:])]))  # gap: 1, 2
    assert replays.asked == [(0, 1, 3)] and relay.position("w1", 0) == StreamPosition(0, 0, 1)
    out.clear()
    relay.engine_lost()
    assert [m.events for m in out] == [[RouterCleared()], [RouterCleared()]] and relay.block_counts() == [(0, 0, 0)] * 2
    # The order starts over (a source's catch-up asks from seq 0 under a new generation);
    # the replay asked of the lost engine is still owed its answer.
    assert relay.position("w1", 0) == StreamPosition(-1, 1, 1) and relay.position("w1", 1) == StreamPosition(-1, 1, 0)
    out.clear()
    relay.apply_engine_batch("w1", 0, EventBatch(0.0, [stored([7], tokens=t[:4])]))
    relay.apply_engine_batch("w1", 2, EventBatch(0.0, [stored([8], parent=7, tokens=t[4:])]))  # gap: 1
    assert replays.asked == [(0, 1, 3), (0, 1, 2)]
    relay.replay_finished("w1", 0, False)  # the lost engine's answer: not the new replay's
    assert len(out) == 1 and relay.stats.replays_failed == 0
    relay.replay_finished("w1", 0, False)
    assert len(out) == 2 and relay.stats.replays_failed == 1 and relay.stats.restarts == 0
    assert relay.position("w9", 0) == relay.position("w1", 5) == StreamPosition(-1, 0, 0)


class StubBus:
    """The part of ``Bus`` a ``NatsEventSource`` uses, without a server."""

    def __init__(self) -> None:
        self.resyncs: list[str] = []

    async def on_events(self, callback: object) -> object:
        return object()

    async def unsubscribe(self, sub: object) -> None:
        return None

    async def request_resync(self, worker_id: str, requester: str) -> None:
        self.resyncs.append(worker_id)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_nats_source_trusts_a_worker_exactly_while_its_stream_is_in_sync_and_heard():
    known = {"w1", "w2"}
    indexer, clock, bus = KvIndexer(block_size=4), Clock(), StubBus()
    source = NatsEventSource(bus, indexer, stale_after=5.0, accept=known.__contains__, clock=clock)  # type: ignore[arg-type]
    h = sequence_hashes(list(range(8)), 4)
    w1 = WorkerKey("w1")

    def matched() -> bool:
        return w1 in indexer.find_matches(h)

    source.handle(msg(0, reset=True, events=[RouterCleared(), RouterStored(h)]))
    assert indexer.trusted("w1") and matched()
    source.handle(msg(1))
    assert indexer.trusted("w1")
    # A lost message: the stream is out of sync, its blocks stay indexed but are not matched.
    source.handle(msg(3, events=[RouterStored(h[:1], Tier.CPU)]))
    assert not indexer.trusted("w1") and not matched() and indexer.block_counts()[w1] == (2, 1, 0)
    source.handle(msg(3))  # a duplicate changes nothing
    assert not indexer.trusted("w1")
    await until(lambda: bus.resyncs == ["w1"], what="resync asked")
    source.handle(msg(4, reset=True, events=[RouterCleared(), RouterStored(h)]))
    assert indexer.trusted("w1") and matched()

    # Silence: nothing arrives to say so, the sweep does; the next in-order message restores it.
    clock.now = 5.0
    source.sweep()
    assert indexer.trusted("w1")
    clock.now = 5.1
    source.sweep()
    assert not indexer.trusted("w1") and not matched()
    source.handle(msg(5))
    assert indexer.trusted("w1") and matched()

    # A new sidecar session without its reset, then with it.
    source.handle(msg(0, epoch=2))
    assert not indexer.trusted("w1")
    source.handle(msg(1, epoch=2, reset=True, events=[RouterCleared(), RouterStored(h)]))
    assert indexer.trusted("w1")

    # This consumer reconnected: nobody is trusted until restated.
    source.handle(msg(0, reset=True, worker="w2"))
    await source.resync_all()
    assert not indexer.trusted("w1") and not indexer.trusted("w2")
    source.handle(msg(2, epoch=2, reset=True, events=[RouterCleared(), RouterStored(h)]))
    assert indexer.trusted("w1") and not indexer.trusted("w2")

    # A worker discovery does not know is never applied, nor marked in the index.
    source.handle(msg(0, worker="ghost", events=[RouterStored(h)]))
    source.handle(msg(3, worker="ghost"))
    assert indexer.trusted("ghost") and WorkerKey("ghost") not in indexer.block_counts()
    await source.stop()


async def test_nats_source_sweeps_silent_streams_on_its_own():
    indexer, bus = KvIndexer(block_size=4), StubBus()
    source = NatsEventSource(bus, indexer, stale_after=0.2)  # type: ignore[arg-type]
    await source.start()
    try:
        source.handle(msg(0, reset=True))
        assert indexer.trusted("w1")
        took = await until(lambda: not indexer.trusted("w1"), timeout=5, what="silent stream distrusted")
        assert took >= 0.2
    finally:
        await source.stop()


@pytest.mark.slow
@pytest.mark.integration
async def test_nats_round_trip_feeds_an_indexer_and_survives_bad_payloads(nats_server: NatsServer):
    publisher = await connect_nats(nats_server.url, name="test-pub")
    consumer = await connect_nats(nats_server.url, name="test-sub")
    try:
        indexer = KvIndexer(block_size=4)
        source = NatsEventSource(Bus(consumer, "t"), indexer, resync_interval=0.05)
        await source.start()
        loads: list[LoadMessage] = []
        consumer_bus = Bus(consumer, "t")
        await consumer_bus.on_load(loads.append)
        resyncs: list[str] = []
        pub_bus = Bus(publisher, "t")
        await pub_bus.on_resync("w1", lambda r: resyncs.append(r.requester))
        await consumer.flush()

        h = sequence_hashes(list(range(8)), 4)
        await publisher.publish("kvgate.t.events.w1", b"\x00garbage")
        await pub_bus.publish_events(EventsMessage("w1", 0, 0, 5, [RouterCleared()], reset=True))
        await pub_bus.publish_events(EventsMessage("w1", 0, 1, 5, [RouterStored(h)]))
        await pub_bus.publish_load(LoadMessage(worker_id="w1", running=2, waiting=0, kv_usage=0.5, ts=1.0))
        await publisher.flush()
        await until(lambda: indexer.find_matches(h).get(WorkerKey("w1")) is not None and loads, what="events applied")
        assert indexer.find_matches(h)[WorkerKey("w1")].depth == 2
        assert consumer_bus.rejected == {} and sum(source.bus.rejected.values()) == 1
        assert indexer.trusted("w1")
        # A lost message (seq 2) -> the consumer asks the worker's sidecar for a resync.
        await pub_bus.publish_events(EventsMessage("w1", 0, 3, 5, [RouterRemoved([h[1]])]))
        await until(lambda: resyncs, what="resync requested")
        assert not indexer.trusted("w1")
        await pub_bus.publish_events(EventsMessage("w1", 0, 4, 5, [RouterCleared(), RouterStored(h[:1])], reset=True))
        await until(lambda: indexer.trusted("w1"), what="back in sync")
        assert indexer.find_matches(h)[WorkerKey("w1")].depth == 1
        await source.stop()
    finally:
        await publisher.close()
        await consumer.close()


async def test_nats_source_drops_events_naming_a_rank_the_worker_does_not_have():
    indexer, bus = KvIndexer(block_size=4), StubBus()
    source = NatsEventSource(bus, indexer, accept={"w1"}.__contains__, ranks=lambda worker_id: 1)  # type: ignore[arg-type]
    h = sequence_hashes(list(range(8)), 4)
    source.handle(msg(0, reset=True, events=[RouterCleared(), RouterStored(h)]))
    forged = EventsMessage("w1", 3, 1, 1, [RouterStored(h)])
    source.handle(forged)
    assert source.stats.bad_ranks == 1
    # No index state (nor metric series) for a rank nothing would ever remove.
    assert indexer.keys() == [WorkerKey("w1")] and WorkerKey("w1", 3) not in indexer.find_matches(h)
