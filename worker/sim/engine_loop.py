"""The asyncio edge of the engine: runs scheduler steps in simulated time, feeds streams.

One task loops while there is work: ``schedule()``, sleep the step time, ``update()``,
hand each request its new text, publish the step's KV events. Sleeps are paced
against a running deadline, so steps shorter than the event loop's timer resolution
still add up to the model's time, neither lost nor rounded up to a millisecond each.
Stop strings are checked here (as in vLLM's output processor) and end their request
before the next step is scheduled; ``abort`` (client gone) frees a request's blocks
at once.

The loop also keeps vLLM's per-request statistics (``LoopStats``): token counts, and
histograms observed as vLLM's frontend does, on the monotonic clock of the simulator's
own run (so with ``speedup_ratio`` > 1 the latencies are the compressed ones its clients
see): time to first token and inter-token latency as each token is handed out, and at a
request's end (``stop`` / ``length``) its e2e latency, queue, prefill, decode and
inference times, time per output token and sizes. A request's queue time ends when a
step first admits it. Observing is a ``bisect`` and two additions per histogram.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from kvgate.protocol.events import EventBatch
from kvgate.tasks import cancel_and_wait
from kvgate.worker.sim.answer import TextStream, Vocabulary, answer_tokens
from kvgate.worker.sim.config import AnswerConfig
from kvgate.worker.sim.publisher import KvEventPublisher
from kvgate.worker.sim.request import Request
from kvgate.worker.sim.scheduler import RequestOutput, Scheduler
from kvgate.worker.sim.vllm_metrics_families import FAMILIES

_MAX_LAG_S = 0.05
log = logging.getLogger(__name__)


@dataclass(slots=True)
class Delta:
    text: str
    finish_reason: str | None = None
    stop_reason: str | None = None
    token_ids: Sequence[int] = ()  # the tokens generated at this step (their logprobs go with it)


class Histogram:
    """A Prometheus histogram's state: a count per bucket (not cumulative) and the sum.

    ``bounds`` are the buckets' upper bounds, ``+Inf`` left out (its count is the last).
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= bound
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


_BUCKETS = {
    f.name.removeprefix("vllm:"): f.buckets for f in FAMILIES if f.kind == "histogram" and f.name[:5] == "vllm:"
}
# vLLM sizes these by the model's context (build_1_2_5_buckets(max_model_len)).
_TOKEN_HISTOGRAMS = (
    "request_prompt_tokens",
    "request_generation_tokens",
    "request_max_num_generation_tokens",
    "request_params_max_tokens",
    "request_prefill_kv_computed_tokens",
)


