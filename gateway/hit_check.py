"""Closing the loop on the index: each answer's reported cached tokens against the prediction.

``HitCheck`` listens to the router's request lifecycle. When a request is sent to a
worker (``on_begin``, again on a retry) it notes the prefix the index held for that
worker (``router.accounting.predicted_blocks``; trust ignored for an untrusted worker,
so that one can be judged back into trust). It is not judged when the engine may find
blocks the events cannot have told yet: ones a request still prefilling on that worker
is computing, or, for a request routed on its prompt's head, blocks past the head, until
``Router.extend`` reads what the events held of the whole prompt (``InFlight.held_blocks``).
When the request ends with a complete 200
answer for one prompt and one choice whose usage reports ``cached_tokens``, the pair
goes to ``HitAccounting`` and to the metrics (``kvgate_predicted_cached_tokens``,
``kvgate_engine_cached_tokens``, ``kvgate_prediction_checks``,
``kvgate_prediction_mismatches``). When a worker's verdict changes it says so (a
WARNING naming the worker, the counts and the likely causes when its predictions stop
agreeing) and sets the index's trust in it under its own reason, ``predictions``, so
the event sources' own trust decisions stand apart. A worker leaving the registry
forgets its history.

Never routes, never reads bytes; what it reads of an answer is the relay's ``Exchange``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from kvgate.gateway.metrics import GatewayMetrics, Outcome
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.router.accounting import HitAccounting, Verdict, predicted_blocks
from kvgate.router.lifecycle import InFlight
from kvgate.router.registry import RegistryChange, WorkerRegistry

log = logging.getLogger(__name__)

TRUST_REASON = "predictions"
_UNKNOWN = -1  # a head-routed request's prefix, until the rest of its prompt is known

_OVER_CAUSES = (
    "the index holds blocks the engine does not: an engine restart or cache reset the gateway missed, "
    "or removal events lost"
)
_UNDER_CAUSES = (
    "the engine holds blocks the index does not know: store events lost, a block-size or hash mismatch "
    "with the gateway, or a different tokenizer or chat template on the worker"
)


class HitCheck:
    """A ``RequestListener``: predicted vs reported cached tokens, per worker, acted upon."""

    def __init__(
        self, accounting: HitAccounting, indexer: KvIndexer, metrics: GatewayMetrics, registry: WorkerRegistry
    ) -> None:
        self.accounting = accounting
        self.indexer = indexer
        self.metrics = metrics
        self.registry = registry
        # Per request in flight: prefix blocks the index held for its worker when sent there.
        self._predicted: dict[InFlight, int | None] = {}
        self._unsubscribe: Callable[[], None] = registry.subscribe(self._on_registry_change)

    # -- the request lifecycle (a RequestListener on the router) --------------------------

    def on_begin(self, flight: InFlight) -> None:
        # None: the engine may find blocks a request ahead of this one computes meanwhile; not judged.
        blocks = predicted_blocks(flight.decision, flight.key, self.indexer, flight.predicted_hashes)
        decision = flight.decision
        if blocks is not None and decision.head_only and blocks >= decision.num_blocks:
            # Routed on its prompt's head, all of which this worker holds: it may hold more of the prompt
            # (a conversation's worker holds the previous answer too). Known only once the rest is
            # (``Router.extend``: ``InFlight.held_blocks``); a prompt whose rest is never encoded goes unchecked.
            blocks = _UNKNOWN
        self._predicted[flight] = blocks

    def on_first_token(self, flight: InFlight) -> None:
        """Nothing to compare until the answer's usage arrives."""

    def on_finish(self, flight: InFlight) -> None:
        blocks = self._predicted.pop(flight, None)
        if blocks == _UNKNOWN:
            held = flight.held_blocks
            blocks = held[1] if held is not None and held[0] == flight.key else None
        outcome = flight.outcome
        if blocks is None or not isinstance(outcome, Outcome) or outcome.status != "200" or outcome.sequences != 1:
            return
        exchange = outcome.exchange
        if exchange is None or not exchange.complete or exchange.cached_tokens is None:
            return
        worker = flight.key.worker_id
        check = self.accounting.record(worker, flight.prompt_tokens, blocks, exchange.cached_tokens)
        self.metrics.observe_prediction(worker, check.predicted_tokens, check.actual_tokens, check.mismatch)
        if check.verdict is not None:
            self._act(check.verdict)

    # -- state read by /health and /metrics -----------------------------------------------

    def trusted(self) -> dict[str, bool]:
        """Per registered worker: whether its predictions are trusted."""
        return {info.worker_id: self.accounting.trusted(info.worker_id) for info in self.registry.all()}

    def distrusted(self, workers: Iterable[str]) -> dict[str, dict[str, object]]:
        """Per worker of ``workers`` whose predictions are not trusted: its current window
        (answers checked since, over- and under-predicted)."""
        out: dict[str, dict[str, object]] = {}
        for worker in workers:
            hits = self.accounting.hits(worker)
            if hits is not None and not hits.trusted:
                out[worker] = {
                    "trusted": hits.trusted,
                    "checked": len(hits.window),
                    "over": hits.over,
                    "under": hits.under,
                }
        return out

    def close(self) -> None:
        self._unsubscribe()

    def _act(self, verdict: Verdict) -> None:
        self.indexer.set_trusted(verdict.worker, verdict.trusted, reason=TRUST_REASON)
        hits = self.accounting.hits(verdict.worker)
        assert hits is not None, "a verdict comes from a recorded answer"
        totals = f"{hits.predicted_tokens:,} predicted / {hits.actual_tokens:,} reported cached tokens in all"
        if verdict.trusted:
            log.info(
                "worker %s: cached tokens agree with the index again (%d of the last %d answers off by a block "
                "or more; %s): its index is trusted again",
                verdict.worker,
                verdict.mismatches,
                verdict.checked,
                totals,
            )
            return
        causes = _OVER_CAUSES if verdict.over >= verdict.under else _UNDER_CAUSES
        log.warning(
            "worker %s: %d of its last %d answers reported cached tokens off from the index's prediction by a "
            "block or more (%d over-predicted, %d under-predicted; %s). Likely cause: %s. Its index is no longer "
            "trusted: it is routed by load alone until its answers agree again.",
            verdict.worker,
            verdict.mismatches,
            verdict.checked,
            verdict.over,
            verdict.under,
            totals,
            causes,
        )

    def _on_registry_change(self, change: RegistryChange) -> None:
        if change.kind == "removed":
            self.accounting.forget(change.worker.worker_id)
