"""The simulated worker's ``GET /metrics`` against a real vLLM 0.32 engine's page.

The real page (``tests/fixtures/vllm-0.32/http/metrics.txt``) and the simulator's, served
in process over loopback HTTP, are parsed with prometheus_client's parser: the same
families in the same order, with the same HELP texts, TYPEs, label names and histogram
buckets. The values are the simulator's own: after real chat requests, the request
histograms count exactly those requests and add up what their answers' ``usage`` says.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvgate.dev.launch import free_port
from kvgate.worker.sim.answer import Vocabulary
from kvgate.worker.sim.config import AnswerConfig, EngineConfig, SimConfig, TierConfig
from kvgate.worker.sim.engine_loop import EngineLoop, buckets_1_2_5
from kvgate.worker.sim.metrics import make_registry
from kvgate.worker.sim.scheduler import Scheduler
from kvgate.worker.sim.server import build_app
from tests.helpers import TINY_MODEL

REAL_PAGE = (Path(__file__).parent / "fixtures" / "vllm-0.32" / "http" / "metrics.txt").read_text()
MODEL = "kvgate-tiny"
# The real engine's cache: 65 blocks of 64 tokens, a 4096-token context.
ENGINE = EngineConfig(
    block_size=64, num_gpu_blocks=65, max_num_seqs=16, max_num_batched_tokens=1024, max_model_len=4096, seed=3
)
CONFIG = SimConfig(model_dir=TINY_MODEL, port=0, engine=ENGINE, answer=AnswerConfig(min_tokens=5, max_tokens=12))


@dataclass
class Page:
    """A ``/metrics`` page: its raw HELP lines, and what prometheus_client's parser reads of it."""

    text: str

    def helps(self) -> list[str]:
        """``# HELP`` lines (verbatim, trailing blanks included), the simulator's own families left out."""
        lines = [line for line in self.text.splitlines() if line.startswith("# HELP ")]
        return [line for line in lines if not line.startswith("# HELP kvgate_sim_")]

    def shape(self) -> dict[str, tuple[str, tuple[str, ...], tuple[tuple[str, ...], ...]]]:
        """Per family: type, label names (``le`` aside), and each label set's bucket bounds."""
        out = {}
        for f in text_string_to_metric_families(self.text):
            if f.name.startswith("kvgate_sim_"):
                continue
            names: set[str] = set()
            buckets: dict[tuple, list[str]] = {}
            for s in f.samples:
                names |= set(s.labels) - {"le"}
                if s.name.endswith("_bucket"):
                    key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                    buckets.setdefault(key, []).append(s.labels["le"])
            out[f.name] = (f.type, tuple(sorted(names)), tuple(sorted({tuple(b) for b in buckets.values()})))
        return out

    def value(self, name: str, **labels: str) -> float:
        found = [
            s.value
            for f in text_string_to_metric_families(self.text)
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) == 1, (name, labels, found)
        return found[0]


REAL = Page(REAL_PAGE)


