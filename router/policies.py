"""Routing policies and the ``kv`` cost model: from matches and load to one ``Decision``.

Input (pure data): the candidate ``WorkerKey``s, ``find_matches``' ``dict[WorkerKey,
Match]`` for the prompt, the prompt's full-block count and each candidate's
``LoadSnapshot``. Output: a ``Decision`` naming the chosen worker, the fallback order
for retries and, for every candidate, each cost term and why it was skipped.

Every policy scores every candidate the same way, so ``explain()`` and the overlap
metrics mean the same thing whatever the mode; only the choice differs:

* ``kv``: the cheapest total (router/README.md has the formula and a worked example),
  or a softmax draw over ``-(total - best) / temperature``; ties go to the least loaded,
  then to the one least recently sent a request (``sent``; never-sent first, then the
  smallest ``WorkerKey``): quiet traffic with no useful prefix anywhere spreads over
  the fleet instead of piling onto one worker, and the same call sequence always
  gives the same answers;
* ``round-robin``: the next eligible key after the last one chosen;
* ``random``: uniform over eligible keys (seeded).

Busy and excluded workers are never chosen; when nobody is left, ``NoWorkerAvailable``
says why. No I/O, no clock, no shared state beyond the policy's own cursor / RNG.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from kvgate.indexer.index import Match
from kvgate.protocol.events import Tier, WorkerKey
from kvgate.router.config import BusyThresholds, RouterConfig
from kvgate.router.load import IDLE, LoadSnapshot
from kvgate.router.speed import SpeedModel

_NO_MATCH = Match()
# Two workers whose predicted costs differ by less than this fraction are a tie and fall
# through to the load / key tie-break: the predictions are not that precise (equal workers'
# learned speeds differ by a few % of noise), and decoding barely shows in a new request's
# TTFT while a prefill placed beside running requests delays every token they wait for.
# With an exact comparison a fresh long prompt sometimes landed on a worker decoding one
# beside an idle worker, doubling the running request's E2E (8k prompts at real engine
# speed: E2E p99 734 ms vs Dynamo's 401; 409 ms with this). The trace's TTFT did not move.
_TIE_FRACTION = 0.05
_TIE_EPSILON = 1e-9
_OVERDUE = 0.25
"""An in-flight request past its expected finish is still expected this share of a hold time away."""


class NoWorkerAvailable(Exception):
    """No candidate can take the request (none registered, all excluded or all busy)."""

    def __init__(self, reason: str, scores: Sequence[CandidateScore] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.scores = list(scores)

    def explain(self) -> dict[str, Any]:
        return {"chosen": None, "reason": self.reason, "candidates": [s.explain() for s in self.scores]}


@dataclass(slots=True)
class CandidateScore:
    """One candidate's cost terms, in seconds of predicted time to first token.

    ``cached_blocks`` is the prefix the cost model counts as reusable: the whole matched
    depth, or only its GPU blocks with ``gpu_only``. ``seconds_per_token`` is the
    worker's learned prefill rate at its current KV usage (decode slowdown included).
    """

    key: WorkerKey
    depth: int
    gpu_blocks: int
    cpu_blocks: int
    disk_blocks: int
    cached_blocks: int
    uncached_tokens: int
    queued_prefill_tokens: int
    kv_usage: float
    seconds_per_token: float
    overhead: float
    tier_load: float
    queued_prefill: float
    prefill: float
    memory_wait: float
    added_work: float
    total: float
    load: LoadSnapshot
    skipped: str | None = None
    probability: float | None = None
    predicted: bool = False
    """Its prefix depth comes from blocks just sent to it, not yet confirmed by events."""

    @property
    def ttft(self) -> float:
        """Predicted seconds to its first token there."""
        return self.overhead + self.tier_load + self.queued_prefill + self.prefill + self.memory_wait

    def explain(self) -> dict[str, Any]:
        return {
            "worker": str(self.key),
            "worker_id": self.key.worker_id,
            "dp_rank": self.key.dp_rank,
            "overlap": {
                "blocks": self.depth,
                "gpu": self.gpu_blocks,
                "cpu": self.cpu_blocks,
                "disk": self.disk_blocks,
                "predicted": self.predicted,
            },
            "cached_blocks": self.cached_blocks,
            "uncached_tokens": self.uncached_tokens,
            "queued_prefill_tokens": self.queued_prefill_tokens,
            "kv_usage": self.kv_usage,
            "prefill_tokens_per_s": 1.0 / self.seconds_per_token if self.seconds_per_token > 0 else None,
            "costs_ms": {
                "overhead": self.overhead * 1e3,
                "tier_load": self.tier_load * 1e3,
                "queued_prefill": self.queued_prefill * 1e3,
                "prefill": self.prefill * 1e3,
                "memory_wait": self.memory_wait * 1e3,
                "ttft": self.ttft * 1e3,
                "added_work": self.added_work * 1e3,
                "total": self.total * 1e3,
            },
            "load": self.load.to_dict(),
            "skipped": self.skipped,
            "probability": self.probability,
        }


@dataclass(slots=True)
class RouteTimings:
    """Seconds spent per phase of one decision (tokenization is the gateway's)."""

    hash: float = 0.0
    match: float = 0.0
    score: float = 0.0

    @property
    def total(self) -> float:
        return self.hash + self.match + self.score


@dataclass(slots=True)
class Decision:
    """The chosen worker, the fallback order (``ranked[0] == chosen``) and every score.

    ``scores`` lists eligible candidates in ``ranked`` order, then skipped ones.
    """

    chosen: WorkerKey
    ranked: list[WorkerKey]
    scores: list[CandidateScore]
    mode: str
    num_blocks: int = 0
    block_size: int = 0
    timings: RouteTimings = field(default_factory=RouteTimings)
    config: RouterConfig | None = None
    speed: SpeedModel | None = None
    """The learned rates the scores used (shown by ``explain``)."""
    seq_hashes: Sequence[int] = ()
    """The prompt's block hashes (set by the router): what a later look-up of one
    worker's prefix needs, such as the index's prediction for an untrusted worker."""
    head_only: bool = False
    """Scored on the head of its prompt (``Router.route_head``): ``num_blocks`` are the head's,
    and a worker holding all of them may hold more of the prompt than its score says."""

    def score_of(self, key: WorkerKey) -> CandidateScore | None:
        for score in self.scores:
            if score.key == key:
                return score
        return None

    @property
    def chosen_score(self) -> CandidateScore:
        score = self.score_of(self.chosen)
        assert score is not None, "a Decision always scores its chosen worker"
        return score

    def explain(self) -> dict[str, Any]:
        """JSON-able account of the decision, as served by ``/debug/route``."""
        t = self.timings
        return {
            "mode": self.mode,
            "chosen": str(self.chosen),
            "ranked": [str(k) for k in self.ranked],
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "timings_us": {
                "hash": t.hash * 1e6,
                "match": t.match * 1e6,
                "score": t.score * 1e6,
                "total": t.total * 1e6,
            },
            "config": self.config.to_dict() if self.config is not None else None,
            "speed": self.speed.to_dict() if self.speed is not None else None,
            "candidates": [s.explain() for s in self.scores],
            "block_hashes": list(self.seq_hashes),
        }


class Policy:
    """Scores candidates (shared by every mode) and leaves the choice to ``_choose``."""

    mode = ""

    def __init__(self, config: RouterConfig | None = None, speed: SpeedModel | None = None) -> None:
        self.config = config or RouterConfig(mode=self.mode)  # type: ignore[arg-type]
        self.speed = speed if speed is not None else SpeedModel(self.config.speed)

    def select(
        self,
        candidates: Sequence[WorkerKey],
        matches: Mapping[WorkerKey, Match],
        num_blocks: int,
        loads: Mapping[WorkerKey, LoadSnapshot],
        exclude: Collection[WorkerKey | str] = (),
        prompt_tokens: int | None = None,
    ) -> Decision:
        """Choose among ``candidates``; ``exclude`` takes keys or whole worker ids.
        ``prompt_tokens`` defaults to ``num_blocks`` full blocks."""
        if not candidates:
            raise NoWorkerAvailable("no workers registered")
        scores = score_candidates(
            self.config, self.speed, candidates, matches, num_blocks, loads, exclude, prompt_tokens
        )
        eligible = [s for s in scores if s.skipped is None]
        if not eligible:
            raise NoWorkerAvailable(_why_none(scores), scores)
        ordered = self._choose(eligible)
        ranked = [s.key for s in ordered]
        ordered.extend(s for s in scores if s.skipped is not None)
        config = self.config
        return Decision(
            ranked[0], ranked, ordered, self.mode, num_blocks, config.block_size, config=config, speed=self.speed
        )

    def _choose(self, eligible: list[CandidateScore]) -> list[CandidateScore]:
        """Eligible scores in fallback order, the chosen one first."""
        raise NotImplementedError

    def sent(self, key: WorkerKey) -> None:
        """A request was sent to ``key`` (not merely scored, as ``/debug/route`` does)."""


class KvPolicy(Policy):
    mode = "kv"

    def __init__(self, config: RouterConfig | None = None, speed: SpeedModel | None = None) -> None:
        super().__init__(config, speed)
        self._rng = random.Random(self.config.seed)
        # Send number at which each key last got a request: the final tie-break.
        self._chosen_at: dict[WorkerKey, int] = {}
        self._decisions = 0

    def _choose(self, eligible: list[CandidateScore]) -> list[CandidateScore]:
        if len(self._chosen_at) > 4 * len(eligible) + 64:
            # Keys of departed workers would otherwise accumulate for ever.
            live = {s.key for s in eligible}
            self._chosen_at = {k: n for k, n in self._chosen_at.items() if k in live}
        return self._draw(_rank(eligible, self.config.block_size, self._chosen_at))

    def sent(self, key: WorkerKey) -> None:
        self._decisions += 1
        self._chosen_at[key] = self._decisions

    def _draw(self, ordered: list[CandidateScore]) -> list[CandidateScore]:
        temperature = self.config.temperature
        if temperature <= 0 or len(ordered) == 1:
            return ordered
        best = ordered[0].total
        weights = [math.exp(-(s.total - best) / temperature) for s in ordered]
        norm = sum(weights)
        for s, w in zip(ordered, weights):
            s.probability = w / norm
        draw = self._rng.random() * norm
        pick = len(ordered) - 1  # float rounding can leave draw just above the last cumulative sum
        for i, w in enumerate(weights):
            draw -= w
            if draw < 0:
                pick = i
                break
        return [ordered[pick], *ordered[:pick], *ordered[pick + 1 :]]


class RoundRobinPolicy(Policy):
    mode = "round-robin"

    def __init__(self, config: RouterConfig | None = None, speed: SpeedModel | None = None) -> None:
        super().__init__(config, speed)
        self._last: WorkerKey | None = None

    def _choose(self, eligible: list[CandidateScore]) -> list[CandidateScore]:
        ordered = sorted(eligible, key=lambda s: s.key)
        # Keyed on the last choice rather than an index, so workers joining or leaving
        # between calls do not make the rotation skip or repeat anyone.
        start = 0
        if self._last is not None:
            start = next((i for i, s in enumerate(ordered) if s.key > self._last), 0)
        ordered = ordered[start:] + ordered[:start]
        self._last = ordered[0].key
        return ordered


class RandomPolicy(Policy):
    mode = "random"

    def __init__(self, config: RouterConfig | None = None, speed: SpeedModel | None = None) -> None:
        super().__init__(config, speed)
        self._rng = random.Random(self.config.seed)

    def _choose(self, eligible: list[CandidateScore]) -> list[CandidateScore]:
        ordered = sorted(eligible, key=lambda s: s.key)
        self._rng.shuffle(ordered)
        return ordered


_POLICIES: dict[str, type[Policy]] = {p.mode: p for p in (KvPolicy, RoundRobinPolicy, RandomPolicy)}


def make_policy(config: RouterConfig) -> Policy:
    return _POLICIES[config.mode](config)


def score_candidates(
    config: RouterConfig,
    speed: SpeedModel,
    candidates: Sequence[WorkerKey],
    matches: Mapping[WorkerKey, Match],
    num_blocks: int,
    loads: Mapping[WorkerKey, LoadSnapshot],
    exclude: Collection[WorkerKey | str] = (),
    prompt_tokens: int | None = None,
) -> list[CandidateScore]:
    """Every cost term for every candidate, in candidate order; skipped ones marked.

    A candidate's total is its predicted time to first token (seconds): its overhead, the
    lower-tier blocks it would load, the prefill tokens queued ahead of this request
    plus this request's own uncached ones at the worker's learned speed at its KV usage,
    and the wait for room in its KV pool when this request's blocks do not fit
    (``memory_wait``); plus the added work it leaves behind.
    """
    block_size = config.block_size
    if prompt_tokens is None:
        prompt_tokens = num_blocks * block_size
    prompt_blocks = -(-prompt_tokens // block_size)
    memory = config.memory_wait
    gpu_only = config.gpu_only
    cpu_s = 0.0 if gpu_only else speed.block_seconds(Tier.CPU)
    disk_s = 0.0 if gpu_only else speed.block_seconds(Tier.DISK)
    capacity = config.prediction_capacity_blocks
    slowdown = speed.decode_slowdown
    added_weight = config.added_work_weight
    running_weight = config.running_work_weight
    busy = config.busy if config.busy.enabled else None
    scores: list[CandidateScore] = []
    for key in candidates:
        m = matches.get(key, _NO_MATCH)
        gpu, cpu, disk = m.per_tier
        load = loads.get(key, IDLE)
        cached = gpu if gpu_only else m.depth
        uncached = prompt_tokens - cached * block_size
        if uncached < 1:
            uncached = 1  # the engine always computes the last prompt token
        pool = capacity if load.capacity_tokens is None else max(1, load.capacity_tokens // block_size)
        usage = load.kv_usage
        if usage is None:
            usage = load.blocks / pool if load.blocks < pool else 1.0
        rate = speed.predicting(key.worker_id)
        per_token = rate.seconds_per_token * (1.0 + slowdown * usage)
        tier = 0.0 if gpu_only else cpu * cpu_s + disk * disk_s
        queued = load.prefill_tokens * per_token
        own = uncached * per_token
        wait = 0.0
        if memory:
            # Blocks held there: by the requests in flight (this replica's and the others'),
            # or by the engine's count when that is more (other clients, shared prefixes),
            # less what requests running at its report have freed since.
            held = max(float(load.blocks), (load.kv_usage or 0.0) * pool - load.freed_blocks)
            # A prefix just predicted there while it prefills is being computed by a request
            # in flight: the engine will share it.
            shared = m.depth if m.predicted and load.prefill_tokens > 0 else 0
            short = held + prompt_blocks - shared - pool
            if short > 0 and held > 0:
                wait = _memory_wait(load, short, held, speed.hold_seconds(key.worker_id), speed.clock())
        added = (added_weight + running_weight * load.requests) * own
        skipped = None
        if exclude and (key in exclude or key.worker_id in exclude):
            skipped = "excluded"
        elif busy is not None:
            skipped = _busy_reason(load, busy)
        scores.append(
            CandidateScore(
                key,
                m.depth,
                gpu,
                cpu,
                disk,
                cached,
                uncached,
                load.prefill_tokens,
                usage,
                per_token,
                rate.overhead,
                tier,
                queued,
                own,
                wait,
                added,
                rate.overhead + tier + queued + own + wait + added,
                load,
                skipped,
                None,
                m.predicted,
            )
        )
    return scores


def _memory_wait(load: LoadSnapshot, short: float, held: float, hold: float, now: float) -> float:
    """Seconds until ``short`` of the ``held`` blocks free on a worker whose requests keep their
    blocks ``hold`` seconds on average: the requests in flight there finish longest-running
    first, each expected at its send time plus ``hold`` (at least a quarter of ``hold`` away
    once overdue: it is still running); blocks held by requests it does not track (other
    clients, per the engine's usage) free evenly over ``hold``."""
    if short <= load.blocks:
        freed = 0
        for started, blocks in load.hold_order():
            freed += blocks
            if freed >= short:
                return max(hold - (now - started), _OVERDUE * hold)
    return hold * (short / held if short < held else 1.0)


def _busy_reason(load: LoadSnapshot, busy: BusyThresholds) -> str | None:
    if busy.max_kv_usage is not None and load.kv_usage is not None and load.kv_usage > busy.max_kv_usage:
        return f"busy: kv_usage {load.kv_usage:.3f} > max_kv_usage {busy.max_kv_usage}"
    if busy.max_waiting is not None and load.waiting is not None and load.waiting > busy.max_waiting:
        return f"busy: waiting {load.waiting} > max_waiting {busy.max_waiting}"
    if busy.max_prefill_tokens is not None and load.prefill_tokens > busy.max_prefill_tokens:
        return f"busy: prefill_tokens {load.prefill_tokens} > max_prefill_tokens {busy.max_prefill_tokens}"
    return None


def _rank(scores: list[CandidateScore], block_size: int, chosen_at: dict[WorkerKey, int]) -> list[CandidateScore]:
    """Cheapest first; equal totals: least loaded, then fewer waiting / running, then the
    least recently sent a request (``chosen_at``: send number, absent = never), then key."""
    ordered = sorted(scores, key=attrgetter("total"))
    # Ties are rare, so only runs of (nearly) equal totals pay for the full tie-break key.
    i, n = 0, len(ordered)
    while i < n - 1:
        j = i
        while j < n - 1 and _tied(ordered[j].total, ordered[j + 1].total):
            j += 1
        if j > i:
            ordered[i : j + 1] = sorted(
                ordered[i : j + 1], key=lambda s: (*_load_key(s, block_size), chosen_at.get(s.key, 0), s.key)
            )
        i = j + 1
    return ordered


def ties_or_beats(total: float, best: float) -> bool:
    """Whether a candidate costing ``total`` would be cheaper than, or tied with, one costing ``best``."""
    return total <= best or _tied(best, total)


def _tied(lower: float, higher: float) -> bool:
    return higher - lower <= max(_TIE_FRACTION * abs(lower), _TIE_EPSILON)


def _load_key(s: CandidateScore, block_size: int) -> tuple[float, int, int]:
    load = s.load
    return (load.blocks + load.prefill_tokens / block_size, load.waiting or 0, load.running or 0)


def _why_none(scores: Sequence[CandidateScore]) -> str:
    if all(s.skipped == "excluded" for s in scores):
        return f"all {len(scores)} workers excluded"
    details = "; ".join(f"{s.key}: {s.skipped}" for s in scores)
    return f"all {len(scores)} workers busy or excluded ({details})"