def buckets_1_2_5(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's ``build_1_2_5_buckets``)."""
    bounds: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(bounds)
            bounds.append(float(value))
        exponent += 1


@dataclass(slots=True)
class LoopStats:
    """What vLLM counts per request, as the engine loop hands tokens out.

    Prompt tokens are counted when a request's first token is out (as vLLM does), split
    by where they came from: computed, found in the GPU pool, loaded from a lower tier.
    The histograms are named as vLLM's families, less the ``vllm:`` prefix.
    """

    max_model_len: int = 8192
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: Counter[str] = field(default_factory=Counter)
    prompt_tokens_computed: int = 0
    prompt_tokens_local_hit: int = 0
    prompt_tokens_external_hit: int = 0
    request_prompt_tokens: Histogram = field(init=False)
    request_generation_tokens: Histogram = field(init=False)
    iteration_tokens_total: Histogram = field(init=False)
    request_max_num_generation_tokens: Histogram = field(init=False)
    request_params_n: Histogram = field(init=False)
    request_params_max_tokens: Histogram = field(init=False)
    time_to_first_token_seconds: Histogram = field(init=False)
    inter_token_latency_seconds: Histogram = field(init=False)
    request_time_per_output_token_seconds: Histogram = field(init=False)
    e2e_request_latency_seconds: Histogram = field(init=False)
    request_queue_time_seconds: Histogram = field(init=False)
    request_inference_time_seconds: Histogram = field(init=False)
    request_prefill_time_seconds: Histogram = field(init=False)
    request_decode_time_seconds: Histogram = field(init=False)
    request_num_preemptions: Histogram = field(init=False)
    request_prefill_kv_computed_tokens: Histogram = field(init=False)

    def __post_init__(self) -> None:
        tokens = buckets_1_2_5(self.max_model_len)
        for name, bounds in _BUCKETS.items():
            setattr(self, name, Histogram(tokens if name in _TOKEN_HISTOGRAMS else bounds))

    def histogram(self, family: str) -> Histogram:
        """The histogram of a vLLM family (``vllm:time_to_first_token_seconds``)."""
        found = getattr(self, family.removeprefix("vllm:"))
        assert isinstance(found, Histogram)
        return found

    def prefilled(self, handle: RequestHandle, now: float) -> int:
        """A request's first token is out: count its prompt; the prompt tokens it computed."""
        request = handle.request
        prompt = request.num_prompt_tokens
        gpu, cpu, disk = request.cached_tokens_per_tier
        computed = prompt - gpu - cpu - disk
        self.prompt_tokens += prompt
        self.prompt_tokens_computed += computed
        self.prompt_tokens_local_hit += gpu
        self.prompt_tokens_external_hit += cpu + disk
        self.time_to_first_token_seconds.observe(now - handle.arrival_time)
        return computed

    def request_finished(self, handle: RequestHandle, now: float) -> None:
        """vLLM's finished-request histograms, for a request that ended by stop or length."""
        request = handle.request
        arrival = handle.arrival_time
        scheduled = handle.scheduled_time if handle.scheduled_time is not None else arrival
        first = handle.first_token_time
        generated = handle.completion_tokens
        decode = now - first
        self.e2e_request_latency_seconds.observe(now - arrival)
        self.request_queue_time_seconds.observe(scheduled - arrival)
        self.request_prefill_time_seconds.observe(first - scheduled)
        self.request_decode_time_seconds.observe(decode)
        self.request_inference_time_seconds.observe(now - scheduled)
        self.request_time_per_output_token_seconds.observe(decode / (generated - 1) if generated > 1 else 0.0)
        self.request_prompt_tokens.observe(request.num_prompt_tokens)
        self.request_generation_tokens.observe(generated)
        self.request_params_max_tokens.observe(request.max_tokens)
        # Per request as the client sent it: once its last choice ends, with the most any choice generated
        # (vLLM's ParentRequest.observe_finished_request).
        parent = handle.parent
        if parent is None:
            self.request_max_num_generation_tokens.observe(generated)
            self.request_params_n.observe(1)
        else:
            parent.remaining -= 1
            parent.max_generated = max(parent.max_generated, generated)
            if parent.remaining == 0:
                self.request_max_num_generation_tokens.observe(parent.max_generated)
                self.request_params_n.observe(parent.n)
        self.request_num_preemptions.observe(request.num_preemptions)
        self.request_prefill_kv_computed_tokens.observe(request.num_prompt_tokens - max(request.num_cached_tokens, 0))


@dataclass(slots=True)
class ParentRequest:
    """The request a client sent with ``n`` > 1, which runs as ``n`` engine requests (vLLM's
    parallel sampling): counted in the per-request metrics once, when its last choice ends."""

    n: int
    remaining: int
    max_generated: int = 0


class RequestHandle:
    """A submitted engine request as its HTTP handler sees it: deltas to read, token counts.
    A handle given a ``sink`` puts ``(index, delta)`` there instead, so the choices of one
    answer (``n`` > 1, a batch of prompts) are read from one queue, in the order they came."""

    def __init__(
        self,
        request: Request,
        text: TextStream,
        index: int = 0,
        sink: asyncio.Queue[tuple[int, Delta]] | None = None,
        parent: ParentRequest | None = None,
    ) -> None:
        self.request = request
        self.text = text
        self.index = index
        self.parent = parent
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._sink = sink
        # time.monotonic() when it arrived, was first scheduled, got its first / last token.
        self.arrival_time = time.monotonic()
        self.scheduled_time: float | None = None
        self.first_token_time = 0.0
        self.last_token_time = 0.0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def cached_tokens(self) -> int:
        return max(self.request.num_cached_tokens, 0)

    @property
    def created_cache_tokens(self) -> int:
        return self.request.num_created_cache_tokens

    @property
    def cached_tokens_per_tier(self) -> dict[str, int]:
        gpu, cpu, disk = self.request.cached_tokens_per_tier
        return {"gpu": gpu, "cpu": cpu, "disk": disk}

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def put(self, delta: Delta) -> None:
        if self._sink is not None:
            self._sink.put_nowait((self.index, delta))
        else:
            self._queue.put_nowait(delta)

    async def deltas(self) -> AsyncIterator[Delta]:
        while True:
            delta = await self._queue.get()
            yield delta
            if delta.finish_reason is not None:
                return


class EngineLoop:
    def __init__(
        self, scheduler: Scheduler, vocab: Vocabulary, answer: AnswerConfig, publisher: KvEventPublisher | None = None
    ) -> None:
        self.scheduler = scheduler
        self.vocab = vocab
        self.answer = answer
        self.publisher = publisher
        self.stats = LoopStats(scheduler.config.max_model_len)
        self._handles: dict[str, RequestHandle] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())
        self._task.add_done_callback(self._stopped)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def _stopped(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("engine loop died", exc_info=task.exception())
        # Nobody will feed these requests again: end them rather than hang their clients.
        for handle in self._handles.values():
            handle.finish_reason = "abort"
            handle.put(Delta("", "abort"))
        self._handles.clear()

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        max_tokens: int,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        cache_salt: str | None = None,
        *,
        sample: int = 0,
        index: int = 0,
        sink: asyncio.Queue[tuple[int, Delta]] | None = None,
        parent: ParentRequest | None = None,
    ) -> RequestHandle:
        """One engine request; ``sample`` picks which of a prompt's answers it generates (its
        index among ``n``), ``index`` / ``sink`` / ``parent`` as ``RequestHandle`` has them."""
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            max_tokens=max_tokens,
            sampler=answer_tokens(prompt_token_ids, self.vocab, self.answer, ignore_eos, sample),
            eos_token_id=None if ignore_eos else self.vocab.eos_token_id,
            cache_salt=cache_salt,
        )
        self.scheduler.add_request(request)
        handle = RequestHandle(request, TextStream(self.vocab.pieces, stop), index, sink, parent)
        self._handles[request_id] = handle
        self._wake.set()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Drop a request that is not finished (its client left); frees its blocks now."""
        if self._handles.pop(handle.request_id, None) is not None:
            self.scheduler.abort(handle.request_id)
            self.stats.finished["abort"] += 1

    def reset_prefix_cache(self, preempt_running: bool = False) -> bool:
        """Clear the prefix cache. Its ``AllBlocksCleared`` waits for the next step's batch,
        as in vLLM, which flushes events only after a model step: an idle engine publishes
        nothing until its next request runs."""
        ok = self.scheduler.reset_prefix_cache(preempt_running)
        if preempt_running:
            self._wake.set()
        return ok

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            if not self.scheduler.has_work:
                self._wake.clear()
                await self._wake.wait()
                deadline = loop.time()
                continue
            num_waiting = len(self.scheduler.waiting)
            step = self.scheduler.schedule()
            admitted = num_waiting - len(self.scheduler.waiting)
            if admitted > 0:
                self._scheduled(admitted)
            if not step.num_scheduled_tokens:
                # Unreachable with a validated config; never spin if it happens anyway.
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            # Oversleeping (timers are ~1 ms coarse) is paid back by not sleeping on the
            # next steps; a longer stall is forgiven rather than replayed as a burst.
            deadline = max(deadline, now - _MAX_LAG_S) + step.seconds
            await asyncio.sleep(max(deadline - now, 0.0))
            self._deliver(self.scheduler.update(step))
            self._publish_events()

    def _scheduled(self, admitted: int) -> None:
        """Stamp the requests a step just admitted on their first admission.

        The scheduler appends what it admits to ``running`` and admits nothing in a step
        that preempts, so the waiting queue shrank by exactly ``admitted``.
        """
        now = time.monotonic()
        running = self.scheduler.running
        for request in running[len(running) - admitted :]:
            handle = self._handles.get(request.request_id)
            if handle is not None and handle.scheduled_time is None:
                handle.scheduled_time = now

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        stats = self.stats
        now = time.monotonic()
        # vLLM's tokens of the step: prompt tokens computed by the requests whose prefill it
        # ended, plus the tokens it generated.
        step_tokens = 0
        for out in outputs:
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue
            n = len(out.new_token_ids)
            handle.completion_tokens += n
            stats.generation_tokens += n
            step_tokens += n
            if handle.completion_tokens == n:  # its first token: the prompt is prefilled
                step_tokens += stats.prefilled(handle, now)
                handle.first_token_time = now
            else:
                stats.inter_token_latency_seconds.observe(now - handle.last_token_time)
            handle.last_token_time = now
            finish, stop_reason = out.finish_reason, None
            if handle.text.add(out.new_token_ids):
                finish, stop_reason = "stop", handle.text.stop_reason
                if out.finish_reason is None:
                    self.scheduler.abort(out.request_id, "stop")
            if finish is not None:
                del self._handles[out.request_id]
                handle.finish_reason, handle.stop_reason = finish, stop_reason
                stats.finished[finish] += 1
                stats.request_finished(handle, now)
            handle.put(Delta(handle.text.delta(final=finish is not None), finish, stop_reason, out.new_token_ids))
        if step_tokens:
            stats.iteration_tokens_total.observe(step_tokens)

    def _publish_events(self) -> None:
        events = self.scheduler.take_events()
        if events and self.publisher is not None:
            self.publisher.publish(EventBatch(time.time(), events, 0))
