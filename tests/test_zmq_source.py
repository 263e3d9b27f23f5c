"""indexer.sources: real ZMQ sockets on loopback -> ZmqEventSource -> a real KvIndexer.

The test publisher follows vLLM's ZmqEventPublisher: multipart (topic, seq, payload) on a
PUB socket — an XPUB here, which is a PUB that also reports subscriptions, so a test can
wait for the subscriber instead of sleeping — and a ROUTER replay socket serving its
buffer from a start seq, then seq -1. Catch-up is off in the rig unless a test turns it
on: the gap tests count the replay requests the publisher receives.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from kvgate.dev.launch import free_port
from kvgate.indexer.index import Match
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.indexer.zmq_source import ReplayDispatcher, ZmqEventSource, ZmqSourceConfig, rank_endpoint
from kvgate.protocol.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Tier, WorkerKey
from kvgate.protocol.hashing import sequence_hashes
from kvgate.protocol.wire import (
    REPLAY_END_SEQ,
    decode_replay_request,
    encode_batch,
    encode_frames,
    encode_replay_reply,
)
from tests.helpers import until

BS = 64
FIXTURES = Path(__file__).parent / "fixtures" / "kv_events"


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def tokens(first: int, blocks: int) -> list[int]:
    return list(range(first, first + blocks * BS))


def store(engine_hashes: list[int], first: int, parent: int | None = None) -> EventBatch:
    return EventBatch(1.0, [BlockStored(engine_hashes, parent, tokens(first, len(engine_hashes)), BS)], None)


class Publisher:
    """One engine rank's publisher on real sockets, following vLLM's protocol."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        port: int,
        replay_port: int | None = None,
        topic: bytes = b"",
        *,
        answer_replays: bool = True,
    ) -> None:
        self.ctx, self.port, self.replay_port, self.topic = ctx, port, replay_port, topic
        self.answer_replays = answer_replays
        # Awaited between receiving a replay request and answering it: what the engine
        # does meanwhile (a test sets it).
        self.before_reply: Callable[[], Awaitable[None]] | None = None
        self.buffer: dict[int, bytes] = {}
        self.replay_requests: list[int] = []
        self.next_seq = 0
        self._pub: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._server: asyncio.Task[None] | None = None

    def bind(self) -> None:
        self._pub = self._bound(zmq.XPUB, self.port)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # one subscription message per subscriber
        if self.replay_port is not None:
            self._router = self._bound(zmq.ROUTER, self.replay_port)
            self._server = asyncio.get_running_loop().create_task(self._serve())

    def _bound(self, kind: int, port: int) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        # ZMQ releases a closed socket's port in its I/O thread, a moment after close():
        # a restarted publisher retries like a restarted engine would.
        for _ in range(100):
            try:
                sock.bind(tcp(port))
                return sock
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE:
                    raise
                time.sleep(0.05)
        sock.bind(tcp(port))
        return sock

    async def subscribed(self, timeout: float = 10.0) -> None:
        """Wait until a subscriber's subscription has reached this socket."""
        assert self._pub is not None
        while True:
            msg = await asyncio.wait_for(self._pub.recv(), timeout)
            if msg[:1] == b"\x01":
                return

    async def publish(
        self, batch: EventBatch, *, live: bool = True, encoding: str = "map", topic: bytes | None = None
    ) -> int:
        seq = self.next_seq
        self.next_seq += 1
        payload = encode_batch(batch, encoding)
        self.buffer[seq] = payload
        if live:
            await self.send([*encode_frames(self.topic if topic is None else topic, seq, payload)])
        return seq

    async def send(self, frames: list[bytes]) -> None:
        assert self._pub is not None
        await self._pub.send_multipart(frames)

    async def _serve(self) -> None:
        assert self._router is not None
        while True:
            identity, start = decode_replay_request(await self._router.recv_multipart())
            self.replay_requests.append(start)
            if not self.answer_replays:
                continue
            if self.before_reply is not None:
                await self.before_reply()
            for seq in sorted(self.buffer):
                if seq >= start:
                    await self._router.send_multipart([identity, *encode_replay_reply(seq, self.buffer[seq])])
            await self._router.send_multipart([identity, *encode_replay_reply(REPLAY_END_SEQ)])

    async def close(self) -> None:
        if self._server is not None:
            self._server.cancel()
            await asyncio.gather(self._server, return_exceptions=True)
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)


