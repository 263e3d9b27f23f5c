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

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvgate.worker.sim.engine_loop import EngineLoop

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineCollector:
    def __init__(self, engine: EngineLoop, model_name: str) -> None:
        self._engine = engine
        self._labels = {"model_name": model_name, "engine": "0"}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self._labels))
        g.add_metric(list(self._labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self._labels))
        c.add_metric(list(self._labels.values()), value)
        return c

    def collect(self):
        s = self._engine.scheduler
        stats = self._engine.stats
        yield self._gauge("vllm:num_requests_running", "Number of requests in model execution batches.", len(s.running))
        yield self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", len(s.waiting))
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.pool.usage)
        yield self._counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", s.kv.queries)
        yield self._counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", s.kv.hits)
        if s.lower is not None:
            yield self._counter("vllm:external_prefix_cache_queries",
                                "External prefix cache queries from KV connector cross-instance cache sharing, "
                                "in terms of number of queried tokens.", s.kv.external_queries)
            yield self._counter("vllm:external_prefix_cache_hits",
                                "External prefix cache hits from KV connector cross-instance cache sharing, "
                                "in terms of number of cached tokens.", s.kv.external_hits)
        tiers = CounterMetricFamily("kvgate_sim_cached_tokens", "Prompt tokens found cached at admission, by tier.",
                                    labels=[*self._labels, "tier"])
        for tier, tokens in zip(("gpu", "cpu", "disk"), s.kv.cached_tokens_per_tier):
            tiers.add_metric([*self._labels.values(), tier], tokens)
        yield tiers
        held = GaugeMetricFamily("kvgate_sim_cached_blocks", "Distinct blocks each cache tier holds now.",
                                 labels=[*self._labels, "tier"])
        held.add_metric([*self._labels.values(), "gpu"], s.pool.num_cached_hashes)
        for store in s.lower.stores if s.lower is not None else ():
            held.add_metric([*self._labels.values(), store.tier.name.lower()], len(store))
        yield held
        yield self._counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", s.num_preemptions)
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens)
        yield self._counter("vllm:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens)
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=[*self._labels, "finished_reason"])
        for reason, count in sorted(stats.finished.items()):
            success.add_metric([*self._labels.values(), reason], count)
        yield success


def make_registry(engine: EngineLoop, model_name: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, model_name))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
