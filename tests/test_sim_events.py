"""The simulated worker's KV-event stream over real ZMQ sockets, read by ``kvgate.protocol.wire``."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from kvgate.dev.launch import free_port
from kvgate.protocol.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from kvgate.protocol.hashing import sequence_hashes
from kvgate.protocol.wire import (
    REPLAY_END_SEQ,
    decode_batch,
    decode_frames,
    decode_replay_reply,
    encode_replay_request,
)
from kvgate.worker.sim.config import AnswerConfig, EngineConfig, KvEventsConfig, SimConfig
from tests.helpers import TINY_MODEL, Proc, python_module, until, wait_http

pytestmark = pytest.mark.slow

_prompts = itertools.count(1)


def unique_prompt(n: int) -> list[int]:
    """``n`` token ids no other prompt in this module starts with."""
    k = next(_prompts)
    return [k % 7000 + 3] + [(k * 31 + i) % 8000 + 3 for i in range(n - 1)]


class Sim:
    """A ``python -m kvgate.worker.sim`` process that can be restarted on the same ports."""

    def __init__(self, config: SimConfig, log_dir: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.proc: Proc | None = None
        self._starts = itertools.count(1)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.config.port}"

    def start(self) -> Sim:
        self.stop()
        log = self.log_dir / f"sim-{self.config.port}-{next(self._starts)}.log"
        self.proc = python_module("kvgate.worker.sim", *self.config.cli_args(), log_path=log)
        try:
            wait_http(self.base + "/health", timeout=60, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            assert "Traceback" not in self.proc.log_path.read_text()
            self.proc = None

    async def complete(self, prompt: list[int], **extra) -> dict:
        async with aiohttp.ClientSession() as http:
            async with http.post(self.base + "/v1/completions", json={"prompt": prompt, "max_tokens": 1, **extra}) as r:
                assert r.status == 200, await r.text()
                return await r.json()

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as http:
            async with http.get(self.base + "/metrics") as r:
                return await r.text()


def sim_config(**engine) -> SimConfig:
    return SimConfig(
        model_dir=TINY_MODEL,
        port=free_port(),
        engine=EngineConfig(
            **{
                "block_size": 64,
                "num_gpu_blocks": 512,
                "max_num_seqs": 16,
                "max_num_batched_tokens": 2048,
                "max_model_len": 4096,
                "speedup_ratio": 1000.0,
                **engine,
            }
        ),
        events=KvEventsConfig(
            endpoint=f"tcp://127.0.0.1:{free_port()}", replay_endpoint=f"tcp://127.0.0.1:{free_port()}"
        ),
        answer=AnswerConfig(min_tokens=8, max_tokens=16),
    )


class Subscriber:
    """A real SUB socket; keeps every (seq, batch, payload) it receives, in order."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.received: list[tuple[int, EventBatch, bytes]] = []

    async def until(self, done: Callable[[], bool], timeout: float = 20.0) -> None:
        """Receive until ``done()`` holds."""
        await until(done, lambda: f"events did not arrive; got {self.received}", timeout, step=self._receive)

    async def _receive(self) -> None:
        _, seq, payload = decode_frames(await self.sock.recv_multipart())
        self.received.append((seq, decode_batch(payload), payload))

    async def join(self, sim: Sim) -> None:
        """Wait out ZMQ's slow joiner: post fresh prompts until one's events arrive."""
        for _ in range(100):
            before = len(self.received)
            await sim.complete(unique_prompt(65))
            try:
                await self.until(lambda before=before: len(self.received) > before, timeout=0.3)
                return
            except AssertionError:
                continue
        raise AssertionError("subscription never became active")

    def events_since(self, mark: int) -> list:
        return [e for _, batch, _ in self.received[mark:] for e in batch.events]

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


async def replay(endpoint: str, start_seq: int, timeout: float = 20.0) -> list[tuple[int, bytes]]:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart([b"", encode_replay_request(start_seq)])
        out = []
        while True:
            seq, payload = decode_replay_reply(await asyncio.wait_for(sock.recv_multipart(), timeout))
            if seq == REPLAY_END_SEQ:
                return out
            out.append((seq, payload))
    finally:
        sock.close()
        ctx.term()


def stored(events) -> list[BlockStored]:
    return [e for e in events if isinstance(e, BlockStored)]


# --- one worker, map encoding ------------------------------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Iterator[Sim]:
    s = Sim(sim_config(), tmp_path_factory.mktemp("sim_events")).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def sub(sim) -> AsyncIterator[Subscriber]:
    await sim.complete(unique_prompt(65))  # a batch published before anyone listens
    s = Subscriber(sim.config.events.endpoint)
    await s.join(sim)
    try:
        yield s
    finally:
        s.close()


async def test_prefix_reuse_reports_cached_tokens_and_stores_no_new_blocks_for_it(sim, sub):
    prompt = unique_prompt(200)
    mark = len(sub.received)
    first = await sim.complete(prompt)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    await sub.until(lambda: sum(len(e.block_hashes) for e in stored(sub.events_since(mark))) >= 3)
    (ev,) = stored(sub.events_since(mark))
    assert ev.parent_block_hash is None and ev.block_size == 64 and ev.token_ids == prompt[:192]
    hashes = ev.block_hashes
    # Engine hashes are the engine's own: consumers must recompute router hashes from tokens.
    assert set(hashes).isdisjoint(sequence_hashes(prompt[:192], 64))

    mark = len(sub.received)
    second = await sim.complete(prompt[:192] + unique_prompt(100))
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 192
    await sub.until(lambda: any(e.parent_block_hash == hashes[-1] for e in stored(sub.events_since(mark))))
    new = stored(sub.events_since(mark))
    assert all(set(e.block_hashes).isdisjoint(hashes) for e in new)
    assert [len(e.block_hashes) for e in new] == [1]


