"""router.policies: the kv cost model (predicted time to first token) term by term, tie-breaks,
temperature, busy, round-robin, random."""

import json
import math
from collections import Counter

import pytest

from kvgate.indexer.index import Match
from kvgate.protocol.events import WorkerKey
from kvgate.router.config import BusyThresholds, RouterConfig, SpeedConfig
from kvgate.router.load import LoadSnapshot
from kvgate.router.policies import KvPolicy, NoWorkerAvailable, RandomPolicy, RoundRobinPolicy, make_policy
from kvgate.router.speed import SpeedModel

A, B, C, D = (WorkerKey(x) for x in "abcd")
KEYS = [A, B, C]


def match(gpu=0, cpu=0, disk=0):
    return Match(depth=gpu + cpu + disk, per_tier=[gpu, cpu, disk])


# Hand-built case, in milliseconds (block_size 64, a 10-block = 640-token prompt). EXAMPLE
# seeds, pinned so the worked example stays exact when the defaults change: 32,000 prefill
# tokens/s (1/32 ms a token, 2 ms a block), 10 ms overhead, CPU 0.5 ms and disk 1 ms a
# block, decode slowdown 0.5 (a worker at KV usage u prefills 1 + 0.5 u times slower),
# added_work_weight 0.5 (total = ttft + 0.5 x the request's own prefill time).
#   a: prefix of 6 = 2 GPU + 3 CPU + 1 DISK, idle
#      ttft = overhead 10 + tier (3 * 0.5 + 1 * 1) + queued 0 + own 256 tokens / 32 = 10 + 2.5 + 8 = 20.5
#      total = 20.5 + 0.5 * 8 = 24.5
#   b: nothing cached, idle: ttft = 10 + 640 / 32 = 30, total = 30 + 0.5 * 20 = 40
#   c: all 10 on GPU, 384 queued prefill tokens, KV usage 0.5: 1.25 / 32 ms a token
#      ttft = 10 + 0 + 384 * 1.25 / 32 + 1 * 1.25 / 32 (the engine always computes the last token)
#           = 10 + 15 + 0.0390625 = 25.0390625 ; total = 25.0390625 + 0.01953125 = 25.05859375
EXAMPLE = SpeedConfig(
    prefill_tokens_per_s=32_000, overhead_ms=10.0, cpu_block_ms=0.5, disk_block_ms=1.0, decode_slowdown=0.5
)
MATCHES = {A: match(gpu=2, cpu=3, disk=1), C: match(gpu=10)}
LOADS = {C: LoadSnapshot(requests=2, prefill_tokens=384, blocks=5, kv_usage=0.5)}


def example(**kwargs) -> RouterConfig:
    kwargs.setdefault("added_work_weight", 0.5)
    kwargs.setdefault("running_work_weight", 0.0)  # its own test: test_requests_in_flight_add_to_the_added_work
    return RouterConfig(speed=EXAMPLE, **kwargs)


def terms_ms(score) -> tuple[float, ...]:
    """overhead, tier load, queued prefill, own prefill, ttft, added work, total: in milliseconds."""
    terms = (score.overhead, score.tier_load, score.queued_prefill, score.prefill, score.ttft, score.added_work)
    return tuple(x * 1e3 for x in (*terms, score.total))


def test_cost_terms_gpu_cpu_disk_absent_queued_and_kv_usage():
    decision = KvPolicy(example()).select(KEYS, MATCHES, 10, LOADS)
    assert decision.chosen == A and decision.ranked == [A, C, B] and decision.mode == "kv"
    a, c, b = decision.scores
    assert (a.depth, a.gpu_blocks, a.cpu_blocks, a.disk_blocks) == (6, 2, 3, 1)
    assert (a.cached_blocks, a.uncached_tokens, a.queued_prefill_tokens, a.kv_usage) == (6, 256, 0, 0.0)
    assert terms_ms(a) == pytest.approx((10.0, 2.5, 0.0, 8.0, 20.5, 4.0, 24.5))
    assert a.seconds_per_token == pytest.approx(1 / 32_000)
    assert (b.depth, b.uncached_tokens) == (0, 640)
    assert terms_ms(b) == pytest.approx((10.0, 0.0, 0.0, 20.0, 30.0, 10.0, 40.0))
    assert (c.cached_blocks, c.uncached_tokens, c.queued_prefill_tokens, c.kv_usage) == (10, 1, 384, 0.5)
    assert c.seconds_per_token == pytest.approx(1.25 / 32_000)
    assert terms_ms(c) == pytest.approx((10.0, 0.0, 15.0, 0.0390625, 25.0390625, 0.01953125, 25.05859375))