@pytest.fixture
async def ctx():
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def rig(ctx):
    """A KvIndexer built with a ReplayDispatcher, plus cleanup of whatever a test starts."""
    indexer = replayed_indexer()
    started: list[ZmqEventSource | Publisher] = []

    def source(
        worker_id: str,
        port: int,
        replay_port: int | None = None,
        *,
        into: KvIndexer | None = None,
        config: ZmqSourceConfig | None = None,
        **kw,
    ) -> ZmqEventSource:
        """A started source feeding ``into`` (default: the rig's indexer), catch-up off by default."""
        into = indexer if into is None else into
        assert isinstance(into.replay, ReplayDispatcher), "build it with replayed_indexer()"
        src = ZmqEventSource(
            worker_id,
            tcp(port),
            None if replay_port is None else tcp(replay_port),
            into,
            context=ctx,
            config=config or ZmqSourceConfig(catch_up_interval=0),
            **kw,
        )
        into.replay.add(src)
        src.start()
        started.append(src)
        return src

    def publisher(port: int, replay_port: int | None = None, **kw) -> Publisher:
        pub = Publisher(ctx, port, replay_port, **kw)
        pub.bind()
        started.append(pub)
        return pub

    yield indexer, source, publisher
    for thing in reversed(started):
        await (thing.stop() if isinstance(thing, ZmqEventSource) else thing.close())


async def first_batch_applied(rig) -> tuple[ZmqEventSource, Publisher]:
    """A source for w1 and its publisher, connected, one batch (seq 0) published and applied."""
    _, source, publisher = rig
    port = free_port()
    src = source("w1", port)
    pub = publisher(port)
    await pub.subscribed()
    await pub.publish(store([1], 0))
    await until(lambda: src.stats.batches_applied == 1, "first batch")
    return src, pub


def replayed_indexer() -> KvIndexer:
    """An indexer whose gaps are asked of the sources a test adds to its ReplayDispatcher."""
    return KvIndexer(block_size=BS, replay=ReplayDispatcher())


def depth(indexer: KvIndexer, key: WorkerKey, token_ids: list[int]) -> int:
    return indexer.find_matches(sequence_hashes(token_ids, BS)).get(key, Match()).depth


# --- end to end -----------------------------------------------------------------------


async def test_published_events_reach_the_index(rig):
    indexer, source, publisher = rig
    port = free_port()
    src = source("w1", port)
    pub = publisher(port)
    await pub.subscribed()
    prompt = tokens(1000, 3)
    await pub.publish(store([11, 12], 1000))
    await pub.publish(store([13], 1000 + 2 * BS, parent=12), encoding="array")
    key = WorkerKey("w1", 0)
    await until(lambda: depth(indexer, key, prompt) == 3, "3 blocks indexed")
    assert indexer.find_matches(sequence_hashes(prompt, BS))[key].per_tier == [3, 0, 0]

    await pub.publish(
        EventBatch(2.0, [BlockStored([12, 13], None, [], BS, medium=Tier.CPU), BlockRemoved([13], Tier.GPU)], 0)
    )
    await until(
        lambda: indexer.find_matches(sequence_hashes(prompt, BS))[key].per_tier == [2, 1, 0], "block 13 moved to CPU"
    )
    await pub.publish(EventBatch(3.0, [BlockRemoved([12, 13], Tier.CPU), BlockRemoved([12], Tier.GPU)], 0))
    await until(lambda: depth(indexer, key, prompt) == 1, "removals applied")
    await pub.publish(EventBatch(4.0, [AllBlocksCleared()], 0))
    await until(lambda: depth(indexer, key, prompt) == 0, "cleared")
    assert src.stats.frames_received == src.stats.batches_applied == 5
    assert not src.stats.rejected and indexer.stats.gaps == 0


