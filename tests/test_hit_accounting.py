"""Hit accounting: predicted against reported cached tokens, judged per worker, acted upon.

``router.accounting`` (the engine's last-token rule, the sliding window, the thresholds,
recovery), the index's trust kept per reason with a trust-ignoring match, and
``gateway.hit_check.HitCheck`` driven through a real ``Router`` and ``GatewayMetrics``:
an over-predicting worker stops being trusted (log, gauge, health, index) and comes back.
"""

from __future__ import annotations

import itertools
import logging

import pytest

from kvgate.gateway.api import parse_chat, parse_completion
from kvgate.gateway.config import config_from_dict, load_config
from kvgate.gateway.hit_check import TRUST_REASON, HitCheck
from kvgate.gateway.metrics import GatewayMetrics, Outcome, StateSources
from kvgate.gateway.relay import Exchange
from kvgate.indexer.index import Match
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.protocol.events import RouterStored, WorkerKey
from kvgate.protocol.hashing import sequence_hashes
from kvgate.router.accounting import AGREE, OVER, UNDER, HitAccounting, engine_cached_tokens, predicted_blocks
from kvgate.router.config import RouterConfig
from kvgate.router.registry import StaticDiscovery
from kvgate.router.routing import Router

BS = 64
CHAT = "/v1/chat/completions"


# -- the engine's last-token rule ------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt_tokens,blocks,expected",
    [
        (640, 10, 9 * BS),  # cached whole: the engine recomputes the last token, so one block less
        (641, 10, 10 * BS),  # one token past the blocks: all of them count
        (700, 3, 3 * BS),  # a shorter prefix is reported as it is
        (64, 1, 0),
        (65, 1, BS),
        (0, 0, 0),
        (10, 0, 0),
    ],
)
def test_engine_cached_tokens_applies_the_last_token_rule(prompt_tokens: int, blocks: int, expected: int) -> None:
    assert engine_cached_tokens(prompt_tokens, blocks, BS) == expected


# -- one answer compared ------------------------------------------------------------------------


def test_an_answer_agrees_within_a_block_and_is_off_by_a_block_either_way() -> None:
    acc = HitAccounting(BS, window=10, mismatches=10)
    assert acc.record("w", 641, 10, 640).off == AGREE
    assert acc.record("w", 641, 10, 640 - 63).off == AGREE  # less than a block apart
    over = acc.record("w", 641, 10, 640 - 64)
    assert over.off == OVER and over.mismatch and over.predicted_tokens == 640 and over.actual_tokens == 576
    under = acc.record("w", 641, 2, 4 * BS)
    assert under.off == UNDER and under.predicted_tokens == 2 * BS
    # The cap: a prompt cached whole predicts a block less, as the engine reports it.
    assert acc.record("w", 640, 10, 9 * BS).off == AGREE
    hits = acc.hits("w")
    assert hits is not None
    assert (hits.checks, hits.mismatches) == (5, 2)
    assert hits.predicted_tokens == 640 + 640 + 640 + 128 + 576
    assert hits.actual_tokens == 640 + 577 + 576 + 256 + 576
    assert (hits.over, hits.under) == (1, 1)


def test_nothing_predicted_and_nothing_reported_is_counted_but_not_judged() -> None:
    acc = HitAccounting(BS, window=2, mismatches=2)
    for _ in range(5):
        check = acc.record("w", 1000, 0, 0)
        assert check.off == AGREE and check.verdict is None
    hits = acc.hits("w")
    assert hits is not None and hits.checks == 5 and len(hits.window) == 0


# -- the window: distrust, recovery ------------------------------------------------------------------


def test_k_mismatches_within_the_last_n_stop_trusting_a_worker_and_others_are_unaffected() -> None:
    acc = HitAccounting(BS, window=4, mismatches=3)
    off, ok = (1000, 5, 0), (1000, 5, 5 * BS)
    assert acc.record("w", *off).verdict is None
    assert acc.record("w", *ok).verdict is None
    assert acc.record("w", *off).verdict is None
    assert acc.record("v", *off).verdict is None  # another worker's window is its own
    verdict = acc.record("w", *off).verdict
    assert verdict is not None and not verdict.trusted
    assert (verdict.worker, verdict.checked, verdict.over, verdict.under, verdict.mismatches) == ("w", 4, 3, 0, 3)
    assert not acc.trusted("w") and acc.trusted("v") and acc.trusted("never-seen")
    hits = acc.hits("w")
    assert hits is not None and len(hits.window) == 0  # a verdict starts a new window