def test_partial_last_block_and_kv_usage_from_tracked_blocks():
    # 650 prompt tokens: 10 full blocks + 10 tokens; a holds all 10 blocks -> 10 tokens to compute.
    # Without an engine-reported KV usage, the router's own block count over
    # prediction_capacity_blocks stands in for it: 50 of 200 blocks = 0.25.
    config = example(prediction_capacity_blocks=200)
    loads = {A: LoadSnapshot(requests=1, blocks=50), B: LoadSnapshot(requests=9, blocks=500)}
    decision = KvPolicy(config).select([A, B], {A: match(gpu=10)}, 10, loads, prompt_tokens=650)
    a, b = decision.score_of(A), decision.score_of(B)
    assert (a.uncached_tokens, a.kv_usage, b.uncached_tokens, b.kv_usage) == (10, 0.25, 650, 1.0)
    assert a.prefill * 1e3 == pytest.approx(10 * (1 + 0.5 * 0.25) / 32)
    assert b.prefill * 1e3 == pytest.approx(650 * 1.5 / 32)


def test_seeds_scale_the_terms():
    config = RouterConfig(
        speed=SpeedConfig(
            prefill_tokens_per_s=64_000, overhead_ms=5.0, cpu_block_ms=2.0, disk_block_ms=4.0, decode_slowdown=1.0
        ),
        added_work_weight=1.0,
    )
    decision = KvPolicy(config).select(KEYS, MATCHES, 10, LOADS)
    # a: 5 + (3 * 2 + 1 * 4) + 256 / 64 = 5 + 10 + 4 = 19 ; + 1.0 * 4 = 23
    assert terms_ms(decision.score_of(A)) == pytest.approx((5.0, 10.0, 0.0, 4.0, 19.0, 4.0, 23.0))
    # c: per token 1/64 ms * (1 + 1.0 * 0.5) = 1.5/64: 5 + 384 * 1.5 / 64 + 1.5 / 64 = 5 + 9 + 0.0234375
    # its added work counts its 2 requests in flight at the default running_work_weight 0.05: (1 + 0.1) x own
    c = (5.0, 0.0, 9.0, 0.0234375, 14.0234375, 0.02578125, 14.04921875)
    assert terms_ms(decision.score_of(C)) == pytest.approx(c)
    assert decision.chosen == C


def test_gpu_only_counts_lower_tier_blocks_as_absent():
    decision = KvPolicy(example(gpu_only=True)).select(KEYS, MATCHES, 10, LOADS)
    a = decision.score_of(A)
    assert (a.depth, a.cached_blocks, a.uncached_tokens) == (6, 2, 512)
    # 10 + 0 + 512 / 32 = 26, + 0.5 * 16 = 34 > c's 25.06: without the tiers a no longer looks best.
    assert terms_ms(a) == pytest.approx((10.0, 0.0, 0.0, 16.0, 26.0, 8.0, 34.0))
    assert decision.chosen == C


def test_tier_aware_prefers_cpu_hit_over_recompute_but_gpu_over_cpu():
    matches = {A: match(cpu=8), B: match(gpu=8), C: match(disk=8)}
    decision = KvPolicy(example()).select([A, B, C, D], matches, 8, {})
    assert decision.ranked == [B, A, C, D]
    # Each pays the overhead and the last token (1/32 ms); a loads 8 CPU blocks, c 8 disk
    # blocks, d computes all 512 tokens.
    assert [s.ttft * 1e3 for s in decision.scores] == pytest.approx([10 + 1 / 32, 14 + 1 / 32, 18 + 1 / 32, 26.0])


def test_short_prompt_with_no_full_block_routes_on_load_alone():
    loads = {
        A: LoadSnapshot(requests=1, blocks=3, kv_usage=0.5),
        B: LoadSnapshot(requests=1, prefill_tokens=64, blocks=1, kv_usage=0.0),
    }
    decision = KvPolicy(example()).select(KEYS, {}, 0, loads)
    # c idle (1 token) < a (1 token, 1.25x slower) < b (64 queued tokens + 1)
    assert decision.ranked == [C, A, B]
    assert [s.uncached_tokens for s in decision.scores] == [1, 1, 1]


def test_ties_go_to_least_loaded_then_to_the_smallest_key():
    # a holds 2 GPU blocks but has 192 tokens queued: 10 + (192 + 512) / 32 + 0.5 * 512 / 32 = 40,
    # as b idle: 10 + 640 / 32 + 0.5 * 640 / 32.
    loads = {A: LoadSnapshot(requests=1, prefill_tokens=192, blocks=2, kv_usage=0.0)}
    decision = KvPolicy(example()).select([A, B], {A: match(gpu=2)}, 10, loads)
    assert decision.score_of(A).total == pytest.approx(decision.score_of(B).total) == pytest.approx(0.040)
    assert decision.ranked == [B, A]
    # Identical candidates never chosen before: the key decides, whatever order they arrive in.
    for order in ([D, C, B, A], [B, D, A, C]):
        assert KvPolicy().select(order, {}, 4, {}).ranked == [A, B, C, D]


