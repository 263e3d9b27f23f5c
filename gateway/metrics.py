"""Prometheus metrics of the gateway, on its own registry, every name under ``kvgate_``.

Request-path metrics (counters, histograms) are counted by ``GatewayMetrics`` as a
``RequestListener`` on the router: a routed request is counted once, when its
``InFlight`` handle finishes with an ``Outcome`` (route, status, the relayed
``Exchange``); a handle finished without one (cancelled before any answer) is not an
answer and is not counted. Requests refused before any worker was tried are counted
by ``refused``; routing stages, retries and inter-chunk gaps by the request path as
they happen. State that already lives elsewhere (index size per worker and tier, the
indexer's event statistics, active load, worker health, whose predictions are trusted)
is read only when ``/metrics`` is scraped, by ``_StateCollector``, so the request path
never pays for it. Predicted against reported cached tokens are counted by
``observe_prediction``, called by ``hit_check.HitCheck`` (which compares them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvgate.gateway.errors import NO_WORKER
from kvgate.gateway.relay import Exchange
from kvgate.protocol.events import Tier, WorkerKey
from kvgate.router.lifecycle import InFlight
from kvgate.stats import Field, TextExposition, counter, counters, gauge

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_ROUTING_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5)
_BLOCK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_RATE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)
ROUTING_STAGES = ("tokenize", "hash", "match", "score", "forward")


# The indexer's counters (IndexerStats), as /metrics exports them.
INDEX_STATS = (
    Field("events_applied", "KV events applied to the index"),
    Field("blocks_stored", "Block stores applied"),
    Field("blocks_removed", "Block removals applied"),
    Field("gaps", "Sequence gaps detected in a worker's event stream"),
    Field("replays_requested", "Replays asked of a worker's replay socket"),
    Field("replays_failed", "Replays that failed (the stream continued without a reset)"),
    Field("restarts", "Engine restarts detected (sequence fell back)"),
    Field("duplicates", "Batches dropped as already applied"),
    Field("unknown_parent", "Stores whose parent block was unknown"),
    Field("unknown_block", "Removals or tier updates naming an unknown block"),
    Field("rejected", "Event batches rejected, by reason", name="events_rejected"),
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a routed request ended: what ``InFlight.finish`` carries to the request metrics."""

    route: str
    status: str
    exchange: Exchange | None = None
    """The relayed answer; None when no worker answered (every attempt failed)."""
    sequences: int = 1
    """Prompts x choices the worker ran (a completion batch, ``n``): its usage's
    ``cached_tokens`` describes the routed prompt exactly only when 1."""


@dataclass(frozen=True, slots=True)
class StateSources:
    """Read at scrape time. Each callable returns the current value of what it names."""

    block_counts: Callable[[], Mapping[WorkerKey, tuple[int, int, int]]]
    indexer_stats: Callable[[], Any]
    load: Callable[[], Mapping[WorkerKey, Any]]
    workers_up: Callable[[], Mapping[str, bool]]
    prediction_trusted: Callable[[], Mapping[str, bool]] | None = None
    """Per worker: whether its index's predictions agree with what its engine reports."""
    extra: Callable[[], Iterable[Metric]] | None = None
    """More families (distributed mode: bus and discovery state)."""


# The event-loop lag monitor's tick; a stall longer than STALL_SECONDS is counted.
LOOP_TICK_SECONDS = 0.01
# Its tick while the loop thread is busy (used over BUSY_FRACTION of the last interval).
LOOP_BUSY_TICK_SECONDS = 0.002
BUSY_FRACTION = 0.25
STALL_SECONDS = 0.005


class CallbackProbe:
    """Diagnostic (``--loop-probe``): the CPU time of every callback asyncio's event loop runs, so
    the longest stretch one piece of work held the loop is measured, not bounded. ``LoopLag``'s busy
    gap cannot tell one long callback from a burst of short ones run back to back (both make its
    timer late); this can. It replaces ``asyncio.events.Handle._run`` for the process (uvloop's
    handles cannot be wrapped, so the probe runs on asyncio's loop) and costs two thread-clock reads
    a callback. Exported by ``LoopLag`` once installed."""

    installed = False
    max_callback = 0.0
    max_callback_ever = 0.0
    slow_callbacks = 0

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        cls.installed = True
        run = asyncio.events.Handle._run
        clock = time.thread_time

        def timed(handle: asyncio.events.Handle) -> None:
            start = clock()
            run(handle)
            used = clock() - start
            if used > cls.max_callback:
                cls.max_callback = used
                if used > cls.max_callback_ever:
                    cls.max_callback_ever = used
            if used > STALL_SECONDS:
                cls.slow_callbacks += 1

        asyncio.events.Handle._run = timed  # type: ignore[method-assign]

    @classmethod
    def take_max(cls) -> float:
        longest, cls.max_callback = cls.max_callback, 0.0
        return longest


