"""indexer.predictions through KvIndexer and the Router: what was just sent counts as cached
there until the engine's events confirm or remove it, its TTL expires or its rank's capacity
pushes it out; a burst sharing a new prefix follows its first request."""

from __future__ import annotations

import pytest

from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.indexer.predictions import PredictedBlocks
from kvgate.protocol.events import RouterCleared, RouterRemoved, RouterStored, Tier, WorkerKey
from kvgate.protocol.hashing import sequence_hashes
from kvgate.router.config import RouterConfig
from kvgate.router.load import LoadTracker
from kvgate.router.registry import StaticDiscovery
from kvgate.router.routing import Router

BS = 64
A, B, C = WorkerKey("a"), WorkerKey("b"), WorkerKey("c")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fleet(*ids: str, clock: Clock | None = None, capacity: int = 16_384, **kw) -> tuple[Router, KvIndexer, Clock]:
    """A router over static workers ``ids`` and its index; no engine ever publishes an event."""
    clock = clock or Clock()
    # Reuse preferred on equal TTFTs (the default, pinned: these tests follow what the
    # predictions make a worker hold).
    kw.setdefault("added_work_weight", 0.5)
    config = RouterConfig(**kw)
    indexer = KvIndexer(block_size=BS, prediction_capacity=capacity, clock=clock)
    registry = StaticDiscovery([{"id": i, "url": f"http://127.0.0.1:{9000 + n}"} for n, i in enumerate(ids)]).registry()
    router = Router(config, indexer, registry, LoadTracker.from_config(config, clock=clock), clock=clock)
    return router, indexer, clock


def prompt(prefix_blocks: int, suffix_tokens: int, *, prefix: int = 1, suffix: int = 0) -> list[int]:
    """A ``prefix_blocks``-block shared prefix (numbered ``prefix``) and a ``suffix_tokens`` tail."""
    head = [prefix * 1_000_000 + i for i in range(prefix_blocks * BS)]
    return head + [2_000_000_000 + suffix * 10_000 + i for i in range(suffix_tokens)]


def depth(indexer: KvIndexer, key: WorkerKey, tokens: list[int]) -> int:
    m = indexer.find_matches(sequence_hashes(tokens, BS)).get(key)
    return 0 if m is None else m.depth


def send(router: Router, tokens: list[int], request_id: str):
    decision = router.route(tokens)
    router.begin(request_id, decision, len(tokens))
    return decision


def test_a_burst_sharing_a_new_prefix_follows_the_first_until_another_worker_is_cheaper():
    router, indexer, _ = fleet("a", "b", "c")
    # 32 shared blocks (2,048 tokens) and a 40-token tail of its own: nobody holds any of it.
    first = send(router, prompt(32, 40, suffix=0), "r0")
    assert first.chosen == A and first.chosen_score.depth == 0
    # No event has come, yet a is predicted to hold the prefix, as GPU blocks.
    m = indexer.find_matches(sequence_hashes(prompt(32, 40, suffix=1), BS))
    assert set(m) == {A} and (m[A].depth, m[A].per_tier, m[A].predicted) == (32, [32, 0, 0], True)
    chosen = [A]
    decisions = []
    for i in range(1, 60):
        d = send(router, prompt(32, 40, suffix=i), f"r{i}")
        decisions.append(d)
        chosen.append(d.chosen)
    # The followers pile onto a (40 tokens to compute each, behind a's queue) while that is
    # cheaper than computing the prefix on an idle worker...
    switch = chosen.index(B)
    assert switch >= 20 and set(chosen[:switch]) == {A}
    before, at = decisions[switch - 2], decisions[switch - 1]
    assert before.score_of(A).total < before.score_of(B).total and before.score_of(A).depth == 32
    # (costs within 5% are a tie, which the less loaded worker wins)
    assert at.score_of(A).total > 0.95 * at.score_of(B).total and at.score_of(B).depth == 0
    assert at.score_of(A).queued_prefill_tokens == 2088 + 40 * (switch - 1)
    # ...then the hot prefix replicates: b computes it once and the next followers go to b,
    # predicted to hold it, until b's queue is as long as a's; then c (none finishes here);
    # then, all three holding it with queues within a tie (5%), whichever is least loaded.
    assert depth(indexer, B, prompt(32, 0)) == 32
    assert decisions[switch].chosen == B and decisions[switch].score_of(B).depth == 32
    assert decisions[switch].explain()["candidates"][0]["overlap"]["predicted"] is True
    n_b = chosen[switch:].index(C)
    assert n_b >= switch - 3 and set(chosen[switch : switch + n_b]) == {B}
    assert chosen[switch + n_b : switch + 2 * n_b - 3] == [C] * (n_b - 3)
    assert depth(indexer, C, prompt(32, 0)) == 32