def test_added_work_breaks_equal_ttft_towards_cache_reuse():
    # a holds 2 GPU blocks and has 128 tokens queued: both predict a 30 ms first token.
    loads = {A: LoadSnapshot(requests=1, prefill_tokens=128, blocks=2, kv_usage=0.0)}
    ttft_only = KvPolicy(example(added_work_weight=0.0)).select([A, B], {A: match(gpu=2)}, 10, loads)
    assert ttft_only.score_of(A).ttft == pytest.approx(ttft_only.score_of(B).ttft) == pytest.approx(0.030)
    assert ttft_only.score_of(A).added_work == 0.0 and ttft_only.ranked == [B, A]  # a tie: least loaded
    # Counting the compute each would add (a: 512 tokens, b: 640), a wins: 30 + 8 < 30 + 10.
    d = KvPolicy(example()).select([A, B], {A: match(gpu=2)}, 10, loads)
    assert [s.total * 1e3 for s in d.scores] == pytest.approx([38.0, 40.0]) and d.ranked == [A, B]


def test_quiet_traffic_with_no_prefix_anywhere_spreads_over_every_worker():
    # Sequential requests (no load) for prompts nobody holds: each goes to the worker sent a
    # request least recently, so a quiet fleet uses all its caches instead of piling onto one key.
    def send(policy: KvPolicy, matches=None) -> WorkerKey:
        chosen = policy.select([A, B, C, D], matches or {}, 8, {}).chosen
        policy.sent(chosen)
        return chosen

    policy = KvPolicy()
    chosen = [send(policy) for _ in range(8)]
    assert chosen == [A, B, C, D, A, B, C, D]
    # A prefix still wins over recency: a holds the prompt, so it is chosen again.
    assert send(policy, {A: match(gpu=8)}) == A
    # ...and the next cold prompt skips a, the most recently sent.
    assert send(policy) == B
    # Scoring alone (what /debug/route does) moves nothing.
    assert [policy.select([A, B, C, D], {}, 8, {}).chosen for _ in range(3)] == [C, C, C]
    # The same call sequence gives the same answers.
    again = KvPolicy()
    assert [send(again) for _ in range(8)] == chosen


def test_totals_equal_up_to_rounding_are_a_tie():
    # 1 ms a block; b: 1 CPU (0.1) + 3 disk (0.7 each) + 6 computed = 8.2 ms, c: 2 CPU + 8 computed
    # = 8.2 ms -- exactly equal costs, but the float sums differ in the last bit.
    speed = SpeedConfig(prefill_tokens_per_s=64_000, cpu_block_ms=0.1, disk_block_ms=0.7)
    config = RouterConfig(speed=speed, added_work_weight=0.0)
    decision = KvPolicy(config).select([B, C], {B: match(cpu=1, disk=3), C: match(cpu=2)}, 10, {})
    tb, tc = decision.score_of(B).total, decision.score_of(C).total
    assert tb != tc and tb == pytest.approx(tc)
    assert decision.chosen == B
    decision = KvPolicy(config).select([C, B], {C: match(cpu=1, disk=3), B: match(cpu=2)}, 10, {})
    assert decision.score_of(B).total != decision.score_of(C).total
    assert decision.chosen == B


def test_temperature_samples_the_softmax_of_ttft_differences_in_seconds():
    # T = 3 ms: a holds one block (2 ms sooner than b and 1 ms less added work: 1 T cheaper),
    # c has 128 tokens queued (4 ms later than b: 7/3 T dearer than a).
    config = example(temperature=0.003, seed=1234)
    policy = KvPolicy(config)
    matches = {A: match(gpu=1)}
    loads = {C: LoadSnapshot(requests=1, prefill_tokens=128, kv_usage=0.0)}
    first = policy.select([A, B, C], matches, 4, loads)
    expected = {A: 1.0, B: math.exp(-1.0), C: math.exp(-7 / 3)}
    norm = sum(expected.values())
    for s in first.scores:
        assert s.probability == pytest.approx(expected[s.key] / norm)
    counts = Counter(policy.select([A, B, C], matches, 4, loads).chosen for _ in range(4000))
    for key in (A, B, C):
        assert counts[key] / 4000 == pytest.approx(expected[key] / norm, abs=0.03)
    # Same seed, same sequence of choices.
    again = KvPolicy(config)
    replay = KvPolicy(config)
    assert [again.select([A, B, C], matches, 4, loads).chosen for _ in range(50)] == [
        replay.select([A, B, C], matches, 4, loads).chosen for _ in range(50)
    ]