def test_mismatches_that_slid_out_of_the_window_no_longer_count() -> None:
    acc = HitAccounting(BS, window=4, mismatches=3)
    off, ok = (1000, 0, 5 * BS), (1000, 5, 5 * BS)
    for sample in (off, off, ok, ok, ok, off, ok, off):  # never 3 off among any 4 in a row
        assert acc.record("w", *sample).verdict is None
    assert acc.trusted("w")
    assert acc.record("w", *off).verdict is not None  # off, ok, off, off: 3 of the last 4


def test_an_untrusted_worker_needs_a_full_agreeing_window_to_be_trusted_again() -> None:
    acc = HitAccounting(BS, window=4, mismatches=2)
    off, ok = (1000, 0, 5 * BS), (1000, 5, 5 * BS)
    acc.record("w", *off)
    assert acc.record("w", *off).verdict is not None and not acc.trusted("w")
    # Fewer than 2 off, but the window is not full yet: not enough evidence.
    for sample in (ok, off, ok):
        assert acc.record("w", *sample).verdict is None
    assert acc.record("w", *off).verdict is None  # full, but 2 off: ok, off, ok, off
    assert acc.record("w", *ok).verdict is None  # still 2 off: off, ok, off, ok
    verdict = acc.record("w", *ok).verdict  # ok, off, ok, ok: 1 off in a full window
    assert verdict is not None and verdict.trusted and (verdict.checked, verdict.mismatches) == (4, 1)
    assert acc.trusted("w")


def test_recovery_takes_a_whole_window_and_starts_a_new_one() -> None:
    acc = HitAccounting(BS, window=3, mismatches=2)
    off, ok = (1000, 0, 5 * BS), (1000, 5, 5 * BS)
    acc.record("w", *off)
    acc.record("w", *off)
    assert not acc.trusted("w")
    assert acc.record("w", *ok).verdict is None
    assert acc.record("w", *ok).verdict is None
    verdict = acc.record("w", *ok).verdict
    assert verdict is not None and verdict.trusted and (verdict.checked, verdict.mismatches) == (3, 0)
    # Trusted again with a fresh window: one old-style mismatch alone does not flip it back.
    assert acc.record("w", *off).verdict is None and acc.trusted("w")


def test_window_zero_counts_without_judging_and_bad_settings_are_refused() -> None:
    acc = HitAccounting(BS, window=0)
    for _ in range(50):
        assert acc.record("w", 1000, 0, 5 * BS).verdict is None
    hits = acc.hits("w")
    assert acc.trusted("w") and hits is not None and hits.mismatches == 50
    with pytest.raises(ValueError, match="window"):
        HitAccounting(BS, window=-1)
    with pytest.raises(ValueError, match="mismatches"):
        HitAccounting(BS, window=3, mismatches=4)
    with pytest.raises(ValueError, match="mismatches"):
        HitAccounting(BS, window=3, mismatches=0)


def test_a_forgotten_worker_comes_back_trusted_with_no_history() -> None:
    acc = HitAccounting(BS, window=1, mismatches=1)
    acc.record("w", 1000, 0, 5 * BS)
    assert not acc.trusted("w")
    acc.forget("w")
    assert acc.trusted("w") and acc.hits("w") is None


# -- the index: trust per reason, and the trust-ignoring match -----------------------------------------


TOKENS = list(range(10 * BS + 10))
SEQ = sequence_hashes(TOKENS, BS)


def test_trust_is_kept_per_reason_and_a_trust_ignoring_match_still_sees_the_worker() -> None:
    ix = KvIndexer(BS)
    ix.apply_router_events(WorkerKey("w"), [RouterStored(SEQ[:4])])
    ix.set_trusted("w", False)  # its event stream went stale
    ix.set_trusted("w", False, reason="predictions")
    ix.set_trusted("w", True)  # the stream is back: the predictions still disagree
    assert not ix.trusted("w") and ix.trusted("w", reason="events") and not ix.trusted("w", reason="predictions")
    assert ix.find_matches(SEQ) == {}
    assert ix.find_matches(SEQ, include_untrusted=True) == {WorkerKey("w"): Match(4, [4, 0, 0])}
    ix.set_trusted("w", True, reason="predictions")
    assert ix.trusted("w") and ix.find_matches(SEQ) == {WorkerKey("w"): Match(4, [4, 0, 0])}
    ix.set_trusted("w", False, reason="predictions")
    ix.remove_worker("w")  # forgets every reason
    assert ix.trusted("w") and ix.trusted("w", reason="predictions")