class LoopLag(Collector):
    """How long the event loop was unable to run a callback that was due: a timer re-armed every
    ``tick`` seconds notes how late it fires. Costs one callback per tick (~100/s, a few
    microseconds each). Exported as ``kvgate_event_loop_max_gap_seconds`` (the largest
    lateness since the previous scrape, reset by each scrape) and
    ``kvgate_event_loop_stalls_total`` (ticks later than ``stall`` seconds), plus
    ``kvgate_event_loop_max_gap_ever_seconds`` (since start-up).

    The busy gap (``..._max_busy_gap_seconds``) is the part of a lateness the loop's own
    thread spent computing, not descheduled by a machine shared with other processes: at
    most the thread's CPU time since the previous tick. That bound also holds what the
    thread computed before the tick was due, up to a whole tick: so while the thread is
    busy (over ``busy_fraction`` of the last interval) the timer ticks every ``busy_tick``
    seconds, which keeps that excess under ``busy_tick`` where it matters, for ~500 cheap
    callbacks a second only under load; idle, it ticks every ``tick``."""

    def __init__(
        self,
        tick: float = LOOP_TICK_SECONDS,
        stall: float = STALL_SECONDS,
        busy_tick: float = LOOP_BUSY_TICK_SECONDS,
        busy_fraction: float = BUSY_FRACTION,
    ) -> None:
        self.tick = tick
        self.busy_tick = min(busy_tick, tick)
        self.busy_fraction = busy_fraction
        self.stall = stall
        self.max_gap = 0.0
        self.max_gap_ever = 0.0
        self.max_busy_gap = 0.0
        self.max_busy_gap_ever = 0.0
        self.stalls = 0
        self._due = 0.0
        self._cpu = 0.0
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.reset(time.perf_counter(), time.thread_time())
        self._timer = self._loop.call_later(self.tick, self._fire)

    def reset(self, now: float, cpu: float) -> None:
        """Begin at ``now`` with the thread's CPU clock at ``cpu``; the first tick is due a tick later."""
        self._last = now
        self._due = now + self.tick
        self._cpu = cpu

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        tick = self.observe(time.perf_counter(), time.thread_time())
        assert self._loop is not None
        self._timer = self._loop.call_later(tick, self._fire)

    def observe(self, now: float, cpu: float) -> float:
        """One tick fired at ``now`` (perf_counter) with the loop thread's CPU clock at ``cpu``:
        note its lateness and busy lateness; return the delay until the next tick is due."""
        late = now - self._due
        if late > self.max_gap:
            self.max_gap = late
            if late > self.max_gap_ever:
                self.max_gap_ever = late
        # Lateness the loop's own thread was running through, not descheduled (a shared
        # machine starves the process too): the CPU it used since the last tick bounds it.
        used = cpu - self._cpu
        busy = min(late, used)
        self._cpu = cpu
        if busy > self.max_busy_gap:
            self.max_busy_gap = busy
            if busy > self.max_busy_gap_ever:
                self.max_busy_gap_ever = busy
        if late > self.stall:
            self.stalls += 1
        tick = self.busy_tick if used > self.busy_fraction * (now - self._last) else self.tick
        self._last = now
        self._due = now + tick
        return tick

    def take_max_gap(self) -> float:
        gap, self.max_gap = self.max_gap, 0.0
        return gap

    def take_max_busy_gap(self) -> float:
        gap, self.max_busy_gap = self.max_busy_gap, 0.0
        return gap

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "kvgate_event_loop_max_gap_seconds",
            "Longest the event loop was late running a due callback since the previous scrape (reset by each scrape)",
            value=self.take_max_gap(),
        )
        yield GaugeMetricFamily(
            "kvgate_event_loop_max_busy_gap_seconds",
            "Longest lateness of a due callback while the loop thread was running (an upper bound on how long "
            "work blocked it; lateness while the process was descheduled excluded) since the previous scrape",
            value=self.take_max_busy_gap(),
        )
        yield GaugeMetricFamily(
            "kvgate_event_loop_max_busy_gap_ever_seconds",
            "kvgate_event_loop_max_busy_gap_seconds since start-up",
            value=self.max_busy_gap_ever,
        )
        yield GaugeMetricFamily(
            "kvgate_event_loop_max_gap_ever_seconds",
            "Longest the event loop was late running a due callback since start-up",
            value=self.max_gap_ever,
        )
        yield counter(
            "kvgate_event_loop_stalls",
            f"Times the event loop was more than {self.stall * 1e3:g} ms late running a due callback",
            self.stalls,
        )
        if CallbackProbe.installed:
            yield gauge(
                "kvgate_event_loop_max_callback_seconds",
                "Longest CPU time one event-loop callback ran since the previous scrape (--loop-probe)",
                CallbackProbe.take_max(),
            )
            yield gauge(
                "kvgate_event_loop_max_callback_ever_seconds",
                "kvgate_event_loop_max_callback_seconds since start-up (--loop-probe)",
                CallbackProbe.max_callback_ever,
            )
            yield counter(
                "kvgate_event_loop_slow_callbacks",
                f"Event-loop callbacks that ran over {STALL_SECONDS * 1e3:g} ms of CPU (--loop-probe)",
                CallbackProbe.slow_callbacks,
            )