def test_temperature_ranks_the_rest_after_the_draw():
    policy = KvPolicy(RouterConfig(temperature=100.0, seed=3))
    seen = set()
    for _ in range(200):
        d = policy.select([A, B, C], {A: match(gpu=2), B: match(gpu=1)}, 4, {})
        rest = [k for k in [A, B, C] if k != d.chosen]
        assert d.ranked == [d.chosen, *rest]
        seen.add(d.chosen)
    assert seen == {A, B, C}


def test_zero_temperature_is_argmin_and_sets_no_probability():
    d = KvPolicy(example(temperature=0.0)).select(KEYS, MATCHES, 10, LOADS)
    assert d.chosen == A and all(s.probability is None for s in d.scores)


def test_learned_speeds_are_what_the_policy_scores_with():
    speed = SpeedModel(EXAMPLE)
    speed.speed("b").seconds_per_token = 1 / 128_000  # b learned it is 4x faster
    speed.speed("b").overhead = 0.002
    for worker in "abc":
        speed.speed(worker).samples = 3  # enough answers to be predicted by their own rates
        speed.speed(worker).updated = speed.clock()  # just now: not faded into the fleet's
    d = KvPolicy(example(), speed).select(KEYS, MATCHES, 10, LOADS)
    # Every worker is predicted with the fleet's overhead, (10 + 2 + 10) / 3 ms; b's speed is its own:
    # 7.33 + 640 / 128 = 12.33 ms, + 0.5 * 5: 14.83, now cheaper than a's without holding anything.
    assert terms_ms(d.score_of(B)) == pytest.approx((22 / 3, 0.0, 0.0, 5.0, 22 / 3 + 5, 2.5, 22 / 3 + 7.5))
    assert d.ranked == [B, A, C]
    assert d.speed is speed


def test_busy_workers_are_skipped_even_when_cheapest():
    config = RouterConfig(busy=BusyThresholds(max_kv_usage=0.9, max_waiting=3, max_prefill_tokens=1000))
    loads = {
        A: LoadSnapshot(kv_usage=0.95, running=1, waiting=0),
        B: LoadSnapshot(kv_usage=0.5, running=1, waiting=4),
        C: LoadSnapshot(requests=3, prefill_tokens=1001, blocks=20),
        D: LoadSnapshot(requests=1, prefill_tokens=1000, blocks=50, kv_usage=0.9, waiting=3),  # at, not over
    }
    matches = {A: match(gpu=10), B: match(gpu=10), C: match(gpu=10)}
    d = KvPolicy(config).select([A, B, C, D], matches, 10, loads)
    assert d.chosen == D and d.ranked == [D]
    skipped = {s.key: s.skipped for s in d.scores}
    assert skipped[A] == "busy: kv_usage 0.950 > max_kv_usage 0.9"
    assert skipped[B] == "busy: waiting 4 > max_waiting 3"
    assert skipped[C] == "busy: prefill_tokens 1001 > max_prefill_tokens 1000"
    assert skipped[D] is None
    assert [s.key for s in d.scores] == [D, A, B, C]  # eligible first, then skipped


def test_unknown_engine_load_is_not_busy():
    config = RouterConfig(busy=BusyThresholds(max_kv_usage=0.1, max_waiting=0))
    d = KvPolicy(config).select([A], {}, 2, {A: LoadSnapshot(requests=5, blocks=9)})
    assert d.chosen == A


def test_all_busy_raises_with_a_reason():
    config = RouterConfig(busy=BusyThresholds(max_kv_usage=0.5))
    loads = {A: LoadSnapshot(kv_usage=0.6), B: LoadSnapshot(kv_usage=0.7)}
    with pytest.raises(NoWorkerAvailable) as err:
        KvPolicy(config).select([A, B], {}, 3, loads, exclude=())
    assert "all 2 workers busy or excluded" in err.value.reason
    assert "a: busy: kv_usage 0.600 > max_kv_usage 0.5" in err.value.reason
    assert len(err.value.scores) == 2
    out = json.loads(json.dumps(err.value.explain()))
    assert out["chosen"] is None and out["candidates"][0]["costs_ms"]["ttft"] > 0