async def test_golden_fixture_payloads_are_indexed(rig):
    indexer, source, publisher = rig
    port = free_port()
    src = source("w1", port, dp_size=2)  # vllm_tagged_map names rank 1: the worker has two
    pub = publisher(port)
    await pub.subscribed()
    for seq, name in enumerate(["vllm_tagged_map.msgpack", "vllm_legacy_array.msgpack"]):
        await pub.send(encode_frames(b"", seq, (FIXTURES / name).read_bytes()))
    await until(lambda: src.stats.batches_applied == 2, "both fixtures applied")
    # vllm_tagged_map is rank 1 (2 blocks stored, 1 removed); vllm_legacy_array rank 0.
    assert indexer.block_counts()[WorkerKey("w1", 1)] == (1, 0, 0)
    assert indexer.block_counts()[WorkerKey("w1", 0)] == (2, 0, 0)


async def test_source_started_before_the_publisher_catches_up(rig):
    indexer, source, publisher = rig
    port = free_port()
    source("w1", port)
    await asyncio.sleep(0.3)  # the engine is not up yet: the source keeps reconnecting
    pub = publisher(port)
    await pub.subscribed()
    await pub.publish(store([1], 0))
    await until(lambda: depth(indexer, WorkerKey("w1"), tokens(0, 1)) == 1, "indexed after late start")


async def test_topic_filters_other_publications(rig):
    indexer, source, publisher = rig
    port = free_port()
    src = source("w1", port, topic=b"kv@w1")
    pub = publisher(port, topic=b"kv@w1")
    await pub.subscribed()
    await pub.publish(store([1], 0), topic=b"other")
    pub.next_seq = 0
    await pub.publish(store([2], 5000))
    await until(lambda: src.stats.frames_received >= 1, "one frame")
    await until(lambda: depth(indexer, WorkerKey("w1"), tokens(5000, 1)) == 1, "topic batch indexed")
    assert src.stats.frames_received == 1
    assert depth(indexer, WorkerKey("w1"), tokens(0, 1)) == 0


# --- bad input ------------------------------------------------------------------------


async def test_garbage_is_counted_and_the_source_keeps_going(rig):
    indexer, source, publisher = rig
    port = free_port()
    src = source("w1", port)
    pub = publisher(port)
    await pub.subscribed()
    await pub.send([b"just one frame"])
    await pub.send([b"", b"\x00\x01", b"short seq"])
    await pub.send([b"", b"\x00" * 8, b"\xc1 not msgpack"])
    await pub.send([b"", b"\x00" * 8, (FIXTURES / "bad_unknown_event_tag.msgpack").read_bytes()])
    await pub.send([b"", b"\x00" * 8, (FIXTURES / "bad_token_count_mismatch.msgpack").read_bytes()])
    await pub.send([b"", b"\x00" * 8, b""])
    await pub.publish(store([1, 2], 0))
    await until(lambda: src.stats.batches_applied == 1, "valid batch applied after garbage")
    want = {"bad_frames": 2, "not_msgpack": 1, "unknown_event": 1, "token_count_mismatch": 1, "empty": 1}
    assert src.stats.frames_received == 7
    assert dict(src.stats.rejected) == want
    assert {k: indexer.stats.rejected[k] for k in want} == want
    assert depth(indexer, WorkerKey("w1"), tokens(0, 2)) == 2


async def test_an_indexer_failure_is_counted_not_fatal(rig, ctx):
    class Exploding(KvIndexer):
        def apply_engine_batch(self, worker_id, seq, batch, *, replayed=False):
            if seq == 0:
                raise RuntimeError("boom")
            super().apply_engine_batch(worker_id, seq, batch, replayed=replayed)

    _, _, publisher = rig
    port = free_port()
    indexer = Exploding(block_size=BS)
    src = ZmqEventSource("w1", tcp(port), None, indexer, context=ctx)
    src.start()
    try:
        pub = publisher(port)
        await pub.subscribed()
        await pub.publish(store([1], 0))
        await pub.publish(store([2], 7000))
        await until(lambda: depth(indexer, WorkerKey("w1"), tokens(7000, 1)) == 1, "second batch applied")
        assert src.stats.indexer_errors == 1 and src.stats.batches_applied == 1
    finally:
        await src.stop()


