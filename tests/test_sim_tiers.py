"""The simulated worker's CPU and disk tiers: offload chain, LRU, load-back timing, counters.

The pure engine is driven step by step (every tier transition and its events, the step
time of a load against a recompute); one worker process checks the same through HTTP:
``usage.prompt_tokens_details.cached_tokens_per_tier`` and the ``/metrics`` counters.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.dev.launch import free_port
from kvgate.protocol.events import AllBlocksCleared, BlockRemoved, BlockStored, Tier
from kvgate.worker.sim.__main__ import config_from_args, parser
from kvgate.worker.sim.config import AnswerConfig, EngineConfig, SimConfig, TierConfig
from kvgate.worker.sim.request import Request
from kvgate.worker.sim.scheduler import Scheduler
from kvgate.worker.sim.timing import prefill_ms, transfer_ms
from tests.helpers import TINY_MODEL, python_module, wait_http

BS = 64
BLOCK_BYTES = 2 * 32 * 8 * 128 * 2 * BS  # Llama-3-8B: 8 MiB per 64-token block
CPU_MS = transfer_ms(BLOCK_BYTES, 25.0)
DISK_MS = transfer_ms(BLOCK_BYTES, 10.0)
_ids = itertools.count(1)


def engine(gpu: int = 4, cpu: int = 0, disk: int = 0, style: str = "tokenless") -> Scheduler:
    return Scheduler(
        EngineConfig(
            block_size=BS,
            num_gpu_blocks=gpu,
            max_num_seqs=4,
            max_num_batched_tokens=1024,
            max_model_len=gpu * BS,
            seed=11,
            tiers=TierConfig(cpu_blocks=cpu, disk_blocks=disk, event_style=style),
        )
    )


def prompt(blocks: int = 3) -> list[int]:
    """``blocks`` full blocks and one more token, unlike any other prompt here."""
    k = next(_ids)
    return [1000 + k] + [(k * 97 + i) % 9000 + 3 for i in range(blocks * BS)]


def serve(s: Scheduler, tokens: list[int]) -> tuple[Request, list]:
    """One request to completion (one output token); returns it and every (step, events)."""
    r = Request(f"r{next(_ids)}", tokens, 1, iter(range(50_000, 10**9)), None)
    s.add_request(r)
    steps = []
    while s.has_work:
        step = s.schedule()
        s.update(step)
        steps.append((step, s.take_events()))
    return r, steps


def events(steps) -> list:
    return [e for _, evs in steps for e in evs]


def shape(evs) -> list[tuple[str, str, list[int]]]:
    return [(type(e).__name__, e.medium.name, list(e.block_hashes)) for e in evs]


def tier_hashes(s: Scheduler, tier: Tier) -> list[int]:
    store = s.lower.store(tier)
    return store.hashes() if store is not None else []


# --- transitions -----------------------------------------------------------------------


def test_gpu_eviction_offloads_to_cpu_before_the_gpu_removal():
    s = engine(cpu=8)
    a, _ = serve(s, prompt())
    h = a.block_hashes[:3]
    _, steps = serve(s, prompt())  # needs all 4 GPU blocks: a's are evicted, tail first
    evs = events(steps)
    assert shape(evs[:6]) == [
        ("BlockStored", "CPU", [h[2]]),
        ("BlockRemoved", "GPU", [h[2]]),
        ("BlockStored", "CPU", [h[1]]),
        ("BlockRemoved", "GPU", [h[1]]),
        ("BlockStored", "CPU", [h[0]]),
        ("BlockRemoved", "GPU", [h[0]]),
    ]
    # Token-less (vLLM's OffloadingConnector): only the hash the GPU already announced.
    assert all(e.token_ids == [] and e.parent_block_hash is None for e in evs[:6:2])
    assert tier_hashes(s, Tier.CPU) == [h[2], h[1], h[0]]


def test_cpu_lru_moves_to_disk_and_disk_lru_drops():
    s = engine(cpu=3, disk=3)
    a, _ = serve(s, prompt())
    b, _ = serve(s, prompt())
    ha, hb = a.block_hashes[:3], b.block_hashes[:3]
    c, steps = serve(s, prompt())  # b's blocks go to CPU and push a's down to disk
    assert shape(events(steps)[:4]) == [
        ("BlockStored", "DISK", [ha[2]]),
        ("BlockRemoved", "CPU", [ha[2]]),
        ("BlockStored", "CPU", [hb[2]]),
        ("BlockRemoved", "GPU", [hb[2]]),
    ]
    assert tier_hashes(s, Tier.CPU) == [hb[2], hb[1], hb[0]]
    assert tier_hashes(s, Tier.DISK) == [ha[2], ha[1], ha[0]]
    _, steps = serve(s, prompt())  # c to CPU, b to disk, a dropped
    evs = events(steps)
    assert ("BlockRemoved", "DISK", [ha[2]]) in shape(evs)
    dropped = [h for e in evs if isinstance(e, BlockRemoved) and e.medium == Tier.DISK for h in e.block_hashes]
    assert dropped == [ha[2], ha[1], ha[0]]
    assert not any(isinstance(e, BlockStored) and e.block_hashes[0] in ha for e in evs)  # no tier below disk
    again, _ = serve(s, a.prompt_token_ids)
    assert again.num_cached_tokens == 0


def test_with_only_a_disk_tier_gpu_evictions_go_to_disk():
    s = engine(disk=4)
    a, _ = serve(s, prompt())
    _, steps = serve(s, prompt())
    assert shape(events(steps)[:2]) == [
        ("BlockStored", "DISK", [a.block_hashes[2]]),
        ("BlockRemoved", "GPU", [a.block_hashes[2]]),
    ]


def test_load_back_from_each_tier_costs_its_transfer_not_a_recompute():
    s = engine(cpu=3, disk=6)
    a, b, c = (serve(s, prompt())[0] for _ in range(3))  # now GPU: c, CPU: b, disk: a
    first = {}
    for name, r in (("gpu", c), ("cpu", b), ("disk", a), ("cold", None)):
        again, steps = serve(s, r.prompt_token_ids if r else prompt())
        first[name] = (again, steps[0][0])
    bs3 = 3 * BS
    assert [first[n][0].cached_tokens_per_tier for n in ("gpu", "cpu", "disk", "cold")] == [
        (bs3, 0, 0),
        (0, bs3, 0),
        (0, 0, bs3),
        (0, 0, 0),
    ]
    assert [first[n][0].num_cached_tokens for n in ("gpu", "cpu", "disk", "cold")] == [bs3, bs3, bs3, 0]
    work = {
        n: (step.work.prefill_tokens, step.work.cpu_loaded_blocks, step.work.disk_loaded_blocks)
        for n, (_, step) in first.items()
    }
    assert work == {"gpu": (1, 0, 0), "cpu": (1, 3, 0), "disk": (1, 0, 3), "cold": (bs3 + 1, 0, 0)}
    seconds = {n: step.seconds for n, (_, step) in first.items()}
    assert seconds["gpu"] == pytest.approx(prefill_ms(1) / 1e3)
    assert seconds["cpu"] == pytest.approx((prefill_ms(1) + 3 * CPU_MS) / 1e3)
    assert seconds["disk"] == pytest.approx((prefill_ms(1) + 3 * DISK_MS) / 1e3)
    assert seconds["cold"] == pytest.approx(prefill_ms(bs3 + 1) / 1e3)
    assert seconds["gpu"] < seconds["cpu"] < seconds["disk"] < seconds["cold"]
    assert (s.kv.queries, s.kv.hits, s.kv.external_queries, s.kv.external_hits) == (
        7 * (bs3 + 1),
        bs3,
        7 * (bs3 + 1),
        2 * bs3,
    )
    assert s.kv.cached_tokens_per_tier == [bs3, bs3, bs3]


def test_loaded_blocks_reenter_the_gpu_cache_and_tiers_keep_their_copy():
    s = engine(cpu=8)
    a, _ = serve(s, prompt())
    serve(s, prompt())
    again, steps = serve(s, a.prompt_token_ids)
    h = a.block_hashes[:3]
    gpu_stores = [e for e in events(steps) if isinstance(e, BlockStored) and e.medium == Tier.GPU]
    assert gpu_stores[0].block_hashes == h and gpu_stores[0].token_ids == a.prompt_token_ids[: 3 * BS]
    assert set(h) <= set(tier_hashes(s, Tier.CPU))
    # Evicted from the GPU again: the CPU already holds them, so only the GPU removals.
    _, steps = serve(s, prompt())
    evs = [e for e in events(steps) if h[0] in e.block_hashes or h[1] in e.block_hashes or h[2] in e.block_hashes]
    assert shape(evs) == [
        ("BlockRemoved", "GPU", [h[2]]),
        ("BlockRemoved", "GPU", [h[1]]),
        ("BlockRemoved", "GPU", [h[0]]),
    ]


def test_blocks_being_loaded_become_their_tiers_most_recent():
    s = engine(cpu=6)
    a, b, _ = (serve(s, prompt())[0] for _ in range(3))  # CPU, oldest first: a's 3, b's 3
    serve(s, a.prompt_token_ids)  # loads a; offloading the GPU's c then evicts the CPU's LRU
    cpu = set(tier_hashes(s, Tier.CPU))
    assert set(a.block_hashes[:3]) <= cpu and cpu.isdisjoint(b.block_hashes[:3])


def test_a_gpu_prefix_continues_in_the_cpu_tier():
    s = engine(gpu=6, cpu=8)
    a, _ = serve(s, prompt())  # blocks 0-3, freed tail first: free queue 4, 5, a3, a2, a1, a0
    serve(s, prompt())  # takes 4, 5, a3, a2: only a's third block is offloaded
    assert tier_hashes(s, Tier.CPU) == [a.block_hashes[2]]
    again, steps = serve(s, a.prompt_token_ids)
    assert again.cached_tokens_per_tier == (2 * BS, BS, 0)
    assert steps[0][0].work.cpu_loaded_blocks == 1


def test_full_style_tier_events_carry_tokens_and_parent():
    s = engine(cpu=3, disk=3, style="full")
    a, _ = serve(s, prompt())
    serve(s, prompt())
    _, steps = serve(s, prompt())
    h, toks = a.block_hashes[:3], a.prompt_token_ids
    stores = {(e.medium, e.block_hashes[0]): e for e in events(steps) if isinstance(e, BlockStored)}
    for i in range(3):  # a's blocks went GPU -> CPU (previous request), now CPU -> disk
        e = stores[(Tier.DISK, h[i])]
        assert e.token_ids == toks[i * BS : (i + 1) * BS] and e.block_size == BS
        assert e.parent_block_hash == (h[i - 1] if i else None)


def test_reset_clears_every_tier():
    s = engine(cpu=3, disk=3)
    a, _ = serve(s, prompt())
    serve(s, prompt())
    serve(s, prompt())
    assert s.reset_prefix_cache()
    assert [type(e) for e in s.take_events()] == [AllBlocksCleared]
    assert tier_hashes(s, Tier.CPU) == tier_hashes(s, Tier.DISK) == []
    again, _ = serve(s, a.prompt_token_ids)
    assert again.num_cached_tokens == 0


def test_tier_config_is_validated_and_round_trips_the_cli():
    for bad, message in (
        (dict(cpu_blocks=-1), "cpu_blocks"),
        (dict(bytes_per_block=0), "bytes_per_block"),
        (dict(disk_bandwidth_gbps=0.0), "disk_bandwidth_gbps"),
        (dict(event_style="x"), "event_style"),
    ):
        with pytest.raises(ValueError, match=message):
            EngineConfig(tiers=TierConfig(**bad)).validate()
    assert EngineConfig().bytes_per_block == 8 * 1024 * 1024
    assert EngineConfig(block_size=16).bytes_per_block == 2 * 1024 * 1024
    config = SimConfig(
        model_dir=TINY_MODEL,
        engine=EngineConfig(
            max_model_len=4096,
            tiers=TierConfig(
                cpu_blocks=100,
                disk_blocks=200,
                bytes_per_block=4096,
                cpu_bandwidth_gbps=12.5,
                disk_bandwidth_gbps=3.0,
                event_style="full",
            ),
        ),
    )
    assert config_from_args(parser().parse_args(config.cli_args())) == config


# --- invariant: the events describe every tier exactly -----------------------------------


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=30),
    st.integers(4, 10),
    st.integers(0, 6),
    st.integers(0, 6),
    st.sampled_from(["tokenless", "full"]),
)
def test_replaying_the_events_rebuilds_every_tier(ops, gpu, cpu, disk, style):
    s = Scheduler(
        EngineConfig(
            block_size=8,
            num_gpu_blocks=gpu,
            max_num_seqs=3,
            max_num_batched_tokens=24,
            max_model_len=gpu * 8,
            seed=5,
            tiers=TierConfig(cpu_blocks=cpu, disk_blocks=disk, event_style=style),
        )
    )
    gpu_copies: Counter[int] = Counter()
    tiers: dict[Tier, set[int]] = {Tier.CPU: set(), Tier.DISK: set()}

    def apply(evs) -> None:
        for e in evs:
            if isinstance(e, BlockStored) and e.medium == Tier.GPU:
                gpu_copies.update(e.block_hashes)
            elif isinstance(e, BlockRemoved) and e.medium == Tier.GPU:
                gpu_copies.subtract(e.block_hashes)
            elif isinstance(e, BlockStored):
                assert e.block_hashes[0] not in tiers[e.medium]  # never announced twice
                assert (e.token_ids == []) == (style == "tokenless")
                tiers[e.medium].add(e.block_hashes[0])
            elif isinstance(e, BlockRemoved):
                tiers[e.medium].remove(e.block_hashes[0])

    for n, (prefix, length, max_tokens) in enumerate(ops):
        tokens = ([prefix + 1] * 9 + list(range(100 + n, 100 + n + length)))[: gpu * 8 - max_tokens - 1]
        s.add_request(Request(f"r{n}", tokens, max_tokens, iter(range(50_000, 10**9)), None))
        for _ in range(4):
            if s.has_work:
                s.update(s.schedule())
                apply(s.take_events())
    while s.has_work:
        s.update(s.schedule())
        apply(s.take_events())
    actual = Counter({h: len(copies) for h, copies in s.pool._cached.items()})
    assert +gpu_copies == actual
    assert tiers[Tier.CPU] == set(tier_hashes(s, Tier.CPU)) if s.lower else not tiers[Tier.CPU]
    assert tiers[Tier.DISK] == set(tier_hashes(s, Tier.DISK)) if s.lower else not tiers[Tier.DISK]
    if s.lower:
        assert all(len(st_) <= st_.capacity for st_ in s.lower.stores)


# --- a worker process: usage and /metrics ------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name, labels)


@pytest.fixture(scope="module")
def tiered(tmp_path_factory) -> Iterator[str]:
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
            tiers=TierConfig(cpu_blocks=3, disk_blocks=6),
        ),
        answer=AnswerConfig(1, 4),
    )
    log = tmp_path_factory.mktemp("sim_tiers") / "sim.log"
    proc = python_module("kvgate.worker.sim", *config.cli_args(), log_path=log)
    base = f"http://127.0.0.1:{config.port}"
    try:
        wait_http(base + "/health", timeout=60, proc=proc)
        yield base
    finally:
        proc.stop()
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
async def test_usage_and_metrics_count_cached_tokens_per_tier(tiered):
    async with aiohttp.ClientSession() as http:

        async def complete(tokens: list[int], stream: bool = False) -> dict:
            body: dict = {"prompt": tokens, "max_tokens": 1}
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            async with http.post(tiered + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                if not stream:
                    return (await r.json())["usage"]
                chunks = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: {")]
                return chunks[-1]["usage"]

        async with http.get(tiered + "/metrics") as r:
            before = await r.text()
        a, b, c = prompt(), prompt(), prompt()
        for p in (a, b, c):
            await complete(p)  # GPU: c, CPU: b, disk: a
        details = [(await complete(p, stream=p is b))["prompt_tokens_details"] for p in (c, b, a)]
        async with http.get(tiered + "/metrics") as r:
            after = await r.text()
    bs3 = 3 * BS
    # Completions: the hit alone (vLLM 0.32 sets no created_cache_tokens there); a stream's usage
    # leaves the null fields out.
    assert details == [
        {
            "cached_tokens": bs3,
            "created_cache_tokens": None,
            "multimodal_tokens": None,
            "cached_tokens_per_tier": {"gpu": bs3, "cpu": 0, "disk": 0},
        },
        {
            "cached_tokens": bs3,
            "cached_tokens_per_tier": {"gpu": 0, "cpu": bs3, "disk": 0},
        },
        {
            "cached_tokens": bs3,
            "created_cache_tokens": None,
            "multimodal_tokens": None,
            "cached_tokens_per_tier": {"gpu": 0, "cpu": 0, "disk": bs3},
        },
    ]

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("vllm:external_prefix_cache_queries_total") == 6 * (bs3 + 1)
    assert delta("vllm:external_prefix_cache_hits_total") == 2 * bs3
    assert delta("vllm:prefix_cache_hits_total") == bs3  # the GPU pool's own hits
    assert [delta("kvgate_sim_cached_tokens_total", tier=t) for t in ("gpu", "cpu", "disk")] == [bs3, bs3, bs3]
    # Now: a on the GPU (its disk copy kept), b back in the CPU, c pushed down to disk.
    assert [metric(after, "kvgate_sim_cached_blocks", tier=t) for t in ("gpu", "cpu", "disk")] == [3, 3, 6]


def test_a_worker_without_tiers_reports_its_connector_metrics_at_zero():
    from prometheus_client import generate_latest

    from kvgate.worker.sim.answer import Vocabulary
    from kvgate.worker.sim.engine_loop import EngineLoop
    from kvgate.worker.sim.metrics import make_registry

    loop = EngineLoop(Scheduler(EngineConfig(seed=1)), Vocabulary((1,), (2,), 3, {}), AnswerConfig())
    text = generate_latest(make_registry(loop, "m")).decode()
    # A real vLLM 0.32 without --kv-transfer-config lists them too, at 0 (tests/fixtures/vllm-0.32).
    assert metric(text, "vllm:external_prefix_cache_queries_total") == 0
    assert metric(text, "vllm:external_prefix_cache_hits_total") == 0
    assert "vllm:prefix_cache_hits_total" in text
    assert metric(text, "kvgate_sim_cached_tokens_total", tier="cpu") == 0
    assert metric(text, "kvgate_sim_cached_blocks", tier="gpu") == 0
    assert 'kvgate_sim_cached_blocks{engine="0",model_name="m",tier="cpu"}' not in text
