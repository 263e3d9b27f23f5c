"""The asyncio edge of the engine: runs scheduler steps in simulated time, feeds streams.

One task loops while there is work: ``schedule()``, sleep the step time, ``update()``,
hand each request its new text, publish the step's KV events. Sleeps are paced
against a running deadline, so steps shorter than the event loop's timer resolution
still add up to the model's time, neither lost nor rounded up to a millisecond each.
Stop strings are checked here (as in vLLM's output processor) and end their request
before the next step is scheduled; ``abort`` (client gone) frees a request's blocks
at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from kvgate.protocol.events import EventBatch
from kvgate.worker.sim.answer import TextStream, Vocabulary, answer_tokens
from kvgate.worker.sim.config import AnswerConfig
from kvgate.worker.sim.publisher import KvEventPublisher
from kvgate.worker.sim.request import Request
from kvgate.worker.sim.scheduler import RequestOutput, Scheduler

_MAX_LAG_S = 0.05
log = logging.getLogger(__name__)


@dataclass(slots=True)
class Delta:
    text: str
    finish_reason: str | None = None
    stop_reason: str | None = None


@dataclass(slots=True)
class LoopStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: Counter[str] = field(default_factory=Counter)


class RequestHandle:
    """A submitted request as its HTTP handler sees it: deltas to read, token counts."""

    def __init__(self, request: Request, text: TextStream) -> None:
        self.request = request
        self.text = text
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()

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
        self.stats = LoopStats()
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
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

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
    ) -> RequestHandle:
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            max_tokens=max_tokens,
            sampler=answer_tokens(prompt_token_ids, self.vocab, self.answer, ignore_eos),
            eos_token_id=None if ignore_eos else self.vocab.eos_token_id,
            cache_salt=cache_salt,
        )
        self.scheduler.add_request(request)
        handle = RequestHandle(request, TextStream(self.vocab.pieces, stop))
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
            step = self.scheduler.schedule()
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

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue
            n = len(out.new_token_ids)
            handle.completion_tokens += n
            self.stats.generation_tokens += n
            if handle.completion_tokens == n:  # its first token: the prompt is prefilled
                self.stats.prompt_tokens += handle.prompt_tokens
            finish, stop_reason = out.finish_reason, None
            if handle.text.add(out.new_token_ids):
                finish, stop_reason = "stop", handle.text.stop_reason
                if out.finish_reason is None:
                    self.scheduler.abort(out.request_id, "stop")
            if finish is not None:
                del self._handles[out.request_id]
                handle.finish_reason, handle.stop_reason = finish, stop_reason
                self.stats.finished[finish] += 1
            handle.put(Delta(handle.text.delta(final=finish is not None), finish, stop_reason))

    def _publish_events(self) -> None:
        events = self.scheduler.take_events()
        if events and self.publisher is not None:
            self.publisher.publish(EventBatch(time.time(), events, 0))
