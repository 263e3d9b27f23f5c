"""TextExposition writes exactly what prometheus_client's generate_latest writes, scrape after scrape."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, Summary, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvgate.gateway.metrics import GatewayMetrics, Outcome
from kvgate.gateway.relay import Exchange
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.protocol.events import RouterStored, WorkerKey
from kvgate.protocol.hashing import sequence_hashes
from kvgate.router.config import RouterConfig
from kvgate.router.registry import StaticDiscovery
from kvgate.router.routing import Router
from kvgate.stats import TextExposition

CHAT = "/v1/chat/completions"

TRICKY = ["plain", 'a "quoted" value', "back\\slash", "new\nline", "unicode ✓ 日本", "", "tab\tand,comma={x}"]


class _Live(Collector):
    """A custom collector whose label sets come and go between scrapes."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.extra: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "live_things", 'Things, with a "doc"\nover two lines \\ and a backslash', labels=["k"]
        )
        for key, value in self.values.items():
            family.add_metric([key], value)
        yield family
        yield from self.extra


def _registry() -> tuple[CollectorRegistry, _Live, Counter, Histogram, Summary, Gauge]:
    registry = CollectorRegistry(auto_describe=True)
    counter = Counter("things_done", "Things done", ["worker", "kind"], registry=registry)
    histogram = Histogram("thing_seconds", "Seconds", ["worker"], buckets=(0.001, 0.1, 1.5, 10), registry=registry)
    summary = Summary("thing_size", "Sizes", registry=registry)
    gauge = Gauge("things_now", "Now", registry=registry)
    live = _Live()
    registry.register(live)
    return registry, live, counter, histogram, summary, gauge


def test_equal_to_generate_latest_across_scrapes_with_changing_values_and_label_sets() -> None:
    registry, live, counter, histogram, summary, gauge = _registry()
    exposition = TextExposition(registry)
    assert exposition.render() == generate_latest(registry)
    for round_ in range(5):
        for i, value in enumerate(TRICKY):
            counter.labels(f"w{round_ % 3}", value).inc(i + 0.5)
            histogram.labels(value).observe(0.05 * i + round_)
        summary.observe(round_ * 1e-9)
        gauge.set([float("inf"), float("-inf"), float("nan"), 1e21, -0.0][round_])
        live.values = {value: float(round_ * i) for i, value in enumerate(TRICKY[round_:])}
        assert exposition.render() == generate_latest(registry)
        assert asyncio.run(exposition.render_async()) == generate_latest(registry)


def test_families_it_does_not_format_fall_back_to_the_library() -> None:
    registry, live, *_ = _registry()
    Info("build", "Build facts", registry=registry).info({"version": "1"})
    exposition = TextExposition(registry)
    assert exposition.render() == generate_latest(registry)  # info: a type it leaves to the library
    registry, live, *_ = _registry()
    exposition = TextExposition(registry)
    stamped = GaugeMetricFamily("stamped", "With a timestamp")
    stamped.add_metric([], 1.0, timestamp=1700000000.5)
    live.extra = [stamped]
    assert exposition.render() == generate_latest(registry)
    utf8 = GaugeMetricFamily("not.a.legacy.name", "Dots")
    utf8.add_metric([], 2.0)
    live.extra = [utf8]
    assert exposition.render() == generate_latest(registry)


def test_the_gateway_page_is_the_librarys() -> None:
    indexer = KvIndexer(block_size=64)
    workers = StaticDiscovery(
        [{"id": "w0", "url": "http://127.0.0.1:1"}, {"id": 'w"odd\\one', "url": "http://127.0.0.1:2"}]
    ).registry()
    prompt = list(range(200))
    indexer.apply_router_events(WorkerKey("w0"), [RouterStored(sequence_hashes(prompt, 64)[:2])])
    router = Router(RouterConfig(), indexer, workers)
    metrics = GatewayMetrics()
    router.subscribe(metrics)
    exposition_before = metrics.render()
    assert exposition_before == generate_latest(metrics.registry)
    for n in range(6):
        flight = router.begin(f"r{n}", router.route(prompt[: 100 + 20 * n]), 100 + 20 * n)
        exchange = Exchange(10.0, streamed=True, first_byte=10.25, last_byte=11.0 + n, complete=True, cached_tokens=64)
        flight.first_token()
        flight.finish(Outcome(CHAT, "200" if n % 2 else "502", exchange))
        metrics.observe_routing(0.001 * n, {"hash": 1e-5, "match": 2e-5, "score": 3e-6})
        metrics.refused(CHAT, 400 + n)
        page = metrics.render()
        assert page == generate_latest(metrics.registry)
        assert asyncio.run(metrics.render_async()) == page
    assert b"kvgate_requests_total{" in page


class _Slow(Collector):
    """A collector that takes ``seconds`` of CPU to read, noting what else ran by then."""

    def __init__(self, name: str, seconds: float, log: list[str]) -> None:
        self.name, self.seconds, self.log = name, seconds, log

    def collect(self) -> Iterable[Metric]:
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        self.log.append(self.name)
        family = GaugeMetricFamily(self.name, "Slow to read")
        family.add_metric([], 1.0)
        yield family


def test_the_async_page_lets_the_loop_run_between_slow_collectors_and_is_the_same_page() -> None:
    registry = CollectorRegistry(auto_describe=False)
    log: list[str] = []
    for n in range(3):
        registry.register(_Slow(f"slow_{n}", 0.003, log))
    exposition = TextExposition(registry)

    async def scrape_beside_a_callback() -> bytes:
        asyncio.get_running_loop().call_soon(log.append, "loop")
        return await exposition.render_async(step=0.001)

    page = asyncio.run(scrape_beside_a_callback())
    # The callback ran after the first collector, not after the whole page.
    assert log == ["slow_0", "loop", "slow_1", "slow_2"]
    log.clear()
    assert page == generate_latest(registry) == exposition.render()
    # A collector it cannot format (an info family) sends the whole page to the library, still the same text.
    Info("build", "Build facts", registry=registry).info({"version": "1"})
    assert asyncio.run(exposition.render_async()) == generate_latest(registry)