def test_predicted_blocks_is_the_decisions_depth_or_for_an_untrusted_worker_the_index_ignoring_trust() -> None:
    ix = KvIndexer(BS)
    registry = StaticDiscovery([{"id": "w0", "url": "http://127.0.0.1:1"}, {"id": "w1", "url": "http://127.0.0.1:2"}])
    router = Router(RouterConfig(), ix, registry.registry())
    ix.apply_router_events(WorkerKey("w0"), [RouterStored(SEQ[:6])])
    ix.apply_router_events(WorkerKey("w1"), [RouterStored(SEQ[:3])])
    decision = router.route(TOKENS)
    assert list(decision.seq_hashes) == SEQ
    assert predicted_blocks(decision, WorkerKey("w0"), ix) == 6
    assert predicted_blocks(decision, WorkerKey("w1"), ix) == 3
    ix.set_trusted("w1", False, reason="predictions")
    decision = router.route(TOKENS)
    assert decision.score_of(WorkerKey("w1")).depth == 0  # type: ignore[union-attr]  # the router no longer sees it
    assert predicted_blocks(decision, WorkerKey("w1"), ix) == 3  # what its index would have said
    assert predicted_blocks(decision, WorkerKey("nobody"), ix) == 0


# -- HitCheck: the loop closed through a Router, GatewayMetrics and the index -------------------------


def setup(window: int = 4, mismatches: int = 3) -> tuple[Router, KvIndexer, GatewayMetrics, HitCheck]:
    ix = KvIndexer(BS)
    registry = StaticDiscovery(
        [{"id": "w0", "url": "http://127.0.0.1:1"}, {"id": "w1", "url": "http://127.0.0.1:2"}]
    ).registry()
    # Without predictions of sent blocks: these tests judge the events' index alone.
    router = Router(RouterConfig(predict_sent=False), ix, registry)
    check: HitCheck | None = None
    metrics = GatewayMetrics(
        StateSources(
            block_counts=ix.block_counts,
            indexer_stats=lambda: ix.stats,
            load=lambda: {},
            workers_up=lambda: {},
            prediction_trusted=lambda: check.trusted() if check is not None else {},
        )
    )
    check = HitCheck(HitAccounting(BS, window, mismatches), ix, metrics, registry)
    router.subscribe(metrics)
    router.subscribe(check)
    return router, ix, metrics, check


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


REQUEST_IDS = itertools.count()


def serve(router: Router, tokens: list[int], key: WorkerKey, cached: int | None, **outcome: object) -> None:
    """Route ``tokens``, send them to ``key`` and finish with a 200 reporting ``cached``."""
    flight = router.begin(str(next(REQUEST_IDS)), router.route(tokens), len(tokens), key)
    exchange = Exchange(0.0, complete=True, cached_tokens=cached)
    flight.finish(Outcome(CHAT, str(outcome.pop("status", "200")), exchange, **outcome))  # type: ignore[arg-type]


def prompt(i: int, blocks: int = 5) -> list[int]:
    return [i * 10_000 + t for t in range(blocks * BS + 1)]


