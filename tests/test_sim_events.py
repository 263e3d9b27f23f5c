"""The simulated worker's KV-event stream over real ZMQ sockets, read by ``kvgate.protocol.wire``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
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

GOLDEN = Path(__file__).parent / "fixtures" / "vllm-0.32"


def golden(name: str) -> dict:
    """A recording of the real vLLM 0.32 engine (see tests/test_vllm_golden.py)."""
    data: dict = json.loads((GOLDEN / f"{name}.json").read_text())
    return data


def golden_frames(message: dict) -> list[bytes]:
    return [base64.b64decode(f) for f in message["frames_b64"]]


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

    @property
    def events(self) -> str:
        """Where a subscriber connects: the worker binds ``tcp://*:P``, as vLLM does."""
        return _loopback(self.config.events.endpoint)

    @property
    def replay(self) -> str:
        return _loopback(self.config.events.replay_endpoint)

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

    async def chat(self, body: dict) -> dict:
        async with aiohttp.ClientSession() as http:
            async with http.post(self.base + "/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                return await r.json()

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as http:
            async with http.get(self.base + "/metrics") as r:
                return await r.text()


def _loopback(endpoint: str | None) -> str:
    assert endpoint is not None and endpoint.startswith("tcp://*:")
    return endpoint.replace("*", "127.0.0.1")


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
        # As configs/vllm/serve.sh configures vLLM: wildcard endpoints, which both sockets bind.
        events=KvEventsConfig(
            endpoint=f"tcp://*:{free_port()}", replay_endpoint=f"tcp://*:{free_port()}", topic="kv-events"
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
    s = Subscriber(sim.events)
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


def golden_event(name: str, kind: str) -> dict:
    for message in golden(name).get("messages") or golden(name)["replies"]:
        for event in (message["decoded"] or [0, []])[1]:
            if event["type"] == kind:
                return event
    raise KeyError(kind)


async def test_events_carry_vllm_032_keys_in_its_order(sim, sub):
    """BlockStored / BlockRemoved as vLLM 0.32 writes them (tests/fixtures/vllm-0.32)."""
    mark = len(sub.received)
    prompt = unique_prompt(130)
    await sim.complete(prompt)
    await sub.until(lambda: bool(stored(sub.events_since(mark))))
    (raw,) = [e for _, _, p in sub.received[mark:] for e in msgspec.msgpack.decode(p)[1] if e["type"] == "BlockStored"]
    real = golden_event("01_store_first", "BlockStored")
    assert list(raw) == list(real)
    assert raw["extra_keys"] == [None, None] and raw["token_ids"] == prompt[:128]
    assert {k: raw[k] for k in ("parent_block_hash", "block_size", "lora_id", "medium", "lora_name")} == {
        "parent_block_hash": None,
        "block_size": 64,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    assert (raw["group_idx"], raw["kv_cache_spec_kind"]) == (real["group_idx"], real["kv_cache_spec_kind"])
    assert all(type(h) is int and 0 <= h < 2**64 for h in raw["block_hashes"])


async def test_a_fully_cached_repeat_publishes_nothing(sim, sub):
    prompt = unique_prompt(150)  # 2 full blocks + 22 tokens: the hit covers both blocks
    await sim.complete(prompt)
    await sub.until(lambda: any(e.token_ids[:1] == prompt[:1] for e in stored(sub.events_since(0))))
    mark = len(sub.received)
    again = await sim.complete(prompt)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 128
    marker = unique_prompt(65)
    await sim.complete(marker)
    await sub.until(lambda: len(sub.received) > mark)
    (seq, batch, _), *_ = sub.received[mark:]
    # The repeat's step published no batch: the next seq is the marker prompt's store.
    assert seq == sub.received[mark - 1][0] + 1
    assert [e.token_ids for e in stored(batch.events)] == [marker[:64]]


async def test_usage_has_vllm_032_prompt_tokens_details(sim):
    # The three chat requests the real engine answered, in its order: the same usage, field for field
    # (cached_tokens_per_tier is the simulator's own extra, see worker/README.md).
    for name in ("01_store_first", "02_store_continuation", "03_repeat_hit"):
        recorded = golden(name)["http"]
        ours = (await sim.chat(recorded["request"]))["usage"]
        assert ours["prompt_tokens_details"].pop("cached_tokens_per_tier") is not None
        assert json.dumps(ours) == json.dumps(recorded["body"]["usage"]), name
    # Completions report the hit alone: vLLM 0.32 sets no created_cache_tokens there.
    prompt = unique_prompt(370)
    first, again = (await sim.complete(prompt))["usage"], (await sim.complete(prompt))["usage"]
    assert [
        (u["prompt_tokens_details"]["cached_tokens"], u["prompt_tokens_details"]["created_cache_tokens"])
        for u in (first, again)
    ] == [(0, None), (320, None)]


async def test_a_prompt_cached_whole_reports_one_block_less(sim):
    prompt = unique_prompt(256)
    await sim.complete(prompt)
    again = (await sim.complete(prompt))["usage"]["prompt_tokens_details"]
    # The engine always computes the last prompt token, so the last block is recomputed.
    assert again["cached_tokens"] == 192


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
    replayed = await replay(sim.replay, 0)
    assert [seq for seq, _ in replayed][: last_seen + 1] == list(range(last_seen + 1))
    missed = [decode_batch(p) for seq, p in replayed if seq < first_seen]
    assert missed and all(isinstance(e, BlockStored) for b in missed for e in b.events)
    seen = {seq: payload for seq, _, payload in sub.received}
    assert all(seen[seq] == payload for seq, payload in replayed if seq in seen)
    tail = await replay(sim.replay, last_seen)
    assert tail[0] == (last_seen, seen[last_seen])


async def test_replay_survives_a_malformed_request(sim):
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sim.replay)
    try:
        await sock.send_multipart([b"", b"\x01\x02"])
        await sock.send_multipart([b"garbage"])
    finally:
        sock.close()
        ctx.term()
    assert (await replay(sim.replay, 0))[0][0] == 0


async def reset(sim: Sim, query: str = "") -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.post(sim.base + "/reset_prefix_cache" + query) as r:
            assert r.status == 200 and r.content_type == "application/json"
            return await r.json()


async def test_reset_prefix_cache_clears_with_the_next_batch(sim, sub):
    prompt = unique_prompt(130)
    await sim.complete(prompt)
    await sub.until(lambda: any(e.token_ids[:1] == prompt[:1] for e in stored(sub.events_since(0))))
    mark = len(sub.received)
    assert await reset(sim) == {"success": True}
    assert await reset(sim) == {"success": True}
    # As vLLM: nothing is published until a step runs, then the clears lead its batch.
    with pytest.raises(AssertionError):
        await sub.until(lambda: len(sub.received) > mark, timeout=0.5)
    again = await sim.complete(prompt)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    await sub.until(lambda: len(sub.received) > mark)
    _, batch, _ = sub.received[mark]
    assert [type(e) for e in batch.events] == [AllBlocksCleared, AllBlocksCleared, BlockStored]


async def test_a_reset_then_a_request_without_a_full_block_publishes_the_clear_alone(sim, sub):
    mark = len(sub.received)
    assert await reset(sim) == {"success": True}
    await sim.complete(unique_prompt(11))
    await sub.until(lambda: len(sub.received) > mark)
    _, batch, payload = sub.received[mark]
    assert batch.events == [AllBlocksCleared()]
    ((_, _, real),) = [decode_frames(golden_frames(m)) for m in golden("10_all_blocks_cleared_alone")["messages"]]
    assert msgspec.msgpack.decode(payload)[1:] == msgspec.msgpack.decode(real)[1:]


async def test_reset_refused_while_a_request_runs_unless_asked_to_preempt(tmp_path):
    # Real time (no speedup): a 3,000-token answer takes many seconds.
    slow = Sim(sim_config(speedup_ratio=1.0), tmp_path).start()
    job = asyncio.ensure_future(slow.complete(unique_prompt(10), max_tokens=3000, ignore_eos=True))
    try:
        for _ in range(200):
            if metric(await slow.metrics(), "vllm:num_requests_running") > 0:
                break
            await asyncio.sleep(0.05)
        assert await reset(slow) == {"success": False}
        assert await reset(slow, "?reset_running_requests=true") == {"success": True}
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        slow.stop()


# --- replay and endpoints, frame for frame -------------------------------------------------


async def dealer_replies(endpoint: str, start_seq: int, timeout: float = 20.0) -> list[list[bytes]]:
    """The raw multipart replies a DEALER gets for one replay request, end marker included."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart([b"", encode_replay_request(start_seq)])
        out: list[list[bytes]] = []
        while not out or out[-1] != END_MARKER:
            out.append(await asyncio.wait_for(sock.recv_multipart(), timeout))
        return out
    finally:
        sock.close()
        ctx.term()


END_MARKER = [b"", b"", b"\xff" * 8, b""]


async def test_replay_frames_are_vllm_032s(sim, sub):
    mark = len(sub.received)
    await sim.complete(unique_prompt(65))
    await sub.until(lambda: len(sub.received) > mark)
    last_seq, _, last_payload = sub.received[-1]
    replies = await dealer_replies(sim.replay, last_seq - 1)
    live = {seq: payload for seq, _, payload in sub.received}
    assert replies == [
        [b"", b"kv-events", (last_seq - 1).to_bytes(8, "big"), live[last_seq - 1]],
        [b"", b"kv-events", last_seq.to_bytes(8, "big"), last_payload],
        END_MARKER,
    ]
    # The real engine's replies to the same request (08), frame lengths and all.
    real = [golden_frames(r) for r in golden("08_replay_from_last_minus_1")["replies"]]
    assert [[len(f) for f in r] for r in real][-1] == [len(f) for f in END_MARKER]
    assert real[-1] == END_MARKER
    assert [r[:2] for r in real[:-1]] == [r[:2] for r in replies[:-1]]


async def test_replay_past_the_end_gets_only_the_end_marker(sim, sub):
    next_seq = sub.received[-1][0] + 1
    assert await dealer_replies(sim.replay, next_seq + 100) == [END_MARKER]
    assert [golden_frames(r) for r in golden("09_replay_beyond_end")["replies"]] == [END_MARKER]


async def test_kv_event_sources_is_vllm_032s(sim):
    async with aiohttp.ClientSession() as http:
        async with http.get(sim.base + "/kv_event_sources") as r:
            assert r.status == 200 and r.content_type == "application/json"
            sources = await r.json()
    real = golden("http/kv_event_sources")["response"]
    assert list(sources) == list(real) == ["0"]
    assert list(sources["0"]) == list(real["0"])
    ev = sim.config.events
    assert sources["0"] == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": ev.endpoint,  # as configured, tcp://*:P
        "replay_endpoint": ev.replay_endpoint,
        "buffer_steps": ev.buffer_steps,
        "hwm": ev.hwm,
        "max_queue_size": real["0"]["max_queue_size"],
        "topic": "kv-events",
    }
    assert {k: type(v) for k, v in sources["0"].items()} == {k: type(v) for k, v in real["0"].items()}


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
    sub = Subscriber(small.events)
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
    before = await replay(small.replay, 0)
    await small.complete(prompt)
    old = [e for seq, p in await replay(small.replay, len(before)) for e in stored(decode_batch(p).events)]
    small.start()  # SIGTERM, then the same command line again
    await small.complete(prompt)
    after = await replay(small.replay, 0)
    assert [seq for seq, _ in after] == [0]  # only the new process's one batch
    new = stored(decode_batch(after[0][1]).events)
    assert new[0].token_ids == old[0].token_ids == prompt[:32]
    assert new[0].block_hashes != old[0].block_hashes  # seeded randomly per process


# --- bind or connect, as vLLM decides ------------------------------------------------------


async def test_a_worker_configured_with_a_host_endpoint_connects_to_a_bound_subscriber(tmp_path):
    port = free_port()
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.LINGER, 0)
    # Bound first: a worker that tried to bind the port would fail to start.
    sock.bind(f"tcp://127.0.0.1:{port}")
    config = replace(sim_config(), events=KvEventsConfig(endpoint=f"tcp://127.0.0.1:{port}", topic="kv-events"))
    connecting = Sim(config, tmp_path).start()
    try:
        prompt = unique_prompt(65)
        for _ in range(100):  # the connection may join after the first batches
            await connecting.complete(prompt)
            try:
                topic, _, payload = decode_frames(await asyncio.wait_for(sock.recv_multipart(), 0.3))
                break
            except TimeoutError:
                prompt = unique_prompt(65)
        else:
            raise AssertionError("no batch reached the bound subscriber")
        assert topic == b"kv-events"
        assert [e.token_ids for e in stored(decode_batch(payload).events)] == [prompt[:64]]
    finally:
        connecting.stop()
        sock.close()
        ctx.term()