def test_without_predictions_a_burst_scatters_over_the_fleet():
    router, indexer, _ = fleet("a", "b", "c", predict_sent=False)
    chosen = [send(router, prompt(32, 40, suffix=i), f"r{i}").chosen for i in range(3)]
    assert chosen == [A, B, C]  # each sees the others busy and nobody holding the prefix
    assert len(indexer.predictions) == 0 and indexer.predictions.predicted == 0


def test_stored_events_confirm_predictions_and_the_match_stays():
    router, indexer, _ = fleet("a", "b")
    tokens = prompt(12, 0)
    hashes = sequence_hashes(tokens, BS)
    assert send(router, tokens, "r0").chosen == A
    assert indexer.predictions.held(A) == 12 and indexer.predictions.predicted == 12
    # Events win, whatever the tier they name.
    indexer.apply_router_events(A, [RouterStored(hashes[:8], Tier.GPU), RouterStored(hashes[8:], Tier.CPU)])
    assert indexer.predictions.held(A) == 0 and indexer.predictions.confirmed == 12
    m = indexer.find_matches(hashes)[A]
    assert (m.depth, m.per_tier, m.predicted) == (12, [8, 4, 0], False)
    # Events for another worker confirm nothing of a's.
    indexer.apply_router_events(B, [RouterStored(hashes, Tier.GPU)])
    assert indexer.predictions.confirmed == 12


def test_a_partly_confirmed_prediction_still_extends_the_engines_prefix():
    # The engine stores a long prompt chunk by chunk: its first 8 blocks are confirmed, the
    # last 4 still only predicted.
    router, indexer, _ = fleet("a", "b")
    tokens = prompt(12, 0)
    hashes = sequence_hashes(tokens, BS)
    send(router, tokens, "r0")
    indexer.apply_router_events(A, [RouterStored(hashes[:8], Tier.GPU)])
    assert indexer.predictions.held(A) == 4 and indexer.predictions.confirmed == 8
    m = indexer.find_matches(hashes)[A]
    assert (m.depth, m.per_tier) == (12, [12, 0, 0])


def test_removed_events_drop_predictions_and_cleared_clears_them():
    router, indexer, _ = fleet("a", "b")
    tokens = prompt(12, 0)
    hashes = sequence_hashes(tokens, BS)
    send(router, tokens, "r0")
    indexer.apply_router_events(A, [RouterRemoved(hashes[6:], Tier.GPU)])  # the engine never kept them
    assert indexer.predictions.held(A) == 6 and indexer.predictions.confirmed == 0
    assert depth(indexer, A, tokens) == 6
    indexer.apply_router_events(A, [RouterCleared()])
    assert indexer.predictions.held(A) == 0 and depth(indexer, A, tokens) == 0


def test_predictions_expire_after_their_ttl_unless_sent_again():
    router, indexer, clock = fleet("a", "b", prediction_ttl=20.0)
    tokens = prompt(8, 0)
    send(router, tokens, "r0")
    clock.now = 19.9
    assert depth(indexer, A, tokens) == 8
    clock.now = 20.0
    assert depth(indexer, A, tokens) == 0 and indexer.predictions.expired == 8 and len(indexer.predictions) == 0
    # Sent again at 30 and at 45 (half the blocks): those live until 65, the others until 50.
    clock.now = 30.0
    indexer.predict(A, sequence_hashes(tokens, BS), 20.0)
    clock.now = 45.0
    indexer.predict(A, sequence_hashes(tokens[: 4 * BS], BS), 20.0)
    clock.now = 55.0
    assert depth(indexer, A, tokens) == 4 and indexer.predictions.held(A) == 4
    clock.now = 65.0
    assert depth(indexer, A, tokens) == 0 and indexer.predictions.expired == 16