# --- restarts and gaps ----------------------------------------------------------------


async def test_publisher_restart_resets_the_worker(rig):
    indexer, source, publisher = rig
    port = free_port()
    src = source("w1", port)
    pub = publisher(port)
    await pub.subscribed()
    for i in range(3):
        await pub.publish(store([100 + i], 10_000 * (i + 1)))
    key = WorkerKey("w1")
    await until(lambda: indexer.block_counts().get(key) == (3, 0, 0), "3 blocks before restart")
    await pub.close()

    restarted = publisher(port)  # a new engine process: seq starts again at 0
    await restarted.subscribed()
    await restarted.publish(store([7], 90_000))
    await until(lambda: indexer.stats.restarts == 1, "restart detected")
    await until(lambda: indexer.block_counts().get(key) == (1, 0, 0), "old blocks dropped")
    assert depth(indexer, key, tokens(90_000, 1)) == 1
    assert depth(indexer, key, tokens(10_000, 1)) == 0
    assert src.stats.frames_received == 4 and not src.stats.rejected


async def test_gap_is_filled_from_the_replay_socket(rig):
    indexer, source, publisher = rig
    port, replay_port = free_port(), free_port()
    src = source("w1", port, replay_port)
    pub = publisher(port, replay_port)
    await pub.subscribed()
    prompt = tokens(0, 4)
    await pub.publish(store([1], 0))
    await pub.publish(store([2], BS, parent=1), live=False)  # lost on the way
    await pub.publish(store([3], 2 * BS, parent=2), live=False, encoding="array")
    await pub.publish(store([4], 3 * BS, parent=3))
    key = WorkerKey("w1")
    await until(lambda: depth(indexer, key, prompt) == 4, "gap replayed and live batch flushed")
    assert pub.replay_requests == [1]
    assert src.stats.batches_replayed == 2 and src.stats.replays_ok == 1 and src.stats.replays_failed == 0
    assert indexer.stats.gaps == 1 and indexer.stats.replays_failed == 0 and indexer.stats.unknown_parent == 0


async def test_unanswered_replay_times_out_and_live_events_continue(rig):
    indexer, source, publisher = rig
    port, replay_port = free_port(), free_port()
    src = source("w1", port, replay_port, config=ZmqSourceConfig(replay_timeout=0.2, catch_up_interval=0))
    pub = publisher(port, replay_port, answer_replays=False)
    await pub.subscribed()
    await pub.publish(store([1], 0))
    await pub.publish(store([2], 5000), live=False)
    await pub.publish(store([3], 9000))
    key = WorkerKey("w1")
    await until(lambda: depth(indexer, key, tokens(9000, 1)) == 1, "live batch applied after the failed replay")
    assert pub.replay_requests == [1]
    assert src.stats.replays_failed == 1 and indexer.stats.replays_failed == 1
    assert depth(indexer, key, tokens(5000, 1)) == 0


async def test_replay_missing_part_of_the_range_fails_but_applies_what_it_can(rig):
    indexer, source, publisher = rig
    port, replay_port = free_port(), free_port()
    src = source("w1", port, replay_port)
    pub = publisher(port, replay_port)
    await pub.subscribed()
    await pub.publish(store([1], 0))
    await pub.publish(store([2], 5000), live=False)
    await pub.publish(store([3], 9000), live=False)
    del pub.buffer[2]  # fell out of the engine's replay buffer
    await pub.publish(store([4], 13000))
    key = WorkerKey("w1")
    await until(lambda: src.stats.replays_failed == 1, "replay reported incomplete")
    await until(lambda: depth(indexer, key, tokens(13000, 1)) == 1, "live batch applied")
    assert depth(indexer, key, tokens(5000, 1)) == 1 and depth(indexer, key, tokens(9000, 1)) == 0
    assert src.stats.batches_replayed == 1


async def test_no_replay_endpoint_answers_failure(rig):
    indexer = rig[0]
    src, pub = await first_batch_applied(rig)
    pub.next_seq = 5
    await pub.publish(store([2], 5000))
    await until(lambda: depth(indexer, WorkerKey("w1"), tokens(5000, 1)) == 1, "batch after the gap applied")
    assert src.stats.replays_failed == 1 and indexer.stats.gaps == 1


