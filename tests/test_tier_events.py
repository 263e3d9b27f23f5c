"""Tier events from the simulated worker, decoded by ``kvgate.protocol.wire``, applied by the real ``KvIndexer``.

Every batch here is a real engine batch: produced by ``worker.sim``'s scheduler (or its
process, over ZMQ), encoded and decoded with ``kvgate.protocol.wire``. The index's per-tier
``Match`` must say what the engine itself would reuse from each tier, in both event
styles (token-less like vLLM's OffloadingConnector, self-describing like LMCache) and
both encodings; and the index must cope with tier events that arrive before, after, or
without the GPU events of the same blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterator

import aiohttp
import pytest

from kvgate.dev.launch import free_port
from kvgate.indexer.index import Match
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.indexer.zmq_source import ReplayDispatcher, ZmqEventSource
from kvgate.protocol.events import BlockRemoved, BlockStored, EventBatch, Tier, WorkerKey
from kvgate.protocol.hashing import sequence_hashes
from kvgate.protocol.wire import decode_batch, encode_batch
from kvgate.worker.sim.config import AnswerConfig, EngineConfig, KvEventsConfig, SimConfig, TierConfig
from kvgate.worker.sim.request import Request
from kvgate.worker.sim.scheduler import Scheduler
from tests.helpers import TINY_MODEL, python_module, wait_http

BS = 64
W = WorkerKey("w")
_ids = itertools.count(1)


def prompt(blocks: int = 3) -> list[int]:
    k = next(_ids)
    return [2000 + k] + [(k * 89 + i) % 9000 + 3 for i in range(blocks * BS)]


class Worker:
    """The pure simulated engine, publishing one wire-encoded batch per step that changed the cache."""

    def __init__(self, style: str, encoding: str = "map", gpu: int = 4, cpu: int = 3, disk: int = 3) -> None:
        self.engine = Scheduler(
            EngineConfig(
                block_size=BS,
                num_gpu_blocks=gpu,
                max_num_seqs=4,
                max_num_batched_tokens=1024,
                max_model_len=gpu * BS,
                seed=13,
                tiers=TierConfig(cpu_blocks=cpu, disk_blocks=disk, event_style=style),
            )
        )
        self.encoding = encoding

    def serve(self, tokens: list[int]) -> tuple[Request, list[EventBatch]]:
        r = Request(f"r{next(_ids)}", tokens, 1, iter(range(50_000, 10**9)), None)
        self.engine.add_request(r)
        batches = []
        while self.engine.has_work:
            self.engine.update(self.engine.schedule())
            events = self.engine.take_events()
            if events:
                batches.append(decode_batch(encode_batch(EventBatch(time.time(), events, 0), self.encoding)))
        return r, batches

    def hit(self, tokens: list[int]) -> tuple[int, int, int]:
        """What the engine would reuse from each tier for ``tokens`` (without admitting it)."""
        return self.engine.kv.find_prefix(Request("probe", tokens, 1, iter(()), None)).blocks_per_tier()


class Feed:
    """Hands batches to a ``KvIndexer`` with consecutive seqs, in whatever order a test picks."""

    def __init__(self, indexer: KvIndexer | None = None) -> None:
        self.indexer = indexer or KvIndexer(BS)
        self._seq = itertools.count()

    def send(self, *batches: EventBatch) -> None:
        for batch in batches:
            self.indexer.apply_engine_batch(W.worker_id, next(self._seq), batch)

    def match(self, tokens: list[int]) -> Match:
        n = (len(tokens) - 1) // BS
        return self.indexer.find_matches(sequence_hashes(tokens[: n * BS], BS)).get(W, Match())


def per_tier(m: Match) -> tuple[int, int, int]:
    return m.gpu, m.cpu, m.disk


def only(batches: list[EventBatch], keep) -> EventBatch:
    return EventBatch(time.time(), [e for b in batches for e in b.events if keep(e)], 0)


# --- every transition, both styles, both encodings ------------------------------------


@pytest.mark.parametrize("encoding", ["map", "array"])
@pytest.mark.parametrize("style", ["tokenless", "full"])
def test_index_follows_offload_spill_drop_and_load_back(style, encoding):
    w, feed = Worker(style, encoding), Feed()
    a, b, c = (w.serve(prompt()) for _ in range(3))
    for _, batches in (a, b, c):
        feed.send(*batches)
    a, b, c = a[0], b[0], c[0]
    # GPU: c; a went GPU -> CPU -> disk, b GPU -> CPU; removals left the lower copies known.
    assert [per_tier(feed.match(r.prompt_token_ids)) for r in (a, b, c)] == [(0, 0, 3), (0, 3, 0), (3, 0, 0)]
    assert feed.indexer.block_counts() == {W: (3, 3, 3)}
    d, batches = w.serve(prompt())  # c -> CPU, b -> disk, a dropped
    feed.send(*batches)
    assert feed.match(a.prompt_token_ids).depth == 0
    assert [per_tier(feed.match(r.prompt_token_ids)) for r in (b, c, d)] == [(0, 0, 3), (0, 3, 0), (3, 0, 0)]
    _, batches = w.serve(b.prompt_token_ids)  # loaded back from disk into the GPU
    feed.send(*batches)
    assert per_tier(feed.match(b.prompt_token_ids)) == (3, 0, 0) == w.hit(b.prompt_token_ids)
    assert feed.indexer.stats.unknown_parent == feed.indexer.stats.unknown_block == 0
    assert not feed.indexer.stats.rejected


@pytest.mark.parametrize("style", ["tokenless", "full"])
def test_multi_turn_conversations_match_what_the_engine_would_load(style):
    """Six conversations growing turn by turn over GPU 16 / CPU 12 / disk 20 blocks: after
    every turn, each conversation's per-tier Match equals the engine's own lookup."""
    rng = random.Random(7)
    w, feed = Worker(style, gpu=16, cpu=12, disk=20), Feed()
    conversations = [prompt(1) for _ in range(6)]
    seen = [0, 0, 0]
    for turn in range(120):
        i = rng.randrange(len(conversations))
        tokens = conversations[i]
        if len(tokens) + 200 > 16 * BS:
            tokens = prompt(1)
        r, batches = w.serve(tokens)
        feed.send(*batches)
        user_turn = [(turn * 7 + j) % 9000 + 3 for j in range(rng.randrange(10, 150))]
        conversations[i] = tokens + r.output_token_ids + user_turn
        for conv in conversations:
            expected = w.hit(conv)
            assert per_tier(feed.match(conv)) == expected, (turn, conv[:2])
            seen = [s + (n > 0) for s, n in zip(seen, expected)]
    assert all(n > 20 for n in seen), seen  # every tier was exercised
    engine = w.engine
    assert feed.indexer.block_counts() == {W: (len(engine.pool._cached), *(len(s) for s in engine.lower.stores))}


# --- tier events before, after, or without the GPU events ------------------------------


def offload_scenario(style: str) -> tuple[Worker, Request, list[EventBatch], list[EventBatch]]:
    """a's blocks stored on the GPU (``gpu``), then offloaded to the CPU by b (``offload``)."""
    w = Worker(style, cpu=8)
    a, gpu = w.serve(prompt())
    _, offload = w.serve(prompt())
    return w, a, gpu, offload