def test_each_rank_keeps_at_most_capacity_predictions_least_recently_sent_evicted_first():
    clock = Clock()
    predictions = PredictedBlocks(10, clock)
    one, two = sequence_hashes(prompt(8, 0, prefix=1), BS), sequence_hashes(prompt(8, 0, prefix=2), BS)
    predictions.predict(A, one, 60.0)
    predictions.predict(B, one, 60.0)
    predictions.predict(A, two, 60.0)  # 16 on a: its 6 oldest (one's first six) go
    assert (predictions.held(A), predictions.held(B), predictions.evicted) == (10, 8, 6)
    found = predictions.find_matches(one)
    assert A not in found and found[B].depth == 8  # one's first block gone from a: no prefix left there
    assert predictions.find_matches(two)[A].depth == 8
    # Sending one again refreshes it: now two's oldest blocks go.
    predictions.predict(A, one, 60.0)
    assert predictions.find_matches(one)[A].depth == 8 and A not in predictions.find_matches(two)
    assert predictions.held(A) == 10 and predictions.evicted == 12
    with pytest.raises(ValueError, match="capacity_blocks must be a positive integer"):
        PredictedBlocks(0, clock)


def test_the_router_sizes_the_index_capacity_per_rank():
    router, indexer, _ = fleet("a", "b", capacity=10)
    send(router, prompt(8, 0, prefix=1), "r0")
    assert send(router, prompt(8, 0, prefix=1), "r1").chosen == A  # predicted there
    router.indexer.predict(A, sequence_hashes(prompt(8, 0, prefix=2), BS), 20.0)
    assert depth(indexer, A, prompt(8, 0, prefix=1)) == 0 and indexer.predictions.held(A) == 10


def test_removed_or_lost_workers_lose_their_predictions():
    router, indexer, _ = fleet("a", "b")
    tokens = prompt(8, 0)
    send(router, tokens, "r0")
    send(router, prompt(8, 0, prefix=2), "r1")  # to b (a is busy)
    assert depth(indexer, A, tokens) == 8 and indexer.predictions.held(B) == 8
    indexer.engine_lost("a")
    assert depth(indexer, A, tokens) == 0 and indexer.predictions.held(A) == 0
    assert indexer.predictions.held(B) == 8
    router.registry.remove("b")
    assert indexer.predictions.held(B) == 0 and len(indexer.predictions) == 0


def test_an_untrusted_worker_is_routed_on_load_alone_predictions_included():
    router, indexer, _ = fleet("a", "b")
    tokens = prompt(8, 0)
    hashes = sequence_hashes(tokens, BS)
    indexer.apply_router_events(B, [RouterStored(hashes, Tier.GPU)])
    indexer.predict(A, hashes[:5], 20.0)
    assert indexer.find_matches(hashes)[A].depth == 5  # trusted: what was sent to it counts
    indexer.set_trusted("a", False)
    indexer.set_trusted("b", False)
    # Its engine may not cache what it is sent (the reason it is distrusted): neither counts.
    assert indexer.find_matches(hashes) == {}
    found = indexer.find_matches(hashes, include_untrusted=True)
    assert found[A].depth == 5 and found[A].predicted and found[B].depth == 8
    assert A not in indexer.find_matches(hashes, include_untrusted=True, include_predictions=False)


def test_approximate_mode_keeps_predictions_for_its_own_ttl():
    for approximate, alive_until in ((False, 5.0), (True, 100.0)):
        router, indexer, clock = fleet(
            "a", "b", approximate=approximate, prediction_ttl=5.0, approximate_prediction_ttl=100.0
        )
        tokens = prompt(8, 0)
        send(router, tokens, "r0")
        clock.now = alive_until - 0.1
        assert depth(indexer, A, tokens) == 8, approximate
        clock.now = alive_until
        assert depth(indexer, A, tokens) == 0, approximate


def test_a_retry_or_a_failed_answer_drops_the_prediction_of_the_worker_that_failed():
    router, indexer, _ = fleet("a", "b", "c")
    tokens = prompt(8, 0)
    flight = router.begin("r0", router.route(tokens), len(tokens))
    assert flight.key == A and depth(indexer, A, tokens) == 8
    flight.move_to(B)  # a failed it: b holds the prompt now, a does not
    assert depth(indexer, A, tokens) == 0 and depth(indexer, B, tokens) == 8
    flight.report_usage(None, streamed=False, served=False)  # b failed too
    flight.finish("failed")
    assert indexer.find_matches(sequence_hashes(tokens, BS)) == {} and len(indexer.predictions) == 0
    # A served answer keeps it.
    served = router.begin("r1", router.route(tokens), len(tokens))
    served.report_usage(0, streamed=True)
    served.finish("done")
    assert depth(indexer, served.key, tokens) == 8