def test_exclusion_by_key_or_worker_id_and_nothing_left():
    d = KvPolicy(example()).select(KEYS, MATCHES, 10, LOADS, exclude=[A])
    assert d.chosen == C and d.ranked == [C, B] and d.score_of(A).skipped == "excluded"
    a1 = WorkerKey("a", 1)
    d = KvPolicy().select([A, a1, B], {}, 1, {}, exclude={"a"})
    assert d.ranked == [B]
    with pytest.raises(NoWorkerAvailable, match="all 3 workers excluded"):
        KvPolicy().select(KEYS, {}, 1, {}, exclude=KEYS)
    with pytest.raises(NoWorkerAvailable, match="no workers registered"):
        KvPolicy().select([], {}, 1, {})


def test_matches_of_unknown_workers_are_ignored():
    d = KvPolicy().select([B], {A: match(gpu=10)}, 10, {})
    assert d.chosen == B and [s.key for s in d.scores] == [B]


def test_round_robin_alternates_and_skips_excluded_and_busy():
    policy = RoundRobinPolicy(RouterConfig(mode="round-robin", busy=BusyThresholds(max_waiting=0)))
    assert [policy.select(KEYS, MATCHES, 10, {}).chosen for _ in range(4)] == [A, B, C, A]
    assert policy.select(KEYS, {}, 1, {}, exclude=[B]).chosen == C
    busy = {A: LoadSnapshot(waiting=1, running=1, kv_usage=0.1)}
    d = policy.select(KEYS, {}, 1, busy)
    assert d.chosen == B and d.ranked == [B, C] and d.mode == "round-robin"
    # A worker joining mid-rotation takes its turn in key order; none is skipped or repeated.
    assert [policy.select([A, B, C, D], {}, 1, {}).chosen for _ in range(4)] == [C, D, A, B]
    assert policy.select([A, C], {}, 1, {}).chosen == C


def test_round_robin_still_reports_overlap_and_costs():
    d = RoundRobinPolicy(example(mode="round-robin")).select(KEYS, MATCHES, 10, LOADS)
    assert d.chosen == A and d.chosen_score.total == pytest.approx(0.0245) and d.score_of(C).cached_blocks == 10


def test_random_is_seeded_uniform_and_respects_exclusion():
    config = RouterConfig(mode="random", seed=99)
    picks = [RandomPolicy(config).select(KEYS, {}, 1, {}).chosen for _ in range(3)]
    assert len(set(picks)) == 1  # a fresh policy with the same seed repeats itself
    policy = RandomPolicy(config)
    counts = Counter(policy.select(KEYS, {}, 1, {}).chosen for _ in range(3000))
    assert all(abs(counts[k] / 3000 - 1 / 3) < 0.04 for k in KEYS)
    for _ in range(100):
        d = policy.select(KEYS, {}, 1, {}, exclude=[A])
        assert d.chosen != A and sorted(d.ranked) == [B, C]


def test_make_policy_follows_the_mode():
    assert isinstance(make_policy(RouterConfig()), KvPolicy)
    assert isinstance(make_policy(RouterConfig(mode="round-robin")), RoundRobinPolicy)
    assert isinstance(make_policy(RouterConfig(mode="random")), RandomPolicy)


def test_explain_is_json_and_carries_every_term():
    config = example(temperature=0.005, seed=1)
    d = KvPolicy(config).select(KEYS, MATCHES, 10, LOADS, exclude=[B])
    out = json.loads(json.dumps(d.explain()))
    assert out["mode"] == "kv" and out["num_blocks"] == 10 and out["block_size"] == 64
    assert out["chosen"] == str(d.chosen) and out["ranked"] == [str(k) for k in d.ranked]
    assert out["config"]["speed"]["cpu_block_ms"] == 0.5 and out["config"]["temperature"] == 0.005
    assert out["config"]["speed"]["prefill_tokens_per_s"] == 32_000 and out["config"]["predict_sent"] is True
    assert set(out["timings_us"]) == {"hash", "match", "score", "total"}
    speed = out["speed"]
    assert (speed["decode_slowdown"], speed["cpu_block_ms"], speed["disk_block_ms"]) == (0.5, 0.5, 1.0)
    assert (speed["samples"], speed["rejected"]) == (0, 0)
    assert speed["workers"]["a"] == {
        "prefill_tokens_per_s": pytest.approx(32_000),
        "overhead_ms": 10.0,
        "samples": 0,
        "hold_s": None,
    }
    by_worker = {c["worker"]: c for c in out["candidates"]}
    a = by_worker["a"]
    assert a["overlap"] == {"blocks": 6, "gpu": 2, "cpu": 3, "disk": 1, "predicted": False}
    assert a["costs_ms"] == pytest.approx(
        {
            "overhead": 10.0,
            "tier_load": 2.5,
            "queued_prefill": 0.0,
            "prefill": 8.0,
            "memory_wait": 0.0,
            "ttft": 20.5,
            "added_work": 4.0,
            "total": 24.5,
        }
    )
    assert (a["cached_blocks"], a["uncached_tokens"], a["queued_prefill_tokens"], a["kv_usage"]) == (6, 256, 0, 0.0)
    assert a["prefill_tokens_per_s"] == pytest.approx(32_000)
    assert (a["worker_id"], a["dp_rank"]) == ("a", 0)
    assert 0 < a["probability"] < 1 and a["skipped"] is None
    c = by_worker["c"]
    assert c["load"]["prefill_tokens"] == 384 and c["queued_prefill_tokens"] == 384 and c["kv_usage"] == 0.5
    assert c["prefill_tokens_per_s"] == pytest.approx(32_000 / 1.25)
    assert c["costs_ms"]["queued_prefill"] == pytest.approx(15.0)
    assert by_worker["b"]["skipped"] == "excluded" and by_worker["b"]["probability"] is None
    assert a["probability"] + c["probability"] == pytest.approx(1.0)
    # 0.56 ms apart at T = 5 ms: P(a) = 1 / (1 + e^(-0.55859375 / 5)).
    assert a["probability"] == pytest.approx(1 / (1 + math.exp(-0.55859375 / 5)))


