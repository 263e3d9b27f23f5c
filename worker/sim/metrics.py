"""``GET /metrics``: vLLM's Prometheus names, read from the engine at scrape time.

A collector on its own ``CollectorRegistry`` reports the scheduler's live state, so
gauges are exact at every scrape and counters are the engine's own tallies. Labels are
vLLM's (``model_name``, ``engine``). ``vllm:prefix_cache_*`` count the GPU pool's hits;
with lower tiers, ``vllm:external_prefix_cache_*`` count the connector's (tokens loaded
from CPU or disk), as vLLM reports a KV connector. ``kvgate_sim_cached_tokens{tier}``
(the simulator's own) splits every prompt token found cached by the tier it came from;
``kvgate_sim_cached_blocks{tier}`` is what each tier holds now.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from kvgate.stats import Field, counter, counters, gauge
from kvgate.worker.sim.engine_loop import EngineLoop

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_PREFIX_CACHE = (
    Field("queries", "Prefix cache queries, in terms of number of queried tokens.", "prefix_cache_queries"),
    Field("hits", "Prefix cache hits, in terms of number of cached tokens.", "prefix_cache_hits"),
)
_EXTERNAL_PREFIX_CACHE = (
    Field(
        "external_queries",
        "External prefix cache queries from KV connector cross-instance cache sharing, "
        "in terms of number of queried tokens.",
        "external_prefix_cache_queries",
    ),
    Field(
        "external_hits",
        "External prefix cache hits from KV connector cross-instance cache sharing, "
        "in terms of number of cached tokens.",
        "external_prefix_cache_hits",
    ),
)
_LOOP = (
    Field("prompt_tokens", "Number of prefill tokens processed."),
    Field("generation_tokens", "Number of generation tokens processed."),
    Field("finished", "Count of successfully processed requests.", "request_success", label="finished_reason"),
)


class EngineCollector(Collector):
    def __init__(self, engine: EngineLoop, model_name: str) -> None:
        self._engine = engine
        self._labels = {"model_name": model_name, "engine": "0"}

    def collect(self) -> Iterator[Metric]:
        s = self._engine.scheduler
        labels = self._labels
        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", len(s.running), labels=labels
        )
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", len(s.waiting), labels=labels
        )
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.pool.usage, labels=labels
        )
        yield from counters("vllm:", s.kv, _PREFIX_CACHE, labels=labels)
        if s.lower is not None:
            yield from counters("vllm:", s.kv, _EXTERNAL_PREFIX_CACHE, labels=labels)
        yield counter(
            "kvgate_sim_cached_tokens",
            "Prompt tokens found cached at admission, by tier.",
            dict(zip(("gpu", "cpu", "disk"), s.kv.cached_tokens_per_tier)),
            label="tier",
            labels=labels,
        )
        held = {"gpu": s.pool.num_cached_hashes}
        for store in s.lower.stores if s.lower is not None else ():
            held[store.tier.name.lower()] = len(store)
        yield gauge(
            "kvgate_sim_cached_blocks", "Distinct blocks each cache tier holds now.", held, label="tier", labels=labels
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemptions from the engine.",
            s.num_preemptions,
            labels=labels,
        )
        yield from counters("vllm:", self._engine.stats, _LOOP, labels=labels)


def make_registry(engine: EngineLoop, model_name: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, model_name))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
