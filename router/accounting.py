"""Hit accounting: the cached tokens the index predicted against those the engine reported.

For every answer whose engine reported ``cached_tokens``, the caller records the
prefix the index held for the worker that served it (``predicted_blocks``) and the
engine's figure. ``HitAccounting`` turns the prediction into the tokens the engine
would report (``engine_cached_tokens``: it always recomputes the prompt's last token),
keeps per-worker totals, and judges each worker on a sliding window of its last
``window`` informative answers (predicted or reported above zero; an answer with
nothing cached on either side says nothing about the index):

* a trusted worker whose window holds ``mismatches`` answers off by a block or more,
  in either direction, is no longer trusted;
* an untrusted worker is trusted again once a full window holds fewer than that.

Each change of verdict starts a new window, so a verdict stands until a whole new
body of evidence overturns it. Over-prediction (the index holds blocks the engine does
not: a missed restart or cache reset, lost removals) and under-prediction (the engine
holds blocks the index does not know: lost stores, a block-size or hash mismatch, a
different tokenizer or chat template on the worker) are counted apart, to say which.

Pure bookkeeping: never touches the index, never logs, no clock. What is predicted
for an untrusted worker, whose matches the router no longer sees, comes from
``predicted_blocks``: the index's match for it with trust ignored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvgate.indexer.index import Match
from kvgate.protocol.events import WorkerKey
from kvgate.router.policies import Decision

__all__ = [
    "Check",
    "HitAccounting",
    "TrustIgnoringMatcher",
    "Verdict",
    "WorkerHits",
    "engine_cached_tokens",
    "held_prefix",
    "predicted_blocks",
]

DEFAULT_WINDOW = 20
DEFAULT_MISMATCHES = 10

OVER = 1
UNDER = -1
AGREE = 0


@runtime_checkable
class TrustIgnoringMatcher(Protocol):
    """What ``predicted_blocks`` needs from the index (``KvIndexer`` provides it)."""

    def trusted(self, worker_id: str) -> bool: ...

    def find_matches(
        self, seq_hashes: Sequence[int], *, include_untrusted: bool = False, include_predictions: bool = True
    ) -> dict[WorkerKey, Match]: ...


def predicted_blocks(
    decision: Decision, key: WorkerKey, index: TrustIgnoringMatcher, own: Collection[int] = ()
) -> int | None:
    """Prefix blocks the events' index holds for ``key``, in any tier, when sent there: the decision's
    own figure for a trusted worker whose match the events gave, else the index asked again ignoring
    trust (``held_prefix``). The router's predictions (blocks it sent there) say nothing about whether
    the worker's events are right, so they are left out; but when another request was still prefilling
    on that worker and they reach past the events' prefix, None: that request is computing those
    blocks, which the engine will find and the events cannot have told yet (a burst's followers).
    ``own``: the blocks this request itself added to the predictions (``InFlight.predicted_hashes``)."""
    score = decision.score_of(key)
    if score is not None and not score.predicted and index.trusted(key.worker_id):
        return score.depth
    if not decision.seq_hashes:
        return 0
    return held_prefix(index, decision, key, own)


def held_prefix(
    index: TrustIgnoringMatcher, decision: Decision, key: WorkerKey, own: Collection[int] = ()
) -> int | None:
    """The prefix of ``decision.seq_hashes`` the events say ``key`` holds; when a request ahead of this
    one was still prefilling there at the decision, None if the router's predictions (other than
    ``own``) reach further (see ``predicted_blocks``). Predictions left unconfirmed once nothing is
    prefilling there are what a worker whose events are wrong leaves behind: the events' figure is
    then judged."""
    seq_hashes = decision.seq_hashes
    match = index.find_matches(seq_hashes, include_untrusted=True, include_predictions=False).get(key)
    depth = match.depth if match is not None else 0
    score = decision.score_of(key)
    if score is None or score.load.prefill_tokens == 0:
        return depth
    match = index.find_matches(seq_hashes, include_untrusted=True).get(key)
    reach = match.depth if match is not None else 0
    if reach > depth and own:
        mine = set(own)
        reach = next((i for i in range(depth, reach) if seq_hashes[i] in mine), reach)
    return None if reach > depth else depth


def engine_cached_tokens(prompt_tokens: int, blocks: int, block_size: int) -> int:
    """What an engine holding ``blocks`` of the prompt's prefix reports as cached: it
    always computes the last prompt token, so a prompt cached whole reports a block less."""
    return min(blocks, max(prompt_tokens - 1, 0) // block_size) * block_size


@dataclass(frozen=True, slots=True)
class Verdict:
    """A worker's trust changed; the window that decided it."""

    worker: str
    trusted: bool
    checked: int
    """Informative answers in the window."""
    over: int
    under: int

    @property
    def mismatches(self) -> int:
        return self.over + self.under