def test_a_worker_without_answers_is_predicted_with_the_fleets_rates_not_its_guess():
    speed = SpeedModel(EXAMPLE)
    for worker in ("a", "c"):
        speed.speed(worker).seconds_per_token = 1 / 64_000
        speed.speed(worker).overhead = 0.004
        speed.speed(worker).samples = 5
        speed.speed(worker).updated = speed.clock()
    speed.speed("b").seconds_per_token = 1 / 1_000  # one odd early answer: not trusted yet
    speed.speed("b").samples = 1
    scores = {s.key: s for s in KvPolicy(example(), speed).select(KEYS, {}, 10, {}).scores}
    # Nothing cached anywhere, nothing queued: every worker is predicted alike.
    assert scores[A].total == pytest.approx(scores[B].total) == pytest.approx(scores[C].total)
    assert scores[B].overhead == pytest.approx(0.004)


def test_a_worker_that_stopped_answering_fades_into_the_fleets_rates():
    now = [1000.0]
    speed = SpeedModel(EXAMPLE, clock=lambda: now[0])
    for worker, rate in (("a", 64_000), ("b", 8_000), ("c", 64_000)):
        s = speed.speed(worker)
        s.seconds_per_token, s.overhead, s.samples, s.updated = 1 / rate, 0.004, 5, now[0]
    assert speed.predicting("b").tokens_per_second == pytest.approx(8_000)
    now[0] += EXAMPLE.forget_after_s  # one half-life without an answer from b
    fleet = (2 / 64_000 + 1 / 8_000) / 3
    assert speed.predicting("b").seconds_per_token == pytest.approx((1 / 8_000 + fleet) / 2)
    now[0] += 20 * EXAMPLE.forget_after_s  # long starved: tried again at the fleet's rate
    assert speed.predicting("b").seconds_per_token == pytest.approx(fleet, rel=1e-3)


def test_by_default_a_long_new_prefill_avoids_a_worker_decoding_a_pile_of_requests():
    # The burst case: a holds a new document (64 blocks) and decodes 40 requests about it; b has a little
    # prefill queued. A 4k-token prompt nobody holds goes to b (at weight 0 it went to a, 0.12 s sooner
    # to its first token, stalling 40 streams for its 0.13 s of prefill); a question about the document,
    # a 64-token suffix, still goes to a.
    config = RouterConfig(speed=EXAMPLE)
    loads = {A: LoadSnapshot(requests=40, blocks=2_000), B: LoadSnapshot(requests=1, prefill_tokens=1_024, blocks=16)}
    cold = KvPolicy(config).select([A, B], {}, 64, loads)
    assert cold.chosen == B
    assert cold.score_of(A).added_work == pytest.approx((0.5 + 0.05 * 40) * cold.score_of(A).prefill)
    assert KvPolicy(RouterConfig(speed=EXAMPLE, running_work_weight=0.0)).select([A, B], {}, 64, loads).chosen == A
    follower = KvPolicy(config).select([A, B], {A: match(gpu=64)}, 65, loads)
    assert follower.chosen == A