async def test_dispatcher_routes_replays_to_the_right_worker(rig):
    indexer, source, publisher = rig
    ports = {w: (free_port(), free_port()) for w in ("a", "b")}
    sources = {w: source(w, *ports[w]) for w in ports}
    pubs = {w: publisher(*ports[w]) for w in ports}
    for pub in pubs.values():
        await pub.subscribed()
    for pub in pubs.values():
        await pub.publish(store([1], 0))
    await pubs["b"].publish(store([2], 4000), live=False)
    await pubs["b"].publish(store([3], 8000))
    await until(lambda: depth(indexer, WorkerKey("b"), tokens(4000, 1)) == 1, "b's gap replayed")
    assert pubs["a"].replay_requests == [] and pubs["b"].replay_requests == [1]
    assert sources["a"].stats.replays_ok == 0 and sources["b"].stats.replays_ok == 1


async def test_dispatcher_answers_for_a_worker_without_source():
    indexer = KvIndexer(block_size=BS, replay=ReplayDispatcher())
    indexer.apply_engine_batch("ghost", 0, store([1], 0))
    indexer.apply_engine_batch("ghost", 3, store([2], 4000))
    assert depth(indexer, WorkerKey("ghost"), tokens(4000, 1)) == 0  # held behind the replay
    await until(lambda: indexer.stats.replays_failed == 1, "failure answered")
    assert depth(indexer, WorkerKey("ghost"), tokens(4000, 1)) == 1


async def test_stop_answers_a_replay_in_flight(rig, ctx):
    indexer, _, publisher = rig
    port, replay_port = free_port(), free_port()
    src = ZmqEventSource(
        "w1",
        tcp(port),
        tcp(replay_port),
        indexer,
        context=ctx,
        config=ZmqSourceConfig(replay_timeout=60, catch_up_interval=0),
    )
    indexer.replay.add(src)
    src.start()
    pub = publisher(port, replay_port, answer_replays=False)
    await pub.subscribed()
    await pub.publish(store([1], 0))
    await pub.publish(store([2], 4000), live=False)
    await pub.publish(store([3], 8000))
    await until(lambda: pub.replay_requests == [1], "replay asked")
    await src.stop()
    assert src.stats.replays_failed == 1 and indexer.stats.replays_failed == 1
    assert depth(indexer, WorkerKey("w1"), tokens(8000, 1)) == 1


# --- data-parallel ranks --------------------------------------------------------------


