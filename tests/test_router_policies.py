"""router.policies: the kv cost model term by term, tie-breaks, temperature, busy, round-robin, random."""

import json
import math
from collections import Counter

import pytest

from kvgate.indexer.index import Match
from kvgate.protocol.events import WorkerKey
from kvgate.router.config import BusyThresholds, CostWeights, RouterConfig
from kvgate.router.load import LoadSnapshot
from kvgate.router.policies import KvPolicy, NoWorkerAvailable, RandomPolicy, RoundRobinPolicy, make_policy

A, B, C, D = (WorkerKey(x) for x in "abcd")
KEYS = [A, B, C]


def match(gpu=0, cpu=0, disk=0):
    return Match(depth=gpu + cpu + disk, per_tier=[gpu, cpu, disk])


# Hand-built case (block_size 64, n = 10 prompt blocks, EXAMPLE weights: compute 1, CPU 0.25, DISK 0.5;
# pinned here so the worked example stays exact when the derived defaults change):
#   a: prefix of 6 = 2 GPU + 3 CPU + 1 DISK, idle
#      prefill = 2*0 + 3*0.25 + 1*0.5 + (10-6)*1 = 5.25 ; decode = 0 + 10 ; total 15.25
#   b: nothing cached, idle          -> prefill 10, decode 10, total 20
#   c: all 10 on GPU, 128 queued prefill tokens (2 blocks), 5 active blocks
#      prefill = 0 + 0 + 2 = 2 ; decode = 5 + 10 = 15 ; total 17
MATCHES = {A: match(gpu=2, cpu=3, disk=1), C: match(gpu=10)}
LOADS = {C: LoadSnapshot(requests=2, prefill_tokens=128, blocks=5)}
EXAMPLE = CostWeights(cpu_load_fraction=0.25, disk_load_fraction=0.5)


def example(**kwargs) -> RouterConfig:
    return RouterConfig(weights=EXAMPLE, **kwargs)


def test_cost_terms_gpu_cpu_disk_absent_queued_and_decode():
    decision = KvPolicy(example()).select(KEYS, MATCHES, 10, LOADS)
    assert decision.chosen == A and decision.ranked == [A, C, B] and decision.mode == "kv"
    a, c, b = decision.scores
    assert (a.depth, a.gpu_blocks, a.cpu_blocks, a.disk_blocks) == (6, 2, 3, 1)
    assert (a.cached_blocks, a.uncached_blocks) == (6, 4)
    assert (a.tier_load_cost, a.compute_cost, a.queued_prefill_cost, a.prefill_cost) == (1.25, 4.0, 0.0, 5.25)
    assert (a.decode_blocks, a.decode_cost, a.total) == (10, 10.0, 15.25)
    assert (b.depth, b.uncached_blocks, b.prefill_cost, b.decode_cost, b.total) == (0, 10, 10.0, 10.0, 20.0)
    assert (c.tier_load_cost, c.compute_cost, c.queued_prefill_tokens, c.queued_prefill_cost) == (0.0, 0.0, 128, 2.0)
    assert (c.prefill_cost, c.decode_blocks, c.total) == (2.0, 15, 17.0)


def test_weights_scale_the_terms():
    config = RouterConfig(
        weights=CostWeights(
            prefill_weight=2.0, decode_weight=0.5, compute_cost=2.0, cpu_load_fraction=0.5, disk_load_fraction=1.0
        )
    )
    decision = KvPolicy(config).select(KEYS, MATCHES, 10, LOADS)
    a = decision.score_of(A)
    # tier = 3*0.5*2 + 1*1.0*2 = 5 ; compute = 4*2 = 8 ; total = 2*13 + 0.5*10 = 31
    assert (a.tier_load_cost, a.compute_cost, a.prefill_cost, a.total) == (5.0, 8.0, 13.0, 31.0)
    c = decision.score_of(C)
    # queued 128 tokens = 2 blocks * compute 2 = 4 ; total = 2*4 + 0.5*15 = 15.5
    assert (c.queued_prefill_cost, c.total) == (4.0, 15.5)
    assert decision.chosen == C


def test_gpu_only_counts_lower_tier_blocks_as_absent():
    decision = KvPolicy(RouterConfig(gpu_only=True)).select(KEYS, MATCHES, 10, LOADS)
    a = decision.score_of(A)
    assert (a.depth, a.cached_blocks, a.uncached_blocks) == (6, 2, 8)
    assert (a.tier_load_cost, a.prefill_cost, a.total) == (0.0, 8.0, 18.0)
    assert decision.chosen == C  # 17 < 18: without the tiers a no longer looks best