def test_requests_in_flight_add_to_the_added_work():
    # Every request in flight on a worker waits for a new prefill there (the engine runs it in the
    # steps that decode them): running_work_weight x that prefill per request joins the added work.
    config = example(running_work_weight=0.25)
    loads = {A: LoadSnapshot(requests=1, blocks=125)}  # a decodes one request: nothing queued
    decision = KvPolicy(config).select([A, B], {}, 10, loads)
    a, b = decision.score_of(A), decision.score_of(B)
    assert a.added_work == pytest.approx((0.5 + 0.25) * a.prefill) and b.added_work == pytest.approx(0.5 * b.prefill)
    assert decision.chosen == B
    # Even when a's learned speed is 10% better, b, idle, is chosen; without the term the busier worker is.
    speed = SpeedModel(EXAMPLE)
    speed.speed("a").seconds_per_token = 1 / 35_200
    for worker in "ab":
        speed.speed(worker).samples = 3  # predicted by their own rates
        speed.speed(worker).updated = speed.clock()
    assert KvPolicy(config, speed).select([A, B], {}, 10, loads).chosen == B
    assert KvPolicy(example(), speed).select([A, B], {}, 10, loads).chosen == A
    # A cache hit still outweighs it: a holding 8 of the 10 blocks wins with 3 requests in flight.
    loads = {A: LoadSnapshot(requests=3, blocks=400)}
    assert KvPolicy(config).select([A, B], {A: match(gpu=8)}, 10, loads).chosen == A


# -- the memory term: a request whose blocks do not fit waits for room --------------------------


def test_a_request_that_does_not_fit_waits_for_room_and_goes_where_it_fits():
    # A 40-block prompt. a holds all 40 on GPU but 90 of its 100-block pool are held by requests
    # in flight: 90 + 40 - 100 = 30 blocks must free first, a third of what is held, at the seeded
    # hold time of 2 s: 0.667 s of waiting. b holds nothing and has room: it computes 2,560 tokens
    # (80 ms) and wins, though a's prefill is free.
    config = example(prediction_capacity_blocks=100)
    loads = {A: LoadSnapshot(requests=3, blocks=90)}
    decision = KvPolicy(config).select([A, B], {A: match(gpu=40)}, 40, loads)
    a, b = decision.score_of(A), decision.score_of(B)
    assert a.memory_wait == pytest.approx(2.0 * 30 / 90) and b.memory_wait == 0.0
    assert a.ttft == pytest.approx(a.overhead + a.prefill + a.memory_wait)
    assert decision.chosen == B
    explained = {c["worker"]: c for c in decision.explain()["candidates"]}
    assert explained["a"]["costs_ms"]["memory_wait"] == pytest.approx(2000 * 30 / 90)
    # Room for it (a 60-block pool use): no wait, and the cached prefix wins again.
    roomy = {A: LoadSnapshot(requests=3, blocks=60)}
    assert KvPolicy(config).select([A, B], {A: match(gpu=40)}, 40, roomy).chosen == A
    # The term off: the full worker's cached prefix wins.
    off = example(prediction_capacity_blocks=100, memory_wait=False)
    assert KvPolicy(off).select([A, B], {A: match(gpu=40)}, 40, loads).chosen == A


def test_memory_wait_reads_the_engines_pool_and_usage_and_the_learned_hold_time():
    # The engine says its pool is 6,400 tokens (100 blocks of 64) and 80 % of it is in use,
    # more than the 10 blocks this router has in flight there; config's capacity is not used.
    config = example(prediction_capacity_blocks=16_384)
    loads = {A: LoadSnapshot(requests=1, blocks=10, kv_usage=0.8, capacity_tokens=6_400)}
    speed = SpeedModel(config.speed)
    for _ in range(3):
        speed.observe_hold("a", 0.5)  # a's requests hold their blocks 0.5 s
    a = KvPolicy(config, speed).select([A, B], {A: match(gpu=40)}, 40, loads).score_of(A)
    # held 80, need 40: 20 must free, a quarter of 80, at 0.5 s.
    assert a.memory_wait == pytest.approx(0.5 * 20 / 80)
    assert a.load.capacity_tokens == 6_400
    # A wait never exceeds one hold time, however far over the pool.
    huge = KvPolicy(config, speed).select([A], {}, 400, loads).score_of(A)
    assert huge.memory_wait == pytest.approx(0.5)
    # An idle worker has nothing to wait for, even for a prompt larger than its pool.
    idle = {A: LoadSnapshot(capacity_tokens=6_400)}
    assert KvPolicy(config, speed).select([A], {}, 400, idle).score_of(A).memory_wait == 0.0