@dataclass(frozen=True, slots=True)
class Check:
    """One answer compared: tokens predicted (engine rule applied) and reported."""

    worker: str
    predicted_tokens: int
    actual_tokens: int
    off: int
    """``OVER`` (+1) or ``UNDER`` (-1) when they differ by a block or more, else ``AGREE`` (0)."""
    verdict: Verdict | None = None
    """Set when this answer changed the worker's trust."""

    @property
    def mismatch(self) -> bool:
        return self.off != AGREE


@dataclass(slots=True)
class WorkerHits:
    """One worker's totals since it was first checked, and its current window."""

    window: deque[int]
    trusted: bool = True
    checks: int = 0
    mismatches: int = 0
    predicted_tokens: int = 0
    actual_tokens: int = 0

    @property
    def over(self) -> int:
        return sum(1 for off in self.window if off == OVER)

    @property
    def under(self) -> int:
        return sum(1 for off in self.window if off == UNDER)


class HitAccounting:
    """Per worker: predicted vs reported cached tokens, and whether its index is trusted.

    ``window = 0`` counts without ever judging.
    """

    def __init__(self, block_size: int, window: int = DEFAULT_WINDOW, mismatches: int = DEFAULT_MISMATCHES) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if window < 0:
            raise ValueError(f"window must be >= 0 (0: never judge), got {window}")
        if window and not 1 <= mismatches <= window:
            raise ValueError(f"mismatches must be in 1..window ({window}), got {mismatches}")
        self.block_size = block_size
        self.window = window
        self.mismatches = mismatches
        self._workers: dict[str, WorkerHits] = {}

    def record(self, worker: str, prompt_tokens: int, predicted_blocks: int, actual_tokens: int) -> Check:
        """One answer of ``worker``: its prompt length, the prefix blocks the index held for
        it when it was sent, and the cached tokens the engine reported."""
        hits = self._workers.get(worker)
        if hits is None:
            hits = self._workers[worker] = WorkerHits(deque(maxlen=self.window))
        predicted = engine_cached_tokens(prompt_tokens, predicted_blocks, self.block_size)
        diff = predicted - actual_tokens
        off = OVER if diff >= self.block_size else UNDER if -diff >= self.block_size else AGREE
        hits.checks += 1
        hits.predicted_tokens += predicted
        hits.actual_tokens += actual_tokens
        if off != AGREE:
            hits.mismatches += 1
        verdict = None
        if self.window and (predicted or actual_tokens):
            hits.window.append(off)
            verdict = self._judge(worker, hits)
        return Check(worker, predicted, actual_tokens, off, verdict)

    def trusted(self, worker: str) -> bool:
        hits = self._workers.get(worker)
        return hits is None or hits.trusted

    def hits(self, worker: str) -> WorkerHits | None:
        return self._workers.get(worker)

    def forget(self, worker: str) -> None:
        """The worker left: a worker of that name coming back starts trusted, with no history."""
        self._workers.pop(worker, None)

    def _judge(self, worker: str, hits: WorkerHits) -> Verdict | None:
        window = hits.window
        off = sum(1 for o in window if o != AGREE)
        if hits.trusted:
            if off < self.mismatches:
                return None
        elif len(window) < self.window or off >= self.mismatches:
            return None
        verdict = Verdict(worker, not hits.trusted, len(window), hits.over, hits.under)
        hits.trusted = verdict.trusted
        window.clear()
        return verdict