def consecutive_free_ports() -> int:
    """A port p such that p and p + 1 are both free (vLLM puts rank r on port + r)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def test_rank_endpoint_follows_vllm():
    assert rank_endpoint("tcp://127.0.0.1:5557", 0) == "tcp://127.0.0.1:5557"
    assert rank_endpoint("tcp://127.0.0.1:5557", 2) == "tcp://127.0.0.1:5559"
    assert rank_endpoint("ipc:///tmp/kv", 1) == "ipc:///tmp/kv_dp1"


async def test_each_rank_has_its_own_socket_and_replay(rig):
    indexer, source, publisher = rig
    port, replay_port = consecutive_free_ports(), consecutive_free_ports()
    src = source("w1", port, replay_port, dp_size=2)
    rank0, rank1 = publisher(port, replay_port), publisher(port + 1, replay_port + 1)
    await rank0.subscribed()
    await rank1.subscribed()
    await rank0.publish(store([1], 0))
    await rank1.publish(store([1], 0))  # no rank in the batch: the socket says rank 1
    await rank1.publish(store([2], 3000), live=False)
    await rank1.publish(store([3], 6000))
    await until(lambda: indexer.block_counts().get(WorkerKey("w1", 1)) == (3, 0, 0), "rank 1 complete")
    assert indexer.block_counts()[WorkerKey("w1", 0)] == (1, 0, 0)
    assert rank0.replay_requests == [] and rank1.replay_requests == [1]
    assert src.stats.replays_ok == 1


# --- catch-up -------------------------------------------------------------------------

CATCH_UP = ZmqSourceConfig(catch_up_interval=0.05)


async def test_catch_up_fetches_what_was_published_before_the_subscriber_connected(rig):
    """The engine's only batch went to nobody and the engine stays idle: catch-up fetches
    it; a source with catch-up off, or without a replay endpoint, never learns of it."""
    indexer, source, publisher = rig
    port, replay_port = free_port(), free_port()
    pub = publisher(port, replay_port)
    await pub.publish(store([1, 2], 0))  # no subscriber yet: the PUB socket drops it
    off, blind = replayed_indexer(), replayed_indexer()
    src = source("w1", port, replay_port, config=CATCH_UP)
    off_src = source("w1", port, replay_port, into=off, config=ZmqSourceConfig(catch_up_interval=0))
    blind_src = source("w1", port, into=blind, config=CATCH_UP)
    for _ in range(3):
        await pub.subscribed()
    key, prompt = WorkerKey("w1"), tokens(0, 2)
    await until(lambda: depth(indexer, key, prompt) == 2, "the missed batch caught up")
    assert pub.replay_requests[0] == 0 and src.stats.caught_up == 1

    asked = src.stats.catch_ups
    await until(lambda: src.stats.catch_ups >= asked + 3 and len(pub.replay_requests) >= 3, "more rounds")
    # Nothing more was missed: each later round asks from seq 1 and gets the end marker only.
    assert set(pub.replay_requests[1:]) == {1} and src.stats.caught_up == 1
    assert indexer.stats.gaps == indexer.stats.restarts == indexer.stats.duplicates == 0
    assert off.block_counts() == {} and blind.block_counts() == {}
    assert off_src.stats.catch_ups == blind_src.stats.catch_ups == 0


async def test_a_quiet_rank_is_asked_less_often_until_its_worker_is_busy_again(rig):
    """Asks that find nothing double the wait, up to CATCH_UP_MAX_BACKOFF intervals; a
    request sent to the worker, or a live batch, brings the asks back to every interval."""
    indexer, source, publisher = rig
    port, replay_port = free_port(), free_port()
    pub = publisher(port, replay_port)
    src = source("w1", port, replay_port, config=CATCH_UP)
    await pub.subscribed()
    await asyncio.sleep(1.2)  # 24 intervals, nothing to catch up
    # Asked after 1, 2, 4, 8, 8 intervals (not at each of the 24).
    assert 3 <= src.stats.catch_ups <= 7, src.stats.catch_ups
    asked = src.stats.catch_ups
    src.activity()
    await asyncio.sleep(0.23)
    assert src.stats.catch_ups >= asked + 2  # after 1 and 2 intervals again
    await asyncio.sleep(0.8)
    asked = src.stats.catch_ups
    src.engine_lost()  # "catch up at the next tick", backed off or not
    await asyncio.sleep(0.08)
    assert src.stats.catch_ups >= asked + 1
    await asyncio.sleep(0.8)
    asked = src.stats.catch_ups
    await pub.publish(store([1], 0))
    await until(lambda: src.stats.batches_applied == 1, "a live batch")
    await asyncio.sleep(0.18)
    assert src.stats.catch_ups >= asked + 1


async def test_catch_up_skips_what_the_live_socket_delivered_during_the_fetch(rig):
    """Offered again, a batch the live socket delivered while the catch-up's request was
    out would read as an engine restart and drop the worker's blocks."""
    indexer, source, publisher = rig
    port, replay_port = free_port(), free_port()
    pub = publisher(port, replay_port)
    src = source("w1", port, replay_port, config=CATCH_UP)
    await pub.subscribed()
    await pub.publish(store([1], 0))
    key = WorkerKey("w1")
    await until(lambda: depth(indexer, key, tokens(0, 1)) == 1, "seq 0 applied")
    racing: list[int] = []

    async def publish_first() -> None:
        pub.before_reply = None
        racing.append(src.stats.catch_ups)
        await pub.publish(store([2], BS, parent=1))
        await until(lambda: src.stats.batches_applied == 2, "seq 1 applied live")  # then the reply has it

    pub.before_reply = publish_first
    await until(lambda: racing and src.stats.catch_ups > racing[0], "the racing catch-up done, another began")
    assert indexer.stats.restarts == indexer.stats.duplicates == indexer.stats.gaps == 0
    assert indexer.stats.events_applied == 2 and indexer.block_counts() == {key: (2, 0, 0)}
    assert src.stats.caught_up == 0