def is_tier_store(e) -> bool:
    return isinstance(e, BlockStored) and e.medium != Tier.GPU


@pytest.mark.parametrize("style", ["tokenless", "full"])
def test_tier_events_after_the_gpu_store(style):
    _, a, gpu, offload = offload_scenario(style)
    feed = Feed()
    feed.send(*gpu)
    assert per_tier(feed.match(a.prompt_token_ids)) == (3, 0, 0)
    feed.send(*offload)
    assert per_tier(feed.match(a.prompt_token_ids)) == (0, 3, 0)


@pytest.mark.parametrize("style", ["tokenless", "full"])
def test_tier_events_before_the_gpu_store(style):
    _, a, gpu, offload = offload_scenario(style)
    feed = Feed()
    feed.send(only(offload, is_tier_store))  # the connector's events overtake the engine's
    feed.send(*gpu)
    assert per_tier(feed.match(a.prompt_token_ids)) == (3, 0, 0)
    assert feed.match(a.prompt_token_ids).depth == 3
    feed.send(only(offload, lambda e: not is_tier_store(e)))
    assert per_tier(feed.match(a.prompt_token_ids)) == (0, 3, 0)


def test_tokenless_tier_events_without_gpu_events_wait_for_the_blocks_tokens():
    w, a, _, offload = offload_scenario("tokenless")
    feed = Feed()
    feed.send(*offload)  # a's GPU stores were never seen (e.g. published before anyone listened)
    assert feed.match(a.prompt_token_ids).depth == 0  # hashes alone cannot be keyed
    _, reload = w.serve(a.prompt_token_ids)  # loaded back: the GPU store carries the tokens
    feed.send(*reload)
    assert per_tier(feed.match(a.prompt_token_ids)) == (3, 0, 0)
    _, evict = w.serve(prompt())  # the CPU already holds them: GPU removals only
    assert not any(is_tier_store(e) for b in evict for e in b.events)
    feed.send(*evict)
    assert per_tier(feed.match(a.prompt_token_ids)) == (0, 3, 0) == w.hit(a.prompt_token_ids)