@dataclass
class Sim:
    base: str
    runner: web.AppRunner

    async def metrics(self) -> Page:
        async with aiohttp.ClientSession() as http:
            async with http.get(self.base + "/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                return Page(await r.text())

    async def chat(self, content: str, stream: bool = False, **extra) -> dict:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
        async with aiohttp.ClientSession() as http:
            if not stream:
                async with http.post(self.base + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    return (await r.json())["usage"]
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            async with http.post(self.base + "/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                chunks = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: {")]
                return chunks[-1]["usage"]


async def start_sim(config: SimConfig) -> Sim:
    config = replace(config, port=free_port())
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", config.port).start()
    return Sim(f"http://127.0.0.1:{config.port}", runner)


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    started = await start_sim(CONFIG)
    try:
        yield started
    finally:
        await started.runner.cleanup()


@pytest.fixture
async def tiered_sim() -> AsyncIterator[Sim]:
    # With a lower tier, as with vLLM's KV connector: the external prefix-cache counters too.
    started = await start_sim(replace(CONFIG, engine=replace(ENGINE, tiers=TierConfig(cpu_blocks=64))))
    try:
        yield started
    finally:
        await started.runner.cleanup()


async def some_traffic(sim: Sim) -> list[dict]:
    """A few answered chats (whole and streamed), a listing and an unknown route."""
    paris = "Tell me about the weather in Paris today. " * 20  # some 64-token blocks, cached after once
    usages = [
        await sim.chat(paris, max_tokens=8),
        await sim.chat(paris, stream=True),
        await sim.chat("And in Rome? " * 40, max_tokens=3),
        await sim.chat("What is a prefix cache?", stream=True, max_tokens=6),
    ]
    async with aiohttp.ClientSession() as http:
        async with http.get(sim.base + "/v1/models") as r:
            assert r.status == 200
        async with http.get(sim.base + "/no/such/route") as r:
            assert r.status == 404
    return usages


async def test_the_page_has_the_real_pages_families_in_its_order(sim):
    await some_traffic(sim)
    page = await sim.metrics()
    # Names, order and HELP texts, verbatim.
    assert page.helps() == REAL.helps()
    # TYPE, label names and buckets of every family (all of them have samples by now).
    sim_shape, real_shape = page.shape(), REAL.shape()
    assert sim_shape.keys() == real_shape.keys()
    for name, (kind, labels, buckets) in real_shape.items():
        assert sim_shape[name][0] == kind, name
        assert sim_shape[name][1] == labels, name
        assert sim_shape[name][2] == buckets, name
    assert len({k for k, (kind, _, _) in real_shape.items() if kind == "histogram"}) == 18
    # The label values vLLM lists whatever happened (reasons, sources, sleep states).
    for name, label in [
        ("vllm:num_requests_waiting_by_reason", "reason"),
        ("vllm:engine_sleep_state", "sleep_state"),
        ("vllm:prompt_tokens_by_source_total", "source"),
        ("vllm:prompt_tokens_cached_by_source_total", "source"),
        ("vllm:request_success_total", "finished_reason"),
        ("vllm:admission_rejections_total", "reason"),
    ]:
        assert _label_values(page.text, name, label) == _label_values(REAL_PAGE, name, label), name
    # The cache config is the simulator's: the real engine's 65 blocks of 64 tokens, 4096 context.
    info = _sample(page.text, "vllm:cache_config_info").labels
    real_info = _sample(REAL_PAGE, "vllm:cache_config_info").labels
    assert info.keys() == real_info.keys()
    for key in ("block_size", "num_gpu_blocks", "kv_cache_size_tokens", "kv_cache_max_concurrency"):
        assert info[key] == real_info[key], key
    assert info["num_cpu_blocks"] == "None"
    # As big as the real one, give or take the handlers each has seen.
    assert 0.8 < len(page.text) / len(REAL_PAGE) < 1.2
    assert 0.8 < len(page.text.splitlines()) / len(REAL_PAGE.splitlines()) < 1.2


async def test_with_a_lower_tier_the_same_families_count_the_connectors_hits(tiered_sim):
    # The real engine had no KV connector and still served vllm:external_prefix_cache_* (0).
    assert REAL.value("vllm:external_prefix_cache_queries_total") == 0
    paris = "Tell me about the weather in Paris today. " * 20
    await tiered_sim.chat(paris, max_tokens=1)
    page = await tiered_sim.metrics()
    assert page.helps() == REAL.helps()
    assert page.shape().keys() == REAL.shape().keys()
    assert page.value("vllm:external_prefix_cache_queries_total") == page.value("vllm:prefix_cache_queries_total") > 0
    assert _sample(page.text, "vllm:cache_config_info").labels["num_cpu_blocks"] == "64"


async def test_histograms_count_the_requests_and_add_up_their_usage(sim):
    started = time.monotonic()
    usages = await some_traffic(sim)
    elapsed = time.monotonic() - started
    page = await sim.metrics()
    n = len(usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert cached > 0  # the second chat repeats the first one's prompt

    def count(name: str) -> float:
        return page.value(f"vllm:{name}_count")

    def total(name: str) -> float:
        return page.value(f"vllm:{name}_sum")

    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_inference_time_seconds",
        "request_time_per_output_token_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
        "request_params_max_tokens",
        "request_max_num_generation_tokens",
        "request_params_n",
        "request_num_preemptions",
        "request_prefill_kv_computed_tokens",
    ):
        assert count(name) == n, name
        bucket_inf = page.value(f"vllm:{name}_bucket", le="+Inf")
        assert bucket_inf == n, name
    assert total("request_prompt_tokens") == prompt == page.value("vllm:prompt_tokens_total")
    assert total("request_generation_tokens") == generated == page.value("vllm:generation_tokens_total")
    assert total("request_prefill_kv_computed_tokens") == prompt - cached
    assert total("request_params_n") == n
    assert total("request_num_preemptions") == 0
    # max_tokens as the engine got it: the request's, or the room the context leaves.
    assert total("request_params_max_tokens") == 8 + (4096 - usages[1]["prompt_tokens"]) + 3 + 6
    # One inter-token latency per token after each request's first; the decode times are theirs.
    assert count("inter_token_latency_seconds") == generated - n
    assert math.isclose(total("inter_token_latency_seconds"), total("request_decode_time_seconds"), rel_tol=1e-6)
    # Every step's tokens: the prompts' computed tokens and the generated ones.
    assert total("iteration_tokens_total") == prompt - cached + generated
    # Latencies: positive, ordered, and within the time the requests took.
    ttft, e2e = total("time_to_first_token_seconds"), total("e2e_request_latency_seconds")
    assert 0 < ttft <= e2e <= elapsed
    assert math.isclose(
        e2e,
        total("request_queue_time_seconds")
        + total("request_prefill_time_seconds")
        + total("request_decode_time_seconds"),
        rel_tol=1e-6,
    )
    assert math.isclose(
        total("request_inference_time_seconds"),
        total("request_prefill_time_seconds") + total("request_decode_time_seconds"),
        rel_tol=1e-6,
    )
    # Counters split the same tokens by source.
    by_source = {
        s: page.value("vllm:prompt_tokens_by_source_total", source=s)
        for s in ("local_compute", "local_cache_hit", "external_kv_transfer")
    }
    assert by_source == {"local_compute": prompt - cached, "local_cache_hit": cached, "external_kv_transfer": 0}
    assert page.value("vllm:external_prefix_cache_queries_total") == 0  # no lower tier: no connector lookups
    assert page.value("vllm:prompt_tokens_cached_total") == cached
    assert page.value("vllm:prompt_tokens_cached_by_source_total", source="device") == cached
    finished = sum(page.value("vllm:request_success_total", finished_reason=r) for r in ("stop", "length"))
    assert finished == n
    # HTTP: the answered chats and the listing by route; the unknown route as "none"; never /metrics.
    assert page.value("http_requests_total", handler="/v1/chat/completions", method="POST", status="2xx") == n
    assert page.value("http_requests_total", handler="/v1/models", method="GET", status="2xx") == 1
    assert page.value("http_requests_total", handler="none", method="GET", status="4xx") == 1
    assert "/metrics" not in "".join(line for line in page.text.splitlines() if line.startswith("http_"))
    assert page.value("http_request_size_bytes_count", handler="/v1/chat/completions") == n
    assert page.value("http_request_size_bytes_sum", handler="/v1/chat/completions") > 0
    assert page.value("http_request_duration_highr_seconds_count") == n + 2


def test_fast_rendering_writes_what_generate_latest_writes():
    loop = EngineLoop(Scheduler(ENGINE), Vocabulary((1,), (2,), 3, {}), AnswerConfig())
    registry = make_registry(loop, MODEL)
    registry.http.observe("/v1/chat/completions", "POST", 200, 120, 300, 0.2)
    registry.http.observe("/v1/chat/completions", "POST", 400, 10, 100, 0.001)
    registry.http.observe("/metrics", "GET", 200, 0, 50_000, 0.001)  # not recorded, as vLLM's
    loop.stats.time_to_first_token_seconds.observe(0.05)
    loop.stats.finished["length"] += 1

    def stable(text: bytes) -> list[str]:  # the process' own numbers move between two reads
        return [line for line in text.decode().splitlines() if not line.startswith(("process_", "python_gc_"))]

    assert stable(registry.render()) == stable(generate_latest(registry))


def test_token_buckets_follow_the_context_as_vllms():
    real = REAL.shape()["vllm:request_prompt_tokens"][2][0]
    assert tuple(float(b) for b in real[:-1]) == buckets_1_2_5(4096) == buckets_1_2_5(2000) == buckets_1_2_5(4999)
    assert buckets_1_2_5(8192)[-1] == 5000.0


def _sample(text: str, name: str):
    return next(s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _label_values(text: str, name: str, label: str) -> list[str]:
    return [s.labels[label] for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