class GatewayMetrics:
    def __init__(self, state: StateSources | None = None) -> None:
        # `_created` series double the scrape for no use here (process-global, as the library has it).
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self._exposition = TextExposition(self.registry)
        r = self.registry
        self.requests = Counter(
            "kvgate_requests",
            "Requests answered, by route, HTTP status and worker",
            ("route", "status", "worker"),
            registry=r,
        )
        self.ttft = Histogram(
            "kvgate_time_to_first_token_seconds",
            "From request arrival to the first byte of the worker's answer relayed",
            ("route", "worker"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "kvgate_inter_token_latency_seconds",
            "Gap between consecutive streamed chunks relayed to the client, per chunk",
            ("worker",),
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kvgate_e2e_request_latency_seconds",
            "From request arrival to the last byte relayed",
            ("route", "worker"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kvgate_prompt_tokens", "Prompt tokens routed (gateway's tokenization)", ("worker",), registry=r
        )
        self.cached_tokens = Counter(
            "kvgate_cached_tokens",
            "Prompt tokens the worker reported served from its prefix cache "
            "(usage.prompt_tokens_details.cached_tokens)",
            ("worker",),
            registry=r,
        )
        self.predicted_cached_tokens = Counter(
            "kvgate_predicted_cached_tokens",
            "Cached prompt tokens the index predicted for the worker that served the answer "
            "(its prefix in any tier, the engine's last-token rule applied), over the answers "
            "compared with the engine's report",
            ("worker",),
            registry=r,
        )
        self.engine_cached_tokens = Counter(
            "kvgate_engine_cached_tokens",
            "Cached prompt tokens the engine reported, over the same answers as kvgate_predicted_cached_tokens "
            "(one prompt, one choice, usage reported)",
            ("worker",),
            registry=r,
        )
        self.prediction_checks = Counter(
            "kvgate_prediction_checks",
            "Answers whose reported cached tokens were compared with the index's prediction",
            ("worker",),
            registry=r,
        )
        self.prediction_mismatches = Counter(
            "kvgate_prediction_mismatches",
            "Compared answers whose reported cached tokens differ from the prediction by a block or more",
            ("worker",),
            registry=r,
        )
        self.prompt_blocks = Counter(
            "kvgate_prompt_blocks", "Full KV blocks of the routed prompts", ("worker",), registry=r
        )
        self.overlap_blocks_total = Counter(
            "kvgate_overlap_blocks",
            "Prompt blocks the index said the chosen worker held, by tier",
            ("worker", "tier"),
            registry=r,
        )
        self.overlap_blocks = Histogram(
            "kvgate_request_overlap_blocks",
            "Per request: prefix blocks the chosen worker held (any tier)",
            ("worker",),
            buckets=_BLOCK_BUCKETS,
            registry=r,
        )
        self.hit_rate = Histogram(
            "kvgate_request_prefix_hit_rate",
            "Per request: overlap blocks / prompt blocks on the chosen worker (requests with at least one full block)",
            ("worker",),
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.routing = Histogram(
            "kvgate_routing_overhead_seconds",
            "Time spent before forwarding, by stage (tokenize, hash, match, score); forward: all of it, from the "
            "request's arrival until it is sent to its first worker",
            ("stage",),
            buckets=_ROUTING_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "kvgate_upstream_retries",
            "Forwards retried on the next-best worker, by reason",
            ("worker", "reason"),
            registry=r,
        )
        self.aborted = Counter(
            "kvgate_client_disconnects",
            "Requests whose client went away before the answer ended (upstream cancelled)",
            ("worker",),
            registry=r,
        )
        self.stream_failures = Counter(
            "kvgate_stream_failures",
            "Streams the worker broke off after the first byte (ended with an SSE error event)",
            ("worker",),
            registry=r,
        )
        self.rate_limited = Counter(
            "kvgate_rate_limited",
            "Requests refused with a 429 by the per-client rate limits, by the budget spent (requests, tokens)",
            ("reason",),
            registry=r,
        )
        self._routing_children = {stage: self.routing.labels(stage) for stage in ROUTING_STAGES}
        # labels() takes a lock and a dict lookup; the request path caches the children it uses.
        self._children: dict[tuple[Any, ...], Any] = {}
        self.loop_lag = LoopLag()
        self.registry.register(self.loop_lag)
        if state is not None:
            self.registry.register(_StateCollector(state))

    def child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    # -- the request lifecycle (a RequestListener on the router) --------------------------

    def on_begin(self, flight: InFlight) -> None:
        """Nothing to count yet: a request is counted once, when it ends."""

    def on_first_token(self, flight: InFlight) -> None:
        """Nothing to count: the time to first token is read from the ``Exchange`` at the end."""

    def on_finish(self, flight: InFlight) -> None:
        outcome = flight.outcome
        if not isinstance(outcome, Outcome):
            return  # cancelled before any answer: not an answer to count
        route, status, worker = outcome.route, outcome.status, flight.key.worker_id
        self.child(self.requests, route, status, worker).inc()
        if status == "499":
            self.child(self.aborted, worker).inc()
        exchange = outcome.exchange
        if exchange is None:
            return
        if exchange.first_byte is not None and exchange.streamed:
            self.child(self.ttft, route, worker).observe(exchange.first_byte - exchange.started)
        if exchange.complete and exchange.last_byte is not None:
            self.child(self.e2e, route, worker).observe(exchange.last_byte - exchange.started)
        if exchange.upstream_error is not None:
            self.child(self.stream_failures, worker).inc()
        if status == "200":
            self._observe_prompt(flight, worker, exchange)

    def observe_prediction(self, worker: str, predicted_tokens: int, actual_tokens: int, mismatch: bool) -> None:
        """One answer's predicted and reported cached tokens (``hit_check.HitCheck`` compares them)."""
        self.child(self.prediction_checks, worker).inc()
        self.child(self.predicted_cached_tokens, worker).inc(predicted_tokens)
        self.child(self.engine_cached_tokens, worker).inc(actual_tokens)
        if mismatch:
            self.child(self.prediction_mismatches, worker).inc()

    def refused(self, route: str, status: int) -> None:
        """A request answered with an error before any worker was tried."""
        self.child(self.requests, route, str(status), NO_WORKER).inc()

    def observe_routing(self, tokenize: float, timings: Mapping[str, float]) -> None:
        children = self._routing_children
        children["tokenize"].observe(tokenize)
        for stage in ("hash", "match", "score"):
            value = timings.get(stage)
            if value is not None:
                children[stage].observe(value)

    def observe_forward(self, seconds: float) -> None:
        self._routing_children["forward"].observe(seconds)

    def _observe_prompt(self, flight: InFlight, worker: str, exchange: Exchange) -> None:
        self.child(self.prompt_tokens, worker).inc(flight.prompt_tokens)
        if exchange.cached_tokens is not None:
            self.child(self.cached_tokens, worker).inc(exchange.cached_tokens)
        score = flight.decision.score_of(flight.key)
        if score is not None:
            self._observe_overlap(
                worker, flight.decision.num_blocks, (score.gpu_blocks, score.cpu_blocks, score.disk_blocks)
            )

    def _observe_overlap(self, worker: str, prompt_blocks: int, per_tier: Iterable[int]) -> None:
        per_tier = list(per_tier)
        # A head-routed prompt's worker may be scored on more than its head (``Router.route_head``'s holder).
        per_tier[0] = max(0, min(per_tier[0], prompt_blocks - sum(per_tier[1:])))
        overlap = sum(per_tier)
        self.child(self.prompt_blocks, worker).inc(prompt_blocks)
        for tier, count in zip(Tier, per_tier):
            if count:
                self.child(self.overlap_blocks_total, worker, tier.name).inc(count)
        self.child(self.overlap_blocks, worker).observe(overlap)
        if prompt_blocks:
            self.child(self.hit_rate, worker).observe(overlap / prompt_blocks)

    def render(self) -> bytes:
        return self._exposition.render()

    async def render_async(self) -> bytes:
        """The page, yielding the event loop between collectors (what ``/metrics`` serves)."""
        return await self._exposition.render_async()


class _StateCollector(Collector):
    def __init__(self, state: StateSources) -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        # Described lazily: collect() reads live gateway state that may not exist yet.
        return []

    def collect(self) -> Iterable[Metric]:
        yield from self._index()
        yield from self._events()
        yield from self._load()
        up = GaugeMetricFamily("kvgate_worker_up", "1 while the worker answers its /health", labels=("worker",))
        for worker, ok in sorted(self.state.workers_up().items()):
            up.add_metric((worker,), 1.0 if ok else 0.0)
        yield up
        if self.state.prediction_trusted is not None:
            trusted = GaugeMetricFamily(
                "kvgate_worker_prediction_trusted",
                "1 while the worker's cached tokens agree with the index's predictions (its matches are used), "
                "0 once they disagree persistently",
                labels=("worker",),
            )
            for worker, ok in sorted(self.state.prediction_trusted().items()):
                trusted.add_metric((worker,), 1.0 if ok else 0.0)
            yield trusted
        if self.state.extra is not None:
            yield from self.state.extra()

    def _index(self) -> Iterable[Metric]:
        blocks = GaugeMetricFamily(
            "kvgate_index_blocks",
            "Blocks the prefix index holds per worker, rank and tier",
            labels=("worker", "dp_rank", "tier"),
        )
        for key, counts in sorted(self.state.block_counts().items()):
            for tier, count in zip(Tier, counts):
                blocks.add_metric((key.worker_id, str(key.dp_rank), tier.name), count)
        yield blocks

    def _events(self) -> Iterable[Metric]:
        stats = self.state.indexer_stats()
        if stats is None:
            return
        yield from counters("kvgate_index_", stats, INDEX_STATS)

    def _load(self) -> Iterable[Metric]:
        gauges = {
            "requests": GaugeMetricFamily(
                "kvgate_active_requests", "Requests routed to the worker and not finished", labels=("worker", "dp_rank")
            ),
            "prefill_tokens": GaugeMetricFamily(
                "kvgate_active_prefill_tokens",
                "Prompt tokens routed to the worker still awaiting their first token",
                labels=("worker", "dp_rank"),
            ),
            "blocks": GaugeMetricFamily(
                "kvgate_active_blocks", "KV blocks held by the worker's active requests", labels=("worker", "dp_rank")
            ),
            "remote_requests": GaugeMetricFamily(
                "kvgate_active_remote_requests",
                "Of kvgate_active_requests, those routed by other gateway replicas",
                labels=("worker", "dp_rank"),
            ),
            "running": GaugeMetricFamily(
                "kvgate_engine_running", "vllm:num_requests_running as last scraped", labels=("worker", "dp_rank")
            ),
            "waiting": GaugeMetricFamily(
                "kvgate_engine_waiting", "vllm:num_requests_waiting as last scraped", labels=("worker", "dp_rank")
            ),
            "kv_usage": GaugeMetricFamily(
                "kvgate_engine_kv_usage", "vllm:kv_cache_usage_perc as last scraped", labels=("worker", "dp_rank")
            ),
        }
        for key, snap in sorted(self.state.load().items()):
            labels = (key.worker_id, str(key.dp_rank))
            for name, family in gauges.items():
                value = getattr(snap, name)
                if value is not None:
                    family.add_metric(labels, float(value))
        yield from gauges.values()