async def test_a_live_batch_the_catch_up_already_applied_is_skipped(rig):
    """The same batch over the SUB socket after a catch-up applied it is a late copy, not an
    engine restart; a batch of the same seq with other bytes is a restarted engine."""
    indexer, source, publisher = rig
    port, replay_port = free_port(), free_port()
    pub = publisher(port, replay_port)
    await pub.publish(store([1], 0), live=False)
    src = source("w1", port, replay_port, config=CATCH_UP)
    await pub.subscribed()
    key = WorkerKey("w1")
    await until(lambda: src.stats.caught_up == 1, "seq 0 caught up")
    await pub.send(encode_frames(b"", 0, pub.buffer[0]))  # the copy that was still on its way
    await until(lambda: src.stats.late_duplicates == 1, "late copy skipped")
    assert indexer.stats.restarts == 0 and indexer.block_counts() == {key: (1, 0, 0)}

    await pub.send(encode_frames(b"", 0, encode_batch(store([9], 7000))))  # a new engine's seq 0
    await until(lambda: indexer.stats.restarts == 1, "restart detected")
    assert depth(indexer, key, tokens(7000, 1)) == 1 and depth(indexer, key, tokens(0, 1)) == 0


async def test_catch_up_waits_while_a_gap_replay_is_in_flight(rig):
    class Recording(KvIndexer):
        """Notes the source's catch-up count when a replay is asked for and when it ends."""

        def __init__(self) -> None:
            super().__init__(block_size=BS, replay=ReplayDispatcher())
            self.seen: list[int] = []

        def apply_engine_batch(self, worker_id, seq, batch, *, replayed=False):
            asked = self.stats.replays_requested
            super().apply_engine_batch(worker_id, seq, batch, replayed=replayed)
            if self.stats.replays_requested > asked:
                self.seen.append(src.stats.catch_ups)

        def replay_finished(self, worker_id, rank, ok):
            self.seen.append(src.stats.catch_ups)
            super().replay_finished(worker_id, rank, ok)

    _, source, publisher = rig
    indexer = Recording()
    port, replay_port = free_port(), free_port()
    pub = publisher(port, replay_port, answer_replays=False)  # every request runs into the timeout
    src = source(
        "w1", port, replay_port, into=indexer, config=ZmqSourceConfig(catch_up_interval=0.02, replay_timeout=0.3)
    )
    await pub.subscribed()
    await pub.publish(store([1], 0))
    await pub.publish(store([2], 5000), live=False)
    await pub.publish(store([3], 9000))
    await until(lambda: len(indexer.seen) == 2, "gap replay asked and given up")
    assert indexer.seen[0] == indexer.seen[1]  # 15 ticks went by, none asked during the replay
    assert 1 in pub.replay_requests and src.stats.replays_failed == 1
    await until(lambda: src.stats.catch_ups > indexer.seen[1], "catch-up resumes after the replay")


def test_catch_up_interval_is_checked():
    with pytest.raises(ValueError, match="catch_up_interval"):
        ZmqSourceConfig(catch_up_interval=-1)
    with pytest.raises(ValueError, match="replay_timeout"):
        ZmqSourceConfig(replay_timeout=0)


# --- events at the edges ----------------------------------------------------------------


async def test_a_batch_naming_a_rank_the_worker_does_not_have_is_rejected(rig):
    indexer, source, publisher = rig
    port = free_port()
    pub = publisher(port)
    src = source("w1", port)
    await pub.subscribed()
    bad = store([1], 0)
    bad.data_parallel_rank = 5  # the worker has one rank
    await pub.publish(bad)
    await pub.publish(store([2], 0))
    await until(lambda: src.stats.batches_applied == 1, "the good batch applied")
    assert src.stats.rejected["bad_rank"] == 1 and indexer.stats.rejected["bad_rank"] == 1
    assert indexer.keys() == [WorkerKey("w1")]  # no state for rank 5, nothing left to clean up