def test_a_prefix_predicted_from_a_request_in_flight_is_shared_not_needed_again():
    # 30 of a 40-block prompt were just predicted on a, which is prefilling (a request in flight
    # computes them): the engine shares them, so only 10 more must fit. 85 held + 10 - 100 < 0: no wait.
    config = example(prediction_capacity_blocks=100)
    predicted = Match(depth=30, per_tier=[30, 0, 0], predicted=True)
    loads = {A: LoadSnapshot(requests=1, blocks=85, prefill_tokens=1_000)}
    assert KvPolicy(config).select([A], {A: predicted}, 40, loads).score_of(A).memory_wait == 0.0
    # Predicted, but nothing is prefilling there: the request that computed it is done, and the
    # cached blocks need room again like any other.
    done = {A: LoadSnapshot(requests=1, blocks=85)}
    assert KvPolicy(config).select([A], {A: predicted}, 40, done).score_of(A).memory_wait > 0.0
    # The same 30 blocks known from events (an idle cached prefix): all 40 need room: 25 must free.
    confirmed = Match(depth=30, per_tier=[30, 0, 0])
    wait = KvPolicy(config).select([A], {A: confirmed}, 40, done).score_of(A).memory_wait
    assert wait == pytest.approx(2.0 * 25 / 85)


def test_memory_wait_is_until_the_longest_running_requests_free_enough():
    # a's pool: 100 blocks; in flight there: 30 blocks sent at t=9 (1 s ago), 30 at t=9.8 and 30 at
    # t=10 (just now). A 40-block prompt is 30 short: the oldest request's blocks suffice, and it is
    # expected to finish at 9 + 2 (the seeded hold time): a 1 s wait.
    config = example(prediction_capacity_blocks=100)
    speed = SpeedModel(config.speed, clock=lambda: 10.0)
    holds = ((9.0, 30), (9.8, 30), (10.0, 30))
    loads = {A: LoadSnapshot(requests=3, blocks=90, holds=holds)}
    a = KvPolicy(config, speed).select([A], {A: match(gpu=40)}, 40, loads).score_of(A)
    assert a.memory_wait == pytest.approx(1.0)
    # 31 short: the second one must finish too (at 11.8).
    a = KvPolicy(config, speed).select([A], {A: match(gpu=40)}, 41, loads).score_of(A)
    assert a.memory_wait == pytest.approx(1.8)
    # Requests past their expected finish are still running: at least a quarter of a hold away.
    late = SpeedModel(config.speed, clock=lambda: 20.0)
    assert KvPolicy(config, late).select([A], {}, 40, loads).score_of(A).memory_wait == pytest.approx(0.5)
    # The engine holds 90, more than the 30 this router tracks (other clients' requests). 30 short:
    # the tracked request frees enough. 40 short: more than it holds, so evenly over a hold time.
    busy = {A: LoadSnapshot(requests=1, blocks=30, kv_usage=0.9, holds=((9.0, 30),))}
    assert KvPolicy(config, speed).select([A], {}, 40, busy).score_of(A).memory_wait == pytest.approx(1.0)
    wait = KvPolicy(config, speed).select([A], {}, 50, busy).score_of(A).memory_wait
    assert wait == pytest.approx(2.0 * 40 / 90)


def test_load_snapshots_list_each_request_in_flight_by_send_time():
    from kvgate.router.load import LoadTracker, RemoteRequest

    load = LoadTracker(clock=lambda: 0.0)
    load.begin("r2", A, 640, 640, 10, now=5.0)
    load.begin("r1", A, 128, 128, 2, now=3.0)
    load.add_remote("gw-b", [RemoteRequest("x", A, 64, 1)], now=4.0)
    assert load.snapshot(A, now=6.0).hold_order() == ((3.0, 2), (4.0, 1), (5.0, 10))
    # Another replica's prefill-done update is the same request: it keeps its send time.
    load.add_remote("gw-b", [RemoteRequest("x", A, 0, 1)], now=7.0)
    load.prefill_done("r2", now=7.0)
    assert load.snapshot(A, now=7.0).hold_order() == ((3.0, 2), (4.0, 1), (5.0, 10))
    load.finish("r1")
    load.remove_remote("gw-b")
    assert load.snapshot(A, now=7.0).hold_order() == ((5.0, 10),)
    load.finish("r2")
    assert load.snapshot(A, now=7.0).hold_order() == ()


def test_blocks_freed_since_the_engines_report_do_not_count_as_held():
    # The engine last reported 80 % of a 100-block pool in use, but 40 of those blocks belonged to a
    # request of this router that has finished since: 40 held, room for a 40-block prompt.
    config = example(prediction_capacity_blocks=100)
    loads = {A: LoadSnapshot(kv_usage=0.8, freed_blocks=40)}
    assert KvPolicy(config).select([A], {}, 40, loads).score_of(A).memory_wait == 0.0
    stale = {A: LoadSnapshot(kv_usage=0.8)}
    assert KvPolicy(config).select([A], {}, 40, stale).score_of(A).memory_wait > 0.0