def test_an_over_predicting_worker_is_distrusted_with_a_warning_and_trusted_again_once_it_agrees(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router, ix, metrics, check = setup(window=4, mismatches=3)
    w0, w1 = WorkerKey("w0"), WorkerKey("w1")
    # w1's index claims prompts its engine does not hold (say it restarted unseen).
    claimed = [prompt(i) for i in range(3)]
    for tokens in claimed:
        ix.apply_router_events(w1, [RouterStored(sequence_hashes(tokens, BS))])
    # w0 is right: it holds what its index says.
    good = prompt(100)
    ix.apply_router_events(w0, [RouterStored(sequence_hashes(good, BS))])
    with caplog.at_level(logging.INFO, logger="kvgate.gateway.hit_check"):
        for i, tokens in enumerate(claimed):
            serve(router, good, w0, 5 * BS)
            serve(router, tokens, w1, 0)
            assert ix.trusted("w1") == (i < 2)
    assert not ix.trusted("w1") and not ix.trusted("w1", reason=TRUST_REASON) and ix.trusted("w1", reason="events")
    assert ix.trusted("w0")
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    text = warning[0].getMessage()
    assert "worker w1" in text and "3 of its last 3" in text and "3 over-predicted, 0 under-predicted" in text
    assert "restart" in text and "960 predicted / 0 reported" in text
    assert value(metrics, "kvgate_prediction_mismatches_total", worker="w1") == 3
    assert value(metrics, "kvgate_prediction_mismatches_total", worker="w0") == 0
    assert value(metrics, "kvgate_predicted_cached_tokens_total", worker="w1") == 3 * 5 * BS
    assert value(metrics, "kvgate_engine_cached_tokens_total", worker="w1") == 0
    assert value(metrics, "kvgate_predicted_cached_tokens_total", worker="w0") == 3 * 5 * BS
    assert value(metrics, "kvgate_engine_cached_tokens_total", worker="w0") == 3 * 5 * BS
    assert value(metrics, "kvgate_prediction_checks_total", worker="w0") == 3
    assert value(metrics, "kvgate_worker_prediction_trusted", worker="w1") == 0
    assert value(metrics, "kvgate_worker_prediction_trusted", worker="w0") == 1
    assert check.distrusted(["w0", "w1"]) == {"w1": {"trusted": False, "checked": 0, "over": 0, "under": 0}}
    # The router no longer sees w1's claims...
    assert router.route(claimed[0]).score_of(w1).depth == 0  # type: ignore[union-attr]
    # ...but its answers are still judged on what its index would have said: still wrong,
    # it stays untrusted however long that goes on.
    for tokens in claimed * 2:
        serve(router, tokens, w1, 0)
    assert not ix.trusted("w1")
    assert check.distrusted(["w1"]) == {"w1": {"trusted": False, "checked": 4, "over": 4, "under": 0}}
    assert value(metrics, "kvgate_predicted_cached_tokens_total", worker="w1") == 9 * 5 * BS
    # Its engine now holds what its index says (or the index was fixed): once the last 4
    # hold fewer than 3 off, it is trusted again.
    with caplog.at_level(logging.INFO, logger="kvgate.gateway.hit_check"):
        for i, tokens in enumerate(claimed[:2]):
            serve(router, tokens, w1, 5 * BS)
            assert ix.trusted("w1") == (i == 1)
    assert ix.trusted("w1") and check.trusted() == {"w0": True, "w1": True} and check.distrusted(["w1"]) == {}
    assert value(metrics, "kvgate_worker_prediction_trusted", worker="w1") == 1
    assert any(r.levelno == logging.INFO and "worker w1" in r.getMessage() for r in caplog.records)
    assert router.route(claimed[0]).score_of(w1).depth == 5  # type: ignore[union-attr]


def test_an_under_predicting_worker_is_told_apart_and_blamed_on_lost_events_or_a_mismatch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router, ix, _, _ = setup(window=4, mismatches=2)
    with caplog.at_level(logging.WARNING, logger="kvgate.gateway.hit_check"):
        for i in range(2):
            serve(router, prompt(i), WorkerKey("w0"), 4 * BS)  # the index knew of nothing
    assert not ix.trusted("w0")
    (warning,) = caplog.records
    assert "0 over-predicted, 2 under-predicted" in warning.getMessage()
    assert (
        "block-size or hash mismatch" in warning.getMessage() and "tokenizer or chat template" in warning.getMessage()
    )


def test_answers_that_cannot_be_compared_are_left_out() -> None:
    router, ix, metrics, _ = setup(window=1, mismatches=1)
    w0 = WorkerKey("w0")
    serve(router, prompt(1), w0, 5 * BS, sequences=2)  # a completion batch or n > 1
    serve(router, prompt(2), w0, 5 * BS, status="500")
    serve(router, prompt(3), w0, None)  # no usage (a stream without include_usage)
    flight = router.begin("cancelled", router.route(prompt(4)), len(prompt(4)), w0)
    flight.finish()  # cancelled before any answer
    flight = router.begin("cut", router.route(prompt(5)), len(prompt(5)), w0)
    flight.finish(Outcome(CHAT, "200", Exchange(0.0, streamed=True, cached_tokens=5 * BS)))  # never completed
    assert value(metrics, "kvgate_prediction_checks_total", worker="w0") == 0
    assert ix.trusted("w0")


def test_a_retry_is_judged_on_the_worker_that_answered() -> None:
    router, ix, metrics, _ = setup(window=1, mismatches=1)
    tokens = prompt(7)
    ix.apply_router_events(WorkerKey("w1"), [RouterStored(sequence_hashes(tokens, BS))])
    flight = router.begin("r", router.route(tokens), len(tokens), WorkerKey("w0"))
    flight.move_to(WorkerKey("w1"))  # w0 refused the connection
    flight.finish(Outcome(CHAT, "200", Exchange(0.0, complete=True, cached_tokens=5 * BS)))
    assert value(metrics, "kvgate_prediction_checks_total", worker="w1") == 1
    assert value(metrics, "kvgate_prediction_mismatches_total", worker="w1") == 0
    assert value(metrics, "kvgate_prediction_checks_total", worker="w0") == 0


def test_a_worker_leaving_the_registry_forgets_its_verdict() -> None:
    router, ix, _, check = setup(window=1, mismatches=1)
    serve(router, prompt(1), WorkerKey("w1"), 5 * BS)
    assert not ix.trusted("w1") and check.trusted()["w1"] is False
    info = check.registry.get("w1")
    assert info is not None
    check.registry.remove("w1")
    check.registry.add(info)
    assert ix.trusted("w1") and check.trusted()["w1"] is True and check.accounting.hits("w1") is None


# -- configuration and the fields it needs ------------------------------------------------------


def test_prediction_options_defaults_flags_and_validation() -> None:
    config = load_config([], environ={})
    assert (config.prediction_window, config.prediction_mismatches) == (20, 10)
    config = load_config(["--prediction-window", "6", "--prediction-mismatches", "2"], environ={})
    assert (config.prediction_window, config.prediction_mismatches) == (6, 2)
    assert load_config([], environ={"KVGATE_PREDICTION_WINDOW": "0"}).prediction_window == 0
    with pytest.raises(ValueError, match="prediction_window"):
        config_from_dict({"prediction_window": -1})
    with pytest.raises(ValueError, match="prediction_mismatches"):
        config_from_dict({"prediction_window": 4, "prediction_mismatches": 5})
    with pytest.raises(ValueError, match="prediction_mismatches"):
        config_from_dict({"prediction_mismatches": 0})
    config_from_dict({"prediction_window": 0, "prediction_mismatches": 0})  # never judged: unused


def test_the_gateway_reads_n_to_tell_how_many_sequences_an_answer_covers() -> None:
    assert parse_chat(b'{"messages": [{"role": "user", "content": "x"}]}').n == 1
    assert parse_chat(b'{"messages": [{"role": "user", "content": "x"}], "n": 3}').n == 3
    assert parse_completion(b'{"prompt": ["a", "b"], "n": 2}').n == 2


def test_an_answer_whose_prefix_was_only_predicted_is_not_judged() -> None:
    """Blocks the router just sent count as held for routing, but say nothing about whether the worker's
    events are right; nor can the events hold yet what a request ahead of this one is computing there,
    which the engine will find: such an answer is not judged (it was, on the events alone, and a burst's
    followers made every worker untrusted: 75-85 % of them counted as mismatches)."""
    ix = KvIndexer(BS)
    registry = StaticDiscovery([{"id": "w0", "url": "http://127.0.0.1:1"}])
    router = Router(RouterConfig(), ix, registry.registry())
    first = router.route(TOKENS)
    flight = router.begin("r1", first, len(TOKENS))
    assert len(flight.predicted_hashes) == len(SEQ)
    # The first one's own predictions do not count against it: nothing was held when it was sent.
    assert predicted_blocks(first, WorkerKey("w0"), ix, flight.predicted_hashes) == 0
    follower = router.route(TOKENS)
    score = follower.score_of(WorkerKey("w0"))
    assert score is not None and score.predicted and score.depth == len(SEQ)
    assert predicted_blocks(follower, WorkerKey("w0"), ix) is None  # the first one's blocks, not yet in events
    # Nor for an untrusted worker, asked of the index again (leaving out the request's own predictions).
    ix.set_trusted("w0", False, reason="predictions")
    late = router.route(TOKENS)
    assert predicted_blocks(late, WorkerKey("w0"), ix, ()) is None
    assert predicted_blocks(late, WorkerKey("w0"), ix, flight.predicted_hashes) == 0  # were they its own
    ix.set_trusted("w0", True, reason="predictions")
    # Once nothing is prefilling there, predictions the events never confirmed are what a worker with
    # wrong events leaves behind: judged on the events.
    assert flight.first_token()
    after = router.route(TOKENS)
    assert after.chosen_score.predicted and predicted_blocks(after, WorkerKey("w0"), ix) == 0
    ix.apply_router_events(WorkerKey("w0"), [RouterStored(SEQ)])  # the engine's events confirm them
    confirmed = router.route(TOKENS)
    assert not confirmed.chosen_score.predicted
    assert predicted_blocks(confirmed, WorkerKey("w0"), ix) == len(SEQ)