async def test_the_last_possible_seq_does_not_stop_the_catch_up(rig):
    """seq 2**64 - 1 leaves nothing to ask for after it: the catch-up skips the rank instead of
    dying on an unencodable request, and keeps serving the engine that restarts after it."""
    indexer, source, publisher = rig
    port, replay_port = free_port(), free_port()
    pub = publisher(port, replay_port)
    src = source("w1", port, replay_port, config=CATCH_UP)
    await pub.subscribed()
    pub.next_seq = 2**64 - 1
    await pub.publish(store([1], 0))
    key = WorkerKey("w1")
    await until(lambda: depth(indexer, key, tokens(0, 1)) == 1, "the last seq applied")
    asked = len(pub.replay_requests)
    await asyncio.sleep(0.3)  # several catch-up ticks
    assert len(pub.replay_requests) == asked and src.stats.catch_up_errors == 0
    # The engine restarts: its seq 0 goes to nobody, seq 1 arrives live and reads as a restart,
    # whose replay from 0 fetches the rest.
    pub.next_seq = 0
    await pub.publish(store([7], 4 * BS), live=False)
    await pub.publish(store([8], 8 * BS))
    await until(lambda: depth(indexer, key, tokens(8 * BS, 1)) == 1, "the restarted engine's batch")
    await until(lambda: depth(indexer, key, tokens(4 * BS, 1)) == 1, "its first batch, by replay")
    assert indexer.stats.restarts == 1 and depth(indexer, key, tokens(0, 1)) == 0
    # ...and the catch-up keeps asking from there.
    asked = len(pub.replay_requests)
    await until(lambda: len(pub.replay_requests) > asked, "another catch-up round")


async def test_a_batch_too_large_to_apply_without_stalling_the_loop_is_rejected(rig):
    indexer, source, publisher = rig
    port = free_port()
    pub = publisher(port)
    src = source("w1", port, config=ZmqSourceConfig(catch_up_interval=0, max_batch_blocks=1000))
    await pub.subscribed()
    # Encoded before the clock starts: what is timed is the gateway's side only.
    flood = encode_batch(EventBatch(1.0, [BlockRemoved([h]) for h in range(100_000)], None))
    many = encode_batch(EventBatch(1.0, [BlockRemoved([h]) for h in range(1001)], None))
    loop = asyncio.get_running_loop()
    longest, last = 0.0, loop.time()

    async def ticker() -> None:
        nonlocal longest, last
        while True:
            await asyncio.sleep(0.005)
            now = loop.time()
            longest, last = max(longest, now - last), now

    tick = loop.create_task(ticker())
    try:
        await pub.send(encode_frames(b"", 0, flood))  # too many bytes: refused before decoding
        await pub.send(encode_frames(b"", 1, many))  # small enough to decode, too many blocks
        pub.next_seq = 2
        await pub.publish(store([1], 0))
        # Seqs 0 and 1 were refused, so seq 2 is a gap: it is held until the (failing)
        # replay of 0..2 is answered, then applied.
        await until(lambda: indexer.stats.events_applied == 1, "the next batch applied")
    finally:
        tick.cancel()
    assert src.stats.rejected["batch_too_large"] == 2 and src.stats.batches_applied == 1
    assert longest < 0.25, f"the event loop stalled {longest * 1000:.0f} ms"


async def test_a_backlog_of_batches_gives_the_loop_turns(rig):
    # Batches already queued in the SUB socket are received without waiting: applied in
    # one step, a backlog would hold every request behind it. Between two of them the loop
    # runs what else is due.
    src, pub = await first_batch_applied(rig)
    for i in range(200):
        await pub.publish(store([100 + i], BS * (i + 1)))
    time.sleep(0.3)  # the loop is held while they queue up
    loop = asyncio.get_running_loop()
    seen: list[int] = []

    def tick() -> None:
        seen.append(src.stats.batches_applied)
        if seen[-1] < 201:
            loop.call_soon(tick)

    loop.call_soon(tick)
    await until(lambda: src.stats.batches_applied == 201, "the backlog applied")
    assert len(seen) > 50 and max(b - a for a, b in zip(seen, seen[1:], strict=False)) <= 5
