"""Continuous batching with chunked prefill: which requests advance by how many tokens.

Mirrors vLLM v1's scheduler. Each step has a budget of ``max_num_batched_tokens``.
Running requests go first, in arrival order: each gets the tokens it still needs (one
when it is generating, the rest of its prompt — possibly a chunk — when prefilling).
When the pool cannot give a running request its blocks, the scheduler **preempts** the
most recently admitted running request (frees its blocks; it goes back to the head of
the waiting queue and later recomputes, mostly from the prefix cache) and retries.
Then, if nothing was preempted, waiting requests are admitted in FIFO order while the
budget lasts, fewer than ``max_num_seqs`` run, and their blocks (after the prefix hit)
fit; the first one that does not fit waits, and so does everyone behind it. A request
whose prefix continues in a lower tier (CPU, disk) loads those blocks when admitted; the
step that admits it pays their transfer time.

A step is two calls: ``schedule()`` decides and reserves blocks (its ``seconds`` is the
step time), ``update()`` applies the model's output: a token for every request whose
scheduled tokens reached its end, then the stop checks (EOS, ``max_tokens``,
``max_model_len``). Requests aborted in between are skipped. Pure and synchronous.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvgate.protocol.events import EngineEvent
from kvgate.worker.sim.block_pool import BlockHasher, BlockPool
from kvgate.worker.sim.config import EngineConfig
from kvgate.worker.sim.kv_cache import KvCache
from kvgate.worker.sim.request import Request, RequestStatus
from kvgate.worker.sim.tiers import LowerTiers
from kvgate.worker.sim.timing import StepWork, TimingModel


@dataclass(slots=True)
class ScheduledStep:
    num_scheduled_tokens: dict[str, int]
    work: StepWork
    seconds: float

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None  # "stop" / "length" when this token ended the request


class Scheduler:
    def __init__(self, config: EngineConfig, hasher: BlockHasher | None = None) -> None:
        config.validate()
        self.config = config
        self.lower = LowerTiers(config.tiers, config.block_size) if config.tiers.enabled else None
        self.pool = BlockPool(config.num_gpu_blocks, config.block_size, self.lower)
        self.kv = KvCache(self.pool, hasher or BlockHasher(config.seed))
        self.timing = TimingModel.from_config(config)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if not 0 < request.num_prompt_tokens < self.config.max_model_len:
            raise ValueError(f"prompt of {request.num_prompt_tokens} tokens outside 1..{self.config.max_model_len - 1}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        """Finish a request now (client gone, stop string hit); frees its blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
            del self.requests[request_id]
            self.kv.free(request)
            request.status, request.finish_reason = RequestStatus.FINISHED, reason
        else:
            self._finish(request, reason)
        return True

    def schedule(self) -> ScheduledStep:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        prefill_tokens = decode_requests = 0
        loaded = [0, 0, 0]
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, n, preempted):
                break  # it had to preempt itself: nothing behind it fits either
            scheduled[request.request_id] = n
            budget -= n
            if request.output_token_ids and n == 1 and request.num_computed_tokens == request.num_tokens - 1:
                decode_requests += 1
            else:
                prefill_tokens += n
            i += 1

        # A step that had to preempt is out of blocks: admitting more would thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hit = self.kv.find_prefix(request)
            n = min(request.num_tokens - hit.num_tokens, budget)
            if not self.kv.allocate_slots(request, n, hit):
                break
            self.waiting.popleft()
            gpu, cpu, disk = hit.blocks_per_tier()
            loaded[1] += cpu
            loaded[2] += disk
            if request.num_cached_tokens < 0:
                bs = self.config.block_size
                request.num_cached_tokens = hit.num_tokens
                request.cached_tokens_per_tier = (gpu * bs, cpu * bs, disk * bs)
                # vLLM counts the prompt's full blocks the request holds once prefilled,
                # less its hit: a recomputed last block (the hit is capped) counts as created.
                request.num_created_cache_tokens = request.num_prompt_tokens // bs * bs - hit.num_tokens
                self.kv.record_query(request.num_tokens, hit)
            request.num_computed_tokens = hit.num_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = n
            budget -= n
            prefill_tokens += n

        for request_id, n in scheduled.items():
            self.requests[request_id].num_computed_tokens += n
        work = StepWork(prefill_tokens, decode_requests, self.pool.usage, loaded[1], loaded[2])
        return ScheduledStep(scheduled, work, self.timing.step_seconds(work))

    def update(self, step: ScheduledStep) -> list[RequestOutput]:
        outputs = []
        max_len = self.config.max_model_len
        for request_id in step.num_scheduled_tokens:
            request = self.requests.get(request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            if request.num_computed_tokens < request.num_tokens:
                continue  # a prefill chunk: nothing to sample yet
            token = next(request.sampler)
            request.output_token_ids.append(token)
            request.all_token_ids.append(token)
            reason = None
            if token == request.eos_token_id:
                reason = "stop"
            elif len(request.output_token_ids) >= request.max_tokens or request.num_tokens >= max_len:
                reason = "length"
            if reason is not None:
                self._finish(request, reason)
            outputs.append(RequestOutput(request_id, [token], reason))
        return outputs

    def reset_prefix_cache(self, preempt_running: bool = False) -> bool:
        """Clear the prefix cache (``AllBlocksCleared``); only possible with no block in use,
        which ``preempt_running`` arranges by sending every running request back to wait."""
        if preempt_running:
            while self.running:
                self._preempt(self.running.pop())
        return self.pool.reset_prefix_cache()

    def take_events(self) -> list[EngineEvent]:
        return self.pool.take_events()

    def _allocate_or_preempt(self, request: Request, n: int, preempted: list[Request]) -> bool:
        """Blocks for ``n`` more tokens of a running request, preempting the most recently
        admitted requests until they fit; False when the request itself was preempted."""
        while not self.kv.allocate_slots(request, n):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _finish(self, request: Request, reason: str) -> None:
        self.running.remove(request)
        del self.requests[request.request_id]
        self.kv.free(request)
        request.status, request.finish_reason = RequestStatus.FINISHED, reason