def test_tier_aware_prefers_cpu_hit_over_recompute_but_gpu_over_cpu():
    keys = [A, B, C]
    matches = {A: match(cpu=8), B: match(gpu=8), C: match(disk=8)}
    decision = KvPolicy(example()).select(keys, matches, 8, {})
    assert decision.ranked == [B, A, C]
    assert [s.prefill_cost for s in decision.scores] == [0.0, 2.0, 4.0]


def test_short_prompt_with_no_full_block_routes_on_load_alone():
    loads = {A: LoadSnapshot(requests=1, blocks=3), B: LoadSnapshot(requests=1, prefill_tokens=64, blocks=1)}
    decision = KvPolicy().select(KEYS, {}, 0, loads)
    assert decision.ranked == [C, B, A]  # c idle (0) < b (1 queued block + 1 block = 2) < a (3)


def test_ties_go_to_least_loaded_then_to_the_smallest_key():
    # a holds 2 GPU blocks but has 2 active blocks: total 8 + 12 = 20 = b's 10 + 10, with b idle.
    decision = KvPolicy().select([A, B], {A: match(gpu=2)}, 10, {A: LoadSnapshot(requests=1, blocks=2)})
    assert decision.score_of(A).total == decision.score_of(B).total == 20.0
    assert decision.ranked == [B, A]
    # Identical candidates never chosen before: the key decides, whatever order they arrive in.
    for order in ([D, C, B, A], [B, D, A, C]):
        assert KvPolicy().select(order, {}, 4, {}).ranked == [A, B, C, D]


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
    config = RouterConfig(weights=CostWeights(cpu_load_fraction=0.1, disk_load_fraction=0.7))
    # b: 1 CPU + 6 DISK, c: 3 CPU -- exactly equal costs, but float sums differ in the last bit.
    decision = KvPolicy(config).select([B, C], {B: match(cpu=1, disk=6), C: match(cpu=3)}, 10, {})
    tb, tc = decision.score_of(B).total, decision.score_of(C).total
    assert tb != tc and tb == pytest.approx(tc)
    assert decision.chosen == B
    decision = KvPolicy(config).select([C, B], {C: match(cpu=1, disk=6), B: match(cpu=3)}, 10, {})
    assert decision.chosen == B


def test_temperature_samples_the_softmax_of_cost_differences():
    config = RouterConfig(temperature=1.0, seed=1234)
    policy = KvPolicy(config)
    # a is 1 block cheaper than b: P(a) = 1 / (1 + e^-1) = 0.7311, and c 3 blocks dearer.
    matches = {A: match(gpu=1)}
    loads = {C: LoadSnapshot(requests=1, blocks=2)}
    first = policy.select([A, B, C], matches, 4, loads)
    expected = {A: 1.0, B: math.exp(-1.0), C: math.exp(-3.0)}
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
    d = KvPolicy(RouterConfig(temperature=0.0)).select(KEYS, MATCHES, 10, LOADS)
    assert d.chosen == A and all(s.probability is None for s in d.scores)


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
    assert json.loads(json.dumps(err.value.explain()))["chosen"] is None


def test_exclusion_by_key_or_worker_id_and_nothing_left():
    d = KvPolicy().select(KEYS, MATCHES, 10, LOADS, exclude=[A])
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
    assert d.chosen == A and d.chosen_score.total == 15.25 and d.score_of(C).cached_blocks == 10


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
    config = example(temperature=0.5, seed=1)
    d = KvPolicy(config).select(KEYS, MATCHES, 10, LOADS, exclude=[B])
    out = json.loads(json.dumps(d.explain()))
    assert out["mode"] == "kv" and out["num_blocks"] == 10 and out["block_size"] == 64
    assert out["chosen"] == str(d.chosen) and out["ranked"] == [str(k) for k in d.ranked]
    assert out["config"]["weights"]["cpu_load_fraction"] == 0.25 and out["config"]["temperature"] == 0.5
    assert set(out["timings_us"]) == {"hash", "match", "score", "total"}
    by_worker = {c["worker"]: c for c in out["candidates"]}
    a = by_worker["a"]
    assert a["overlap"] == {"blocks": 6, "gpu": 2, "cpu": 3, "disk": 1}
    assert a["costs"] == {
        "tier_load": 1.25,
        "compute": 4.0,
        "queued_prefill": 0.0,
        "prefill": 5.25,
        "decode": 10.0,
        "total": 15.25,
    }
    assert (a["cached_blocks"], a["uncached_blocks"], a["decode_blocks"]) == (6, 4, 10)
    assert 0 < a["probability"] < 1 and a["skipped"] is None
    c = by_worker["c"]
    assert c["load"]["prefill_tokens"] == 128 and c["queued_prefill_tokens"] == 128
    assert by_worker["b"]["skipped"] == "excluded" and by_worker["b"]["probability"] is None
    assert a["probability"] + c["probability"] == pytest.approx(1.0)