async def test_map_encoding_on_the_wire(sim, sub):
    mark = len(sub.received)
    await sim.complete(unique_prompt(70))
    await sub.until(lambda: len(sub.received) > mark)
    _, _, payload = sub.received[mark]
    raw = msgspec.msgpack.decode(payload)
    assert raw[1][0]["type"] == "BlockStored" and raw[1][0]["medium"] == "GPU"
    assert raw[2] == 0  # data_parallel_rank


async def test_seq_counts_up_by_one_per_batch(sim, sub):
    for _ in range(3):
        await sim.complete(unique_prompt(65))
    mark = len(sub.received)
    await sim.complete(unique_prompt(65))
    await sub.until(lambda: len(sub.received) > mark)
    seqs = [seq for seq, _, _ in sub.received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_replay_returns_missed_batches(sim, sub):
    first_seen = sub.received[0][0]
    assert first_seen > 0  # the fixture published before the subscriber listened
    mark = len(sub.received)
    await sim.complete(unique_prompt(65))
    await sub.until(lambda: len(sub.received) > mark)
    last_seen = sub.received[-1][0]
    replayed = await replay(sim.config.events.replay_endpoint, 0)
    assert [seq for seq, _ in replayed][: last_seen + 1] == list(range(last_seen + 1))
    missed = [decode_batch(p) for seq, p in replayed if seq < first_seen]
    assert missed and all(isinstance(e, BlockStored) for b in missed for e in b.events)
    seen = {seq: payload for seq, _, payload in sub.received}
    assert all(seen[seq] == payload for seq, payload in replayed if seq in seen)
    tail = await replay(sim.config.events.replay_endpoint, last_seen)
    assert tail[0] == (last_seen, seen[last_seen])


async def test_replay_survives_a_malformed_request(sim):
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sim.config.events.replay_endpoint)
    try:
        await sock.send_multipart([b"", b"\x01\x02"])
        await sock.send_multipart([b"garbage"])
    finally:
        sock.close()
        ctx.term()
    assert (await replay(sim.config.events.replay_endpoint, 0))[0][0] == 0


async def test_reset_prefix_cache_publishes_all_blocks_cleared(sim, sub):
    prompt = unique_prompt(130)
    await sim.complete(prompt)
    mark = len(sub.received)
    async with aiohttp.ClientSession() as http:
        async with http.post(sim.base + "/reset_prefix_cache") as r:
            assert r.status == 200
    await sub.until(lambda: any(isinstance(e, AllBlocksCleared) for e in sub.events_since(mark)))
    again = await sim.complete(prompt)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


# --- a small worker: eviction, legacy array encoding, scheduler limits, restart -----------


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Iterator[Sim]:
    config = sim_config(
        block_size=16,
        num_gpu_blocks=8,
        max_model_len=128,
        max_num_seqs=2,
        max_num_batched_tokens=64,
        speedup_ratio=10.0,
    )
    config = replace(config, events=replace(config.events, encoding="array"))
    s = Sim(config, tmp_path_factory.mktemp("sim_small")).start()
    try:
        yield s
    finally:
        s.stop()


async def test_eviction_under_a_small_cache_produces_block_removed(small):
    sub = Subscriber(small.config.events.endpoint)
    try:
        await sub.join(small)
        mark = len(sub.received)
        a = unique_prompt(49)  # 3 full blocks + 1 token: 4 of the 8 blocks
        await small.complete(a)
        await sub.until(lambda: len(stored(sub.events_since(mark))) >= 1)
        a_hashes = stored(sub.events_since(mark))[0].block_hashes
        assert len(a_hashes) == 3
        await small.complete(unique_prompt(49))
        await small.complete(unique_prompt(49))
        await sub.until(
            lambda: (
                {h for e in sub.events_since(mark) if isinstance(e, BlockRemoved) for h in e.block_hashes}
                >= set(a_hashes)
            )
        )
        # Legacy encoding: events are tagged arrays.
        raw_events = [ev for _, _, p in sub.received[mark:] for ev in msgspec.msgpack.decode(p)[1]]
        assert {ev[0] for ev in raw_events} == {"BlockStored", "BlockRemoved"}
        again = await small.complete(a)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        sub.close()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def test_max_num_seqs_observed_in_metrics(small):
    prompts = [unique_prompt(10) for _ in range(6)]
    jobs = [asyncio.ensure_future(small.complete(p, max_tokens=40, ignore_eos=True)) for p in prompts]
    running, waiting = [], []
    while not all(j.done() for j in jobs):
        text = await small.metrics()
        running.append(metric(text, "vllm:num_requests_running"))
        waiting.append(metric(text, "vllm:num_requests_waiting"))
    results = await asyncio.gather(*jobs)
    assert all(r["usage"]["completion_tokens"] == 40 for r in results)
    assert max(running) == 2 and max(waiting) >= 1


async def test_restart_starts_seq_at_zero_with_new_hashes(small):
    prompt = unique_prompt(33)
    before = await replay(small.config.events.replay_endpoint, 0)
    await small.complete(prompt)
    old = [
        e
        for seq, p in await replay(small.config.events.replay_endpoint, len(before))
        for e in stored(decode_batch(p).events)
    ]
    small.start()  # SIGTERM, then the same command line again
    await small.complete(prompt)
    after = await replay(small.config.events.replay_endpoint, 0)
    assert [seq for seq, _ in after] == [0]  # only the new process's one batch
    new = stored(decode_batch(after[0][1]).events)
    assert new[0].token_ids == old[0].token_ids == prompt[:32]
    assert new[0].block_hashes != old[0].block_hashes  # seeded randomly per process
