"""``GET /metrics``: the page a real vLLM 0.32 engine serves, family for family, with live values.

The page has what the real one has (``vllm_metrics_families``, read off a real engine's
page), in its order: prometheus_client's ``python_gc_*`` / ``python_info`` /
``process_*`` collectors; vLLM's engine families with labels ``model_name`` and
``engine`` (and ``reason`` / ``sleep_state`` / ``source`` / ``finished_reason`` where vLLM
has them), counters and histograms with their ``_created`` samples, histograms with
vLLM's buckets; then the ``http_*`` families of vLLM's HTTP instrumentation
(prometheus-fastapi-instrumentator: per handler, ``/metrics`` and ``/health`` left out).
Values are read from the engine at scrape time: gauges are exact at every scrape,
counters are the engine's tallies, histograms are what the engine loop observed of its
requests (``engine_loop.LoopStats``) and what the HTTP middleware observed of each
request (``HttpStats``). What the simulator never does (multimodal cache, FLOPs
estimates, admission limits, sleeping) reads 0 (``awake`` 1), as on an engine that
never did it. ``vllm:prefix_cache_*`` count the GPU pool's hits;
``vllm:external_prefix_cache_*`` count a KV connector's (tokens loaded from the CPU or
disk tier): 0 without lower tiers, as vLLM 0.32 serves them without a connector.

The simulator's own families come last: ``kvgate_sim_cached_tokens{tier}`` splits every
prompt token found cached by the tier it came from; ``kvgate_sim_cached_blocks{tier}``
is what each tier holds now.

A scrape costs what reading ~750 numbers costs, not what building ~750 Prometheus
samples does: each family's text is laid out once (HELP / TYPE, every sample's name and
labels, the ``_created`` block) and a scrape only formats the values (``render``). The
registry still yields ordinary metric families (``collect``), so ``generate_latest`` of
it gives the same text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from itertools import islice

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from kvgate.stats import counter, family_head, gauge, sample_prefix
from kvgate.worker.sim.config import EngineConfig
from kvgate.worker.sim.engine_loop import EngineLoop, Histogram
from kvgate.worker.sim.vllm_metrics_families import CACHE_CONFIG_INFO, FAMILIES, Family

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_CONSTANT_LABELS = ("engine", "model_name")
# Families of features the simulator has no notion of: 0, as a real engine that never used them.
_NEVER_USED = frozenset(
    {
        "vllm:estimated_flops_per_gpu",
        "vllm:estimated_read_bytes_per_gpu",
        "vllm:estimated_write_bytes_per_gpu",
        "vllm:mm_cache_queries",
        "vllm:mm_cache_hits",
        "vllm:admission_rejections",
    }
)
_HTTP = {f.name: f for f in FAMILIES if f.name.startswith("http_")}
_EXCLUDED_HANDLERS = frozenset({"/metrics", "/health", "/load", "/ping", "/version", "/server_info"})

Source = Callable[[], "float | Mapping[str, float]"]


def _never() -> Mapping[str, float]:
    return {}


class _Family:
    """One family laid out for exposition; its values come as a flat list, one per sample slot."""

    def __init__(self, name: str, kind: str, doc: str, bounds: Sequence[float] = ()) -> None:
        self.name, self.kind, self.doc = name, kind, doc
        self.bounds = tuple(bounds)
        self.head = family_head(name, kind, doc)
        self.created_head = family_head(name + "_created", "gauge", doc)
        self.slots: list[tuple[str, dict[str, str]]] = []  # (sample name, labels) per value
        self.prefixes: list[str] = []
        self.created: list[tuple[dict[str, str], float]] = []
        self.created_text = ""
        self.num_labelsets = 0

    def add(self, labels: dict[str, str], created: float) -> None:
        """One more label set (a child, in prometheus_client's terms), created at ``created``."""
        name, kind = self.name, self.kind
        if kind == "counter":
            slots = [(name + "_total", labels)]
        elif kind == "gauge":
            slots = [(name, labels)]
        elif kind == "histogram":
            slots = [(name + "_bucket", {**labels, "le": floatToGoString(b)}) for b in (*self.bounds, math.inf)]
            slots += [(name + "_count", labels), (name + "_sum", labels)]
        else:  # summary
            slots = [(name + "_count", labels), (name + "_sum", labels)]
        self.slots += slots
        self.prefixes += [sample_prefix(n, lab) for n, lab in slots]
        if kind != "gauge":
            self.created.append((labels, created))
            self.created_text += sample_prefix(name + "_created", labels) + floatToGoString(created) + "\n"
        self.num_labelsets += 1

    def text(self, values: Sequence[float]) -> str:
        lines = [p + floatToGoString(v) + "\n" for p, v in zip(self.prefixes, values, strict=True)]
        created = self.created_head + self.created_text if self.created_text else ""
        return self.head + "".join(lines) + created

    def metric(self, values: Sequence[float]) -> Metric:
        family = Metric(self.name, self.doc, self.kind)
        for (name, labels), value in zip(self.slots, values, strict=True):
            family.add_sample(name, labels, float(value))
        for labels, created in self.created:
            family.add_sample(self.name + "_created", labels, created)
        return family


def _histogram_values(h: Histogram) -> list[float]:
    """Cumulative bucket counts (``+Inf`` last), then count and sum."""
    values: list[float] = []
    total = 0
    for n in h.counts:
        total += n
        values.append(total)
    values.append(total)
    values.append(h.sum)
    return values


class HttpStats:
    """What vLLM's HTTP instrumentation (prometheus-fastapi-instrumentator) records per request.

    Keyed by the route (``handler``; ``none`` when no route matched), method and status
    class (``2xx``); request and response sizes are their ``Content-Length`` (0 without
    one, as for a stream). Keys keep the order they were first seen in, with the time.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], list[float]] = {}  # (handler, method, status) -> [n, created]
        self.request_size: dict[str, list[float]] = {}  # handler -> [count, sum, created]
        self.response_size: dict[str, list[float]] = {}
        self.duration: dict[tuple[str, str], tuple[Histogram, float]] = {}  # (handler, method) -> (h, created)
        self.duration_highr = Histogram(_HTTP["http_request_duration_highr_seconds"].buckets)
        self.created = time.time()

    def observe(
        self, handler: str, method: str, status: int, request_bytes: int, response_bytes: int, seconds: float
    ) -> None:
        if handler in _EXCLUDED_HANDLERS:
            return
        key = (handler, method, f"{status // 100}xx")
        found = self.requests.get(key)
        if found is None:
            self.requests[key] = [1, time.time()]
        else:
            found[0] += 1
        for sizes, size in ((self.request_size, request_bytes), (self.response_size, response_bytes)):
            summary = sizes.get(handler)
            if summary is None:
                sizes[handler] = [1, size, time.time()]
            else:
                summary[0] += 1
                summary[1] += size
        self.duration_highr.observe(seconds)
        timed = self.duration.get((handler, method))
        if timed is None:
            timed = self.duration[handler, method] = (
                Histogram(_HTTP["http_request_duration_seconds"].buckets),
                time.time(),
            )
        timed[0].observe(seconds)


def _cache_config_info(config: EngineConfig) -> dict[str, str]:
    """``vllm:cache_config_info``'s labels: the simulator's settings where it has them, else the real page's."""
    tokens = config.num_gpu_blocks * config.block_size
    labels = dict(CACHE_CONFIG_INFO)
    labels.update(
        block_size=str(config.block_size),
        effective_attention_block_size=str(config.block_size),
        engine="0",
        kv_cache_max_concurrency=str(tokens / config.max_model_len),
        kv_cache_memory_bytes=str(config.num_gpu_blocks * config.bytes_per_block),
        kv_cache_size_tokens=str(tokens),
        num_cpu_blocks=str(config.tiers.cpu_blocks) if config.tiers.cpu_blocks else "None",
        num_gpu_blocks=str(config.num_gpu_blocks),
        num_gpu_blocks_override=str(config.num_gpu_blocks),
        prefix_caching_hash_algo="xxhash",  # what the simulator's block hashes are like
    )
    return labels


class VllmPage(Collector):
    """vLLM's engine and HTTP families, in the real page's order, read at scrape time."""

    def __init__(self, engine: EngineLoop, model_name: str, http: HttpStats) -> None:
        self._engine = engine
        self._http = http
        self._model_name = model_name
        self._created = time.time()
        self._families: list[tuple[_Family, Callable[[], list[float]]]] = []
        self._sources = self._read_engine()
        for spec in FAMILIES:
            family = _Family(spec.name, spec.kind, spec.help, spec.buckets)
            if spec.name in _HTTP:
                self._families.append((family, self._http_reader(family)))
            elif spec.kind == "histogram":
                hist = engine.stats.histogram(spec.name)
                family.bounds = hist.bounds  # the token histograms follow max_model_len, as vLLM's
                family.add(self._labels(spec), self._created)
                self._families.append((family, partial(_histogram_values, hist)))
            else:
                self._families.append((family, self._scalar_reader(spec, family)))

    def _labels(self, spec: Family, extra: Sequence[str] = ()) -> dict[str, str]:
        constant = {"engine": "0", "model_name": self._model_name}
        labels = {k: v for k, v in constant.items() if k in spec.labels}
        names = [k for k in spec.labels if k not in _CONSTANT_LABELS]
        labels.update(zip(names, extra))
        return labels

    def _scalar_reader(self, spec: Family, family: _Family) -> Callable[[], list[float]]:
        if spec.name == "vllm:cache_config_info":
            family.add(_cache_config_info(self._engine.scheduler.config), self._created)
            return lambda: [1.0]
        source = _never if spec.name in _NEVER_USED else self._sources[spec.name]
        if not spec.label_values:
            family.add(self._labels(spec), self._created)

            def read_one() -> list[float]:
                found = source()
                return [0.0 if isinstance(found, Mapping) else float(found)]

            return read_one
        keys = [values[0] for values in spec.label_values]
        for values in spec.label_values:
            family.add(self._labels(spec, values), self._created)

        def read() -> list[float]:
            found = source()
            assert isinstance(found, Mapping)
            return [float(found.get(k, 0)) for k in keys]

        return read

    def _read_engine(self) -> dict[str, Source]:
        """What each family the engine knows reads: a number, or numbers by label value."""
        engine = self._engine
        s, stats = engine.scheduler, engine.stats
        kv = s.kv
        return {
            "vllm:num_requests_running": lambda: len(s.running),
            "vllm:num_requests_waiting": lambda: len(s.waiting),
            # Every waiting request waits for capacity: nothing defers one (LoRA, KV transfer).
            "vllm:num_requests_waiting_by_reason": lambda: {"capacity": len(s.waiting)},
            "vllm:engine_sleep_state": lambda: {"awake": 1},
            "vllm:kv_cache_usage_perc": lambda: s.pool.usage,
            "vllm:prefix_cache_queries": lambda: kv.queries,
            "vllm:prefix_cache_hits": lambda: kv.hits,
            "vllm:external_prefix_cache_queries": lambda: kv.external_queries,
            "vllm:external_prefix_cache_hits": lambda: kv.external_hits,
            "vllm:num_preemptions": lambda: s.num_preemptions,
            "vllm:prompt_tokens": lambda: stats.prompt_tokens,
            "vllm:prompt_tokens_by_source": lambda: {
                "local_compute": stats.prompt_tokens_computed,
                "local_cache_hit": stats.prompt_tokens_local_hit,
                "external_kv_transfer": stats.prompt_tokens_external_hit,
            },
            "vllm:prompt_tokens_cached": lambda: stats.prompt_tokens_local_hit + stats.prompt_tokens_external_hit,
            # Counted at admission, by tier: the GPU pool is vLLM's device, the CPU tier its host.
            "vllm:prompt_tokens_cached_by_source": lambda: dict(
                zip(("device", "host", "disk"), kv.cached_tokens_per_tier)
            ),
            "vllm:generation_tokens": lambda: stats.generation_tokens,
            "vllm:request_success": lambda: stats.finished,
        }

    def _http_reader(self, family: _Family) -> Callable[[], list[float]]:
        http = self._http
        if family.name == "http_requests":

            def read() -> list[float]:
                for (handler, method, status), (_, created) in islice(
                    http.requests.items(), family.num_labelsets, None
                ):
                    family.add({"handler": handler, "method": method, "status": status}, created)
                return [n for n, _ in http.requests.values()]

        elif family.name in ("http_request_size_bytes", "http_response_size_bytes"):
            sizes = http.request_size if family.name == "http_request_size_bytes" else http.response_size

            def read() -> list[float]:
                for handler, (_, _, created) in islice(sizes.items(), family.num_labelsets, None):
                    family.add({"handler": handler}, created)
                return [v for count, total, _ in sizes.values() for v in (count, total)]

        elif family.name == "http_request_duration_highr_seconds":
            family.add({}, http.created)

            def read() -> list[float]:
                return _histogram_values(http.duration_highr)

        else:

            def read() -> list[float]:
                for (handler, method), (_, created) in islice(http.duration.items(), family.num_labelsets, None):
                    family.add({"handler": handler, "method": method}, created)
                return [v for h, _ in http.duration.values() for v in _histogram_values(h)]

        return read

    def text(self) -> str:
        return "".join(family.text(read()) for family, read in self._families)

    def collect(self) -> Iterator[Metric]:
        for family, read in self._families:
            yield family.metric(read())


class SimCacheCollector(Collector):
    """The simulator's own families: cached prompt tokens and held blocks, by tier."""

    def __init__(self, engine: EngineLoop, model_name: str) -> None:
        self._engine = engine
        self._labels = {"model_name": model_name, "engine": "0"}

    def collect(self) -> Iterator[Metric]:
        s = self._engine.scheduler
        labels = self._labels
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


class SimRegistry(CollectorRegistry):
    """The worker's registry: process collectors, ``VllmPage``, then the simulator's own families.

    ``render()`` writes the same text as ``generate_latest`` of it, only faster.
    """

    def __init__(self, engine: EngineLoop, model_name: str) -> None:
        super().__init__(auto_describe=False)
        self.http = HttpStats()
        self.process = CollectorRegistry(auto_describe=False)
        # The default registry's collectors, in its order (vLLM serves that registry).
        GCCollector(registry=self.process)
        PlatformCollector(registry=self.process)
        ProcessCollector(registry=self.process)
        self.page = VllmPage(engine, model_name, self.http)
        self.own = CollectorRegistry(auto_describe=False)
        self.own.register(SimCacheCollector(engine, model_name))
        for part in (self.process, self.page, self.own):
            self.register(part)

    def render(self) -> bytes:
        return generate_latest(self.process) + self.page.text().encode() + generate_latest(self.own)


def make_registry(engine: EngineLoop, model_name: str) -> SimRegistry:
    return SimRegistry(engine, model_name)