def test_self_describing_tier_events_without_gpu_events_are_indexed():
    """Offloads arrive tail first (LRU evicts a sequence's last block first): each store
    names a parent announced only later, which the index must wait for."""
    _, a, _, offload = offload_scenario("full")
    feed = Feed()
    feed.send(*offload)
    assert per_tier(feed.match(a.prompt_token_ids)) == (0, 3, 0)


@pytest.mark.parametrize("style", ["tokenless", "full"])
def test_tier_events_after_the_gpu_removal_in_the_same_batch(style):
    """vLLM appends the connector's events after the KV manager's: a batch may remove the
    GPU block before it announces the CPU copy."""
    _, a, gpu, offload = offload_scenario(style)
    feed = Feed()
    feed.send(*gpu)
    reordered = [
        EventBatch(b.ts, [e for e in b.events if not is_tier_store(e)] + [e for e in b.events if is_tier_store(e)], 0)
        for b in offload
    ]
    assert any(isinstance(e, BlockRemoved) for e in reordered[0].events[:1])
    feed.send(*reordered)
    assert per_tier(feed.match(a.prompt_token_ids)) == (0, 3, 0)


# --- a worker process over ZMQ -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiered(tmp_path_factory) -> Iterator[SimConfig]:
    config = SimConfig(
        model_dir=TINY_MODEL,
        port=free_port(),
        engine=EngineConfig(
            block_size=BS,
            num_gpu_blocks=4,
            max_num_seqs=4,
            max_num_batched_tokens=1024,
            max_model_len=4 * BS,
            speedup_ratio=1000.0,
            tiers=TierConfig(cpu_blocks=3, disk_blocks=3),
        ),
        events=KvEventsConfig(
            endpoint=f"tcp://*:{free_port()}",
            replay_endpoint=f"tcp://*:{free_port()}",
            encoding="array",
        ),
        answer=AnswerConfig(1, 4),
    )
    log = tmp_path_factory.mktemp("tier_events") / "sim.log"
    proc = python_module("kvgate.worker.sim", *config.cli_args(), log_path=log)
    try:
        wait_http(f"http://127.0.0.1:{config.port}/health", timeout=60, proc=proc)
        yield config
    finally:
        proc.stop()
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
async def test_worker_process_tiers_reach_the_index_over_zmq(tiered):
    dispatcher = ReplayDispatcher()
    indexer = KvIndexer(BS, dispatcher)
    # The worker binds tcp://*:P (as vLLM does); consumers connect to the loopback address.
    events, replay = (e.replace("*", "127.0.0.1") for e in (tiered.events.endpoint, tiered.events.replay_endpoint))
    source = ZmqEventSource("w", events, replay, indexer)
    dispatcher.add(source)
    source.start()
    # Whatever is published before the SUB socket has joined comes back through the replay
    # socket once a later batch shows the gap; the last prompt's batches come long after.
    prompts = [prompt() for _ in range(3)]
    try:
        async with aiohttp.ClientSession() as http:
            for p in prompts:
                async with http.post(
                    f"http://127.0.0.1:{tiered.port}/v1/completions", json={"prompt": p, "max_tokens": 1}
                ) as r:
                    assert r.status == 200, await r.text()
        for _ in range(200):
            if indexer.block_counts().get(W) == (3, 3, 3):
                break
            await asyncio.sleep(0.05)
        feed = Feed(indexer)
        assert [per_tier(feed.match(p)) for p in prompts] == [(0, 0, 3), (0, 3, 0), (3, 0, 0)]
    finally:
        await source.stop()
