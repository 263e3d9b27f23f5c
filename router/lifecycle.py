"""One routed request from ``begin`` to ``finish``: the ``InFlight`` handle and its listeners.

``Router.begin`` returns an ``InFlight``. It is the only writer of its request's load in
the ``LoadTracker`` (queued prefill and KV blocks on the worker it went to) and tells
every ``RequestListener`` subscribed on the router what happened: the gateway's request
metrics, the replica sync that shares in-flight load with the other gateway replicas.

Lifecycle: ``begin`` (routed to ``key``) -> ``move_to(next key)`` per retry -> at most one
``first_token`` per worker -> ``finish(outcome)`` exactly once, on completion *or*
cancellation; later calls are no-ops. The tracker changes before the listeners hear of
it, so a listener reading the tracker sees the new state.

Never routes and never does I/O; ``outcome`` is the caller's description of how the
request ended, passed to the listeners unread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Protocol

from kvgate.protocol.events import WorkerKey
from kvgate.router.load import LoadTracker
from kvgate.router.policies import Decision

__all__ = ["InFlight", "RequestListener"]

log = logging.getLogger(__name__)


class RequestListener(Protocol):
    """Hears each routed request's lifecycle (subscribe with ``Router.subscribe``)."""

    def on_begin(self, flight: InFlight) -> None:
        """``flight`` was sent to ``flight.key``: its first worker, or the next one on a retry."""

    def on_first_token(self, flight: InFlight) -> None:
        """The worker's first token for ``flight`` arrived: its prompt is prefilled."""

    def on_finish(self, flight: InFlight) -> None:
        """``flight`` ended (completed, failed or cancelled); ``flight.outcome`` says how."""


class InFlight:
    """A request the router routed, until it finishes. Created by ``Router.begin`` only."""

    __slots__ = (
        "request_id",
        "decision",
        "prompt_tokens",
        "key",
        "outcome",
        "_load",
        "_block_size",
        "_clock",
        "_listeners",
        "sent_at",
        "previous_key",
        "predicted_hashes",
        "held_blocks",
        "first_token_at",
        "engine_cached_tokens",
        "streamed",
        "served",
        "_first_token",
        "_finished",
    )

    def __init__(
        self,
        request_id: str,
        decision: Decision,
        prompt_tokens: int,
        key: WorkerKey,
        *,
        load: LoadTracker,
        block_size: int,
        clock: Callable[[], float],
        listeners: Sequence[RequestListener],
    ) -> None:
        if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be a non-negative integer, got {prompt_tokens!r}")
        self.request_id = request_id
        self.decision = decision
        self.prompt_tokens = prompt_tokens
        self.key = key
        self.outcome: object = None
        self._load = load
        self._block_size = block_size
        self._clock = clock
        # The router's own list: a listener subscribed later hears the rest of this request.
        self._listeners = listeners
        self._first_token = False
        self._finished = False
        self.sent_at = 0.0
        """Router clock when it was sent to ``key`` (again on a retry)."""
        self.predicted_hashes: Sequence[int] = ()
        """Blocks the router newly predicted ``key`` holds because of this request (dropped
        again if the worker does not serve it)."""
        self.previous_key: WorkerKey | None = None
        """The worker it was sent to before the last ``move_to`` (None before any retry)."""
        self.held_blocks: tuple[WorkerKey, int | None] | None = None
        """For a request routed on its prompt's head: (worker, the prefix of the whole prompt the
        engine's events said it held when ``Router.extend`` learnt the rest, or None when the
        router's predictions reached further: ``router.accounting.held_prefix``), which the
        head's own match understates when the worker holds all of the head."""
        self.first_token_at: float | None = None
        """Router clock at its first token from ``key``, if one came."""
        self.engine_cached_tokens: int | None = None
        """Prompt tokens the engine reported it found cached (``report_usage``)."""
        self.streamed = False
        """Whether the first byte was the first token (a stream), not the whole answer."""
        self.served: bool | None = None
        """Whether the worker answered it (None: not reported). One that did not will not
        hold its blocks: the router drops its prediction of them."""
        self._begin()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the index says ``key`` already holds (its counted cached prefix)."""
        score = self.decision.score_of(self.key)
        return score.cached_blocks * self._block_size if score is not None else 0

    def move_to(self, key: WorkerKey) -> None:
        """Retry on ``key``: the request's load moves there, with that worker's cached prefix."""
        if self._finished:
            raise ValueError(f"request {self.request_id} already finished")
        self.previous_key = self.key
        self.key = key
        self._first_token = False
        self.first_token_at = None
        self._begin()

    def first_token(self) -> bool:
        """The first token came: the request stops queueing prefill (it keeps its blocks).

        False when already reported for this worker or the request finished.
        """
        if self._first_token or self._finished:
            return False
        self._first_token = True
        now = self.first_token_at = self._clock()
        self._load.prefill_done(self.request_id, now)
        self._notify(lambda listener: listener.on_first_token)
        return True

    def report_usage(
        self, cached_tokens: int | None, *, streamed: bool, served: bool = True, prompt_tokens: int | None = None
    ) -> None:
        """What the answer said, for the router to learn from at ``finish``: the engine's
        cached prompt tokens (``usage.prompt_tokens_details.cached_tokens``, None when not
        reported), whether the answer streamed (so its first byte timed the first token)
        and whether the worker served it at all. ``prompt_tokens``, the engine's count,
        replaces the gateway's (an estimate for a prompt routed on its head alone)."""
        if cached_tokens is not None and not (isinstance(cached_tokens, int) and 0 <= cached_tokens):
            cached_tokens = None
        if isinstance(prompt_tokens, int) and not isinstance(prompt_tokens, bool) and prompt_tokens > 0:
            self.prompt_tokens = prompt_tokens
        self.engine_cached_tokens = cached_tokens
        self.streamed = streamed
        self.served = served

    def finish(self, outcome: object = None) -> bool:
        """Completed, failed or cancelled: free its load. False when it had already finished."""
        if self._finished:
            return False
        self._finished = True
        self.outcome = outcome
        self._load.finish(self.request_id)
        self._notify(lambda listener: listener.on_finish)
        return True

    def _begin(self) -> None:
        self.sent_at = self._clock()
        # Its queued prefill is what the worker does not hold; it holds a KV block per
        # started block of its prompt, less a prefix just predicted there while the worker
        # is prefilling (a request in flight computes those blocks: the engine shares them).
        # Beginning the same id again moves it.
        score = self.decision.score_of(self.key)
        shared = 0
        if score is not None and score.predicted and self._load.snapshot(self.key).prefill_tokens > 0:
            shared = score.depth
        self._load.begin(
            self.request_id,
            self.key,
            self.prompt_tokens,
            max(0, self.prompt_tokens - self.cached_tokens),
            max(0, math.ceil(self.prompt_tokens / self._block_size) - shared),
            self.sent_at,
        )
        self._notify(lambda listener: listener.on_begin)

    def _notify(self, event: Callable[[RequestListener], Callable[[InFlight], None]]) -> None:
        # The load has already changed; one failing listener (metrics, say) must not keep
        # the others (the replica sync) from hearing about it, nor fail the request.
        for listener in list(self._listeners):
            handler = event(listener)
            try:
                handler(self)
            except Exception:
                log.exception("request listener %s failed on request %s", handler, self.request_id)
