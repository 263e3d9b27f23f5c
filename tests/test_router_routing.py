"""router.routing: the Router facade against the real KvIndexer fed with real events (no mocks).

Predictions of sent blocks and speed learning have their own files (test_predictions.py,
test_speed.py)."""

import json
import random

import pytest

from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.protocol.events import BlockRemoved, BlockStored, EventBatch, RouterStored, Tier, WorkerKey
from kvgate.protocol.hashing import sequence_hashes
from kvgate.router.config import BusyThresholds, RouterConfig, SpeedConfig
from kvgate.router.load import IDLE, LoadSnapshot, LoadTracker
from kvgate.router.policies import NoWorkerAvailable
from kvgate.router.registry import StaticDiscovery
from kvgate.router.routing import Router

BS = 64
A, B, C = WorkerKey("a"), WorkerKey("b"), WorkerKey("c")


class Engine:
    """Publishes what a vLLM worker would: numbered batches of engine-hash block events."""

    def __init__(self, indexer: KvIndexer, worker_id: str, dp_rank: int | None = None):
        self.indexer, self.worker_id, self.dp_rank = indexer, worker_id, dp_rank
        self.seq = 0
        self.engine_hash: dict[int, int] = {}  # router hash -> this engine's opaque hash
        self.rng = random.Random(worker_id)

    def publish(self, *events):
        self.indexer.apply_engine_batch(self.worker_id, self.seq, EventBatch(0.0, list(events), self.dp_rank))
        self.seq += 1

    def store(self, tokens, tier=Tier.GPU):
        """The engine cached every full block of ``tokens`` (as one chained store)."""
        n = len(tokens) // BS
        hashes = [self.engine_hash.setdefault(h, self.rng.getrandbits(63)) for h in sequence_hashes(tokens, BS)]
        self.publish(BlockStored(hashes, None, list(tokens[: n * BS]), BS, medium=tier))
        return hashes

    def offload(self, hashes, to=Tier.CPU):
        """Token-less tier update (the CPU offloading connector), then GPU eviction."""
        self.publish(BlockStored(hashes, None, [], BS, medium=to), BlockRemoved(hashes, Tier.GPU))


def fleet(*ids, config=None, clock=lambda: 0.0, **kw):
    """A router over static workers ``ids``; router, load tracker and index share ``clock``."""
    config = config or RouterConfig(**kw)
    indexer = KvIndexer(block_size=config.block_size, clock=clock)
    registry = StaticDiscovery([{"id": i, "url": f"http://127.0.0.1:{9000 + n}"} for n, i in enumerate(ids)]).registry()
    router = Router(config, indexer, registry, LoadTracker.from_config(config, clock=clock), clock=clock)
    return router, indexer


def tokens(n, start=0):
    return [(start + i) % 50_000 for i in range(n)]


def test_routes_to_the_worker_holding_the_longest_prefix():
    router, indexer = fleet("a", "b", "c")
    system = tokens(640)  # 10 blocks
    Engine(indexer, "a").store(system[:256])  # 4 blocks
    Engine(indexer, "b").store(system)  # all 10
    prompt = system + tokens(200, 7_000)  # 13 full blocks (840 tokens)
    decision = router.route(prompt)
    assert decision.chosen == B and decision.num_blocks == 13
    assert decision.ranked == [B, A, C]
    assert [decision.score_of(k).depth for k in (A, B, C)] == [4, 10, 0]
    assert decision.chosen_score.uncached_tokens == 840 - 640
    t = decision.timings
    assert t.hash > 0 and t.match > 0 and t.score > 0 and t.total == t.hash + t.match + t.score
    assert json.loads(json.dumps(decision.explain()))["candidates"][0]["overlap"]["gpu"] == 10


def test_route_hashes_gives_the_same_decision():
    router, indexer = fleet("a", "b")
    prompt = tokens(500)
    Engine(indexer, "b").store(prompt)
    assert router.route_hashes(sequence_hashes(prompt, BS)).ranked == router.route(prompt).ranked == [B, A]


def test_lora_prompts_do_not_match_base_model_blocks():
    router, indexer = fleet("a", "b")
    prompt = tokens(640)
    Engine(indexer, "b").store(prompt)
    assert router.route(prompt).chosen == B
    decision = router.route(prompt, lora_name="adapter-a")
    assert decision.chosen == A and decision.score_of(B).depth == 0


def test_tier_aware_follows_the_cpu_copy_gpu_only_does_not():
    prompt = tokens(640)  # 10 blocks
    results = {}
    for gpu_only in (False, True):
        router, indexer = fleet("a", "b", gpu_only=gpu_only)
        a = Engine(indexer, "a")
        hashes = a.store(prompt)
        a.offload(hashes)  # a's copy now only in CPU memory
        Engine(indexer, "b").store(prompt[:192])  # b holds 3 blocks on GPU
        decision = router.route(prompt)
        sa = decision.score_of(A)
        assert (sa.depth, sa.gpu_blocks, sa.cpu_blocks) == (10, 0, 10)
        results[gpu_only] = (decision.chosen, sa.tier_load + sa.prefill, decision.score_of(B).prefill)
    seeds = SpeedConfig()
    block_s = BS / seeds.prefill_tokens_per_s  # computing one block at the seed rate
    cpu_s = seeds.cpu_block_ms / 1e3
    assert cpu_s * 10 < 7 * block_s, "the scenario needs 10 CPU loads to beat 7 recomputes"
    # a loads 10 blocks and computes the last token; b computes 7 blocks.
    assert results[False] == (A, pytest.approx(10 * cpu_s + block_s / BS), pytest.approx(7 * block_s))
    assert results[True] == (B, pytest.approx(10 * block_s), pytest.approx(7 * block_s))  # without tiers a looks empty


def test_router_native_events_and_dp_ranks():
    config = RouterConfig()
    indexer = KvIndexer(block_size=BS)
    registry = StaticDiscovery([{"id": "a", "url": "http://127.0.0.1:9001", "dp_size": 2}]).registry()
    router = Router(config, indexer, registry)
    prompt = tokens(300)
    indexer.apply_router_events(WorkerKey("a", 1), [RouterStored(sequence_hashes(prompt, BS), Tier.DISK)])
    decision = router.route(prompt)
    assert decision.chosen == WorkerKey("a", 1) and decision.chosen_score.disk_blocks == 4
    assert decision.explain()["chosen"] == "a#1"


def test_lifecycle_load_moves_the_next_decision():
    router, indexer = fleet("a", "b", predict_sent=False)  # load alone (predictions: test_predictions.py)
    prompt = tokens(640)
    d1 = router.route(prompt)
    assert d1.chosen == A  # idle and empty: the key decides
    flight = router.begin("r1", d1, prompt_tokens=650)
    assert (flight.request_id, flight.key, flight.prompt_tokens, flight.decision) == ("r1", A, 650, d1)
    assert router.load.snapshot(A) == LoadSnapshot(requests=1, prefill_tokens=650, blocks=11)
    d2 = router.route(prompt)
    assert d2.chosen == B
    a2 = d2.score_of(A)
    # Its 11 KV blocks stand for the engine's KV usage until the engine reports one.
    assert a2.queued_prefill_tokens == 650 and a2.kv_usage == 11 / router.config.prediction_capacity_blocks
    assert a2.queued_prefill == pytest.approx(650 * a2.seconds_per_token)

    assert flight.first_token() and not flight.first_token()
    assert router.load.snapshot(A) == LoadSnapshot(requests=1, prefill_tokens=0, blocks=11)
    assert flight.finish() and not flight.finish()
    assert router.load.snapshot(A) is IDLE and flight.finished
    assert not flight.first_token() and router.load.snapshot(A) is IDLE
    # Idle and empty again: equal totals, and the tie goes to the worker sent nothing yet.
    d3 = router.route(prompt)
    assert d3.score_of(A).total == d3.score_of(B).total and d3.chosen == B


def test_begin_counts_only_uncached_tokens_as_queued_prefill():
    router, indexer = fleet("a", "b")
    prompt = tokens(700)
    Engine(indexer, "b").store(prompt[:384])  # 6 of 10 full blocks
    decision = router.route(prompt)
    flight = router.begin("r1", decision, len(prompt))
    assert router.load.snapshot(B) == LoadSnapshot(requests=1, prefill_tokens=700 - 384, blocks=11)
    assert flight.cached_tokens == 384
    # A retry on the next-best worker moves the request there with that worker's cache.
    flight.move_to(decision.ranked[1])
    assert flight.key == A and flight.cached_tokens == 0
    assert router.load.snapshot(B) is IDLE
    assert router.load.snapshot(A) == LoadSnapshot(requests=1, prefill_tokens=700, blocks=11)
    flight.finish()
    with pytest.raises(ValueError, match="already finished"):
        flight.move_to(B)
    assert len(router.load) == 0
    with pytest.raises(ValueError, match="prompt_tokens must be a non-negative integer"):
        router.begin("r2", decision, -1)
    assert len(router.load) == 0


class Recorder:
    """A RequestListener that writes down what it heard and the load it saw at that moment."""

    def __init__(self, router: Router, log: list) -> None:
        self.router, self.log = router, log

    def _seen(self, event, flight):
        entry = self.router.load.get(flight.request_id)
        self.log.append(
            (event, flight.request_id, flight.key, None if entry is None else (entry.key, entry.prefill_tokens))
        )

    def on_begin(self, flight):
        self._seen("begin", flight)

    def on_first_token(self, flight):
        self._seen("first_token", flight)

    def on_finish(self, flight):
        self._seen("finish", flight)
        self.log.append(("outcome", flight.outcome))


class Broken:
    def on_begin(self, flight):
        raise RuntimeError("a listener bug")

    on_first_token = on_finish = on_begin


def test_listeners_hear_each_step_after_the_load_changed():
    router, _ = fleet("a", "b")
    heard: list = []
    router.subscribe(Broken())  # must not keep the others from hearing, nor fail the request
    unsubscribe = router.subscribe(Recorder(router, heard))
    flight = router.begin("r1", router.route(tokens(128)), 128)
    flight.move_to(B)  # a retry: the request begins again on the next worker
    flight.first_token()
    flight.first_token()
    flight.finish("done")
    flight.finish("again")
    assert heard[:-1] == [
        ("begin", "r1", A, (A, 128)),
        ("begin", "r1", B, (B, 128)),
        ("first_token", "r1", B, (B, 0)),
        ("finish", "r1", B, None),
    ]
    assert heard[-1] == ("outcome", "done") and flight.outcome == "done"

    unsubscribe()
    unsubscribe()  # twice is harmless
    router.begin("r2", router.route(tokens(128)), 128).finish()
    assert len(heard) == 5 and len(router.load) == 0


def test_removed_worker_loses_index_and_load_state():
    router, indexer = fleet("a", "b")
    prompt = tokens(640)
    Engine(indexer, "a").store(prompt)
    decision = router.route(prompt)
    router.begin("r1", decision, len(prompt))
    router.registry.remove("a")
    assert indexer.find_matches(sequence_hashes(prompt, BS)) == {}
    assert router.load.snapshot(A) is IDLE and len(router.load) == 0
    assert router.route(prompt).ranked == [B]
    router.registry.remove("b")
    with pytest.raises(NoWorkerAvailable, match="no workers registered"):
        router.route(prompt)


def test_exclude_and_busy_pass_through():
    config = RouterConfig(busy=BusyThresholds(max_kv_usage=0.9))
    router, indexer = fleet("a", "b", "c", config=config)
    prompt = tokens(640)
    Engine(indexer, "a").store(prompt)
    assert router.route(prompt, exclude=[A]).chosen == B
    router.load.update_engine(B, running=10, waiting=0, kv_usage=0.95, now=0.0)
    decision = router.route(prompt, exclude={"a"})
    assert decision.chosen == C and decision.score_of(B).skipped.startswith("busy: kv_usage")
    with pytest.raises(NoWorkerAvailable) as err:
        router.route(prompt, exclude=[A, C])
    assert "b: busy: kv_usage 0.950" in err.value.reason


def test_expired_requests_stop_counting():
    now = [0.0]
    # The prompt's prediction on a (20 s) expires before the lost request (30 s).
    router, _ = fleet("a", "b", clock=lambda: now[0], active_request_ttl=30.0, prediction_ttl=20.0)
    router.begin("lost", router.route(tokens(128)), 128)  # its finish never comes
    before = router.route(tokens(128))
    a = before.score_of(A)
    assert (a.queued_prefill_tokens, a.depth) == (128, 2)  # its load counts, and its prompt is predicted held
    assert a.total != before.score_of(B).total
    now[0] = 31.0
    after = router.route(tokens(128))
    assert after.score_of(A).total == after.score_of(B).total and len(router.load) == 0
    assert after.score_of(A).depth == 0


def test_round_robin_router_and_block_size_mismatch():
    router, _ = fleet("a", "b", mode="round-robin")
    assert [router.route(tokens(10)).chosen for _ in range(3)] == [A, B, A]
    with pytest.raises(ValueError, match="router block_size 32 != indexer block_size 64"):
        Router(RouterConfig(block_size=32), KvIndexer(block_size=64), router.registry)


def test_close_stops_listening_to_the_registry():
    router, indexer = fleet("a", "b")
    Engine(indexer, "a").store(tokens(128))
    router.close()
    router.registry.remove("a")
    assert WorkerKey("a") in indexer.find_matches(sequence_hashes(tokens(128), BS))


# -- heads: a long prompt routed on its first blocks alone ------------------------------------------------


def test_a_head_no_worker_holds_whole_decides_the_route_with_every_workers_match():
    router, indexer = fleet("a", "b", "c")
    system = tokens(640)  # 10 blocks
    Engine(indexer, "a").store(system[:256])  # 4 blocks
    Engine(indexer, "b").store(system[:448])  # 7 blocks
    head = system + tokens(40, 9_000)  # the head: 10 full blocks; the whole prompt ~1.5k tokens
    decision = router.route_head(head, 1_500)
    assert decision is not None and decision.chosen == B and decision.num_blocks == 10
    assert [decision.score_of(k).depth for k in (A, B, C)] == [4, 7, 0]
    # The rest of the prompt counts as uncached on every worker.
    assert decision.chosen_score.uncached_tokens == 1_500 - 7 * BS
    assert decision.score_of(C).uncached_tokens == 1_500
    # The blocks predicted for the chosen worker are the head's, all that is known.
    assert decision.seq_hashes == sequence_hashes(head, BS)


def test_a_head_some_worker_holds_whole_does_not_decide():
    router, indexer = fleet("a", "b")
    head = tokens(640)
    Engine(indexer, "a").store(head + tokens(640, 3_000))  # the head and more
    assert router.route_head(head, 8_000) is None
    # Nor does one the router itself just sent there (a prediction): its match may go on past the head.
    router2, _ = fleet("a", "b")
    first = router2.route_head(head, 8_000)
    assert first is not None
    router2.begin("r1", first, 8_000)  # sent: its head's blocks are predicted on the chosen worker
    assert router2.route_head(head, 8_000) is None
    # A head shorter than a block cannot tell anything.
    assert router2.route_head(tokens(63), 8_000) is None


def test_a_new_turns_cached_prefix_decides_when_its_rest_cannot_change_the_choice():
    router, indexer = fleet("a", "b")
    conversation = tokens(2_100)
    head = conversation[:1_984]  # 31 full blocks: the earlier turns, cached on a
    Engine(indexer, "a").store(head)
    # Without a bound on the prompt, a holder of the whole head may match further: the head does not decide.
    assert router.route_head(head, 2_100) is None
    # With one: a is the only holder, and holding more only makes it cheaper.
    decision = router.route_head(head, 2_100, token_bound=2_150)
    assert decision is not None and decision.chosen == A and decision.seq_hashes == sequence_hashes(head, BS)
    # Not in round-robin mode (its choice is a rotation: a dropped decision would still move it).
    rr, rr_indexer = fleet("a", "b", mode="round-robin")
    Engine(rr_indexer, "a").store(head)
    assert rr.route_head(head, 2_100, token_bound=2_150) is None
    assert [rr.route(head).chosen for _ in range(2)] == [A, B]
    # A holder loaded so heavily that even the whole prompt cached there would not make it cheapest.
    router.begin("queued", router.route(tokens(64, 40_000)), 200_000, A)
    decision = router.route_head(head, 2_100, token_bound=2_150)
    assert decision is not None and decision.chosen == B


def test_a_cached_prefix_does_not_decide_when_another_holder_could_be_cheaper():
    router, indexer = fleet("a", "b", "c")
    conversation = tokens(4_000)
    head = conversation[:1_984]
    Engine(indexer, "a").store(head)
    Engine(indexer, "b").store(head)
    router.begin("queued", router.route(tokens(64, 40_000)), 500, A)  # a little prefill queued on a
    # b is cheaper on the head alone, but a holding the next 2,000 tokens as well would be cheaper still.
    assert router.route(head).chosen == B
    assert router.route_head(head, 4_000, token_bound=4_100) is None
    # With no block past the head, nothing can change: the head decides.
    decision = router.route_head(head, 2_000, token_bound=2_000)
    assert decision is not None and decision.chosen == B


def test_a_head_routed_prompts_next_turn_is_scored_with_all_it_shares_on_that_worker():
    """The turn after a long first turn routed on its head: only that head's blocks are known to be on its
    worker a, while b, idle, looks cheaper on the head alone; the prefix cache says the two prompts share
    ~2,000 tokens (``holder``), so a is scored holding them and the head decides for a."""
    router, indexer = fleet("a", "b")
    head = tokens(640)
    Engine(indexer, "a").store(head)
    router.begin("queued", router.route(tokens(64, 40_000)), 1_000, A)  # some prefill queued on a
    assert router.route(head).chosen == B
    assert router.route_head(head, 2_200, token_bound=2_300) is None  # a holding more could be cheaper
    decision = router.route_head(head, 2_200, token_bound=2_300, holder=(A, 2_000))
    assert decision is not None and decision.chosen == A and decision.head_only
    held = decision.score_of(A)
    assert held.depth == 2_000 // BS and held.predicted and held.uncached_tokens == 2_200 - 31 * BS
    # Only the head's blocks are hashed: the rest is predicted once its ids are known (``extend``).
    assert decision.seq_hashes == sequence_hashes(head, BS)
    # A holder that no longer holds the whole head (evicted) gets nothing for it.
    router2, indexer2 = fleet("a", "b")
    Engine(indexer2, "a").store(head[:320])
    router2.begin("queued", router2.route(tokens(64, 40_000)), 1_000, A)
    decision = router2.route_head(head, 2_200, token_bound=2_300, holder=(A, 2_000))
    assert decision is not None and decision.chosen == B and decision.score_of(A).depth == 5


def test_extend_predicts_the_rest_of_a_prompt_routed_on_its_head():
    router, indexer = fleet("a", "b")
    prompt = tokens(2_200)  # 34 full blocks
    Engine(indexer, "a").store(prompt[:2_048])  # the engine holds one block past the head (a previous answer's)
    decision = router.route_head(prompt[:1_984], 2_200, token_bound=2_250)
    assert decision is not None and decision.head_only and decision.num_blocks == 31
    assert not router.route(prompt).head_only
    flight = router.begin("r1", decision, 2_200)
    hashes = sequence_hashes(prompt, BS)
    assert flight.held_blocks is None  # the head's match (31) understates what a holds: unknown yet
    assert indexer.find_matches(hashes)[A].depth == 32
    router.extend(flight, prompt)
    # What the engine's events say it holds of the whole prompt, not counting the router's own predictions.
    assert flight.held_blocks == (A, 32)
    assert decision.seq_hashes == hashes and indexer.find_matches(hashes)[A].depth == 34
    # A worker that does not serve it drops what this request alone predicted: the engine's 32 blocks stay.
    flight.report_usage(None, streamed=False, served=False)
    flight.finish()
    assert indexer.find_matches(hashes)[A].depth == 32
    # Once finished, nothing more is predicted.
    other = tokens(2_100, 20_000)
    late = router.begin("r2", router.route(other[:1_984]), 2_100)
    late.finish()
    router.extend(late, other)
    assert indexer.find_matches(sequence_hashes(other, BS))[late.key].depth == 31  # its head's, sent
    # A salted prompt's rest chains to its salted head: the same keys as hashing it whole with the salt.
    salted = router.route_head(other[:1_984], 2_100, cache_salt="tenant", token_bound=2_150)
    assert salted is not None
    router.extend(router.begin("r3", salted, 2_100), other)
    assert salted.seq_hashes == sequence_hashes(other, BS, cache_salt="tenant")


def test_a_prompt_sharing_a_routed_heads_prompt_has_its_shared_blocks_predicted_there():
    router, indexer = fleet("a", "b", "c")
    prompt = tokens(8_000)
    router.begin("r1", router.route(prompt[:640]), 8_000, B)  # routed on its head: only 10 blocks predicted
    # The prefix cache says the next prompt shares its first 6,000 tokens with that one, sent to b.
    decision = router.route(prompt[:7_000], shared=(B, 6_000))
    assert decision.chosen == B and decision.score_of(B).depth == 6_000 // BS
    assert indexer.find_matches(sequence_hashes(prompt, BS))[B].depth == 6_000 // BS
    # Not for a worker that left the fleet.
    router.route(tokens(7_000, 20_000), shared=(WorkerKey("gone"), 6_000))
    assert WorkerKey("gone") not in indexer.find_matches(sequence_hashes(tokens(7_000, 20_000), BS))
    # Nor for one whose engine was lost since (its index forgotten: it holds nothing that prompt left there).
    other = tokens(8_000, 30_000)
    router.begin("r2", router.route(other[:640]), 8_000, C)
    indexer.engine_lost("c")
    router.route(other[:7_000], shared=(C, 6_000))
    assert C not in indexer.find_matches(sequence_hashes(other, BS))


def test_a_follower_of_a_request_in_flight_holds_only_its_own_blocks_and_teaches_the_hold_time():
    # r1 is sent a 10-block document; r2, the same document plus 3 blocks, follows it on its
    # prediction: the engine will share the 10 blocks r1 is computing, so r2 holds 3 more
    # (with its partial last block, 4), not 14.
    now = [0.0]
    router, indexer = fleet("a", "b", clock=lambda: now[0])
    doc = tokens(640)
    r1 = router.begin("r1", router.route(doc), 640)
    assert r1.key == A and router.load.snapshot(A).blocks == 10
    d2 = router.route(doc + tokens(230, 9_000))
    assert d2.chosen == A and d2.chosen_score.predicted and d2.chosen_score.depth == 10
    r2 = router.begin("r2", d2, 870)
    assert router.load.snapshot(A).blocks == 10 + 4
    # Each answer teaches how long a's requests hold their blocks (sent to finished).
    now[0] = 0.4
    r1.report_usage(None, streamed=True)
    r1.first_token()
    now[0] = 1.5
    r1.finish()
    assert router.speed.speed("a").hold == pytest.approx(1.5) and router.speed.speed("a").hold_samples == 1
    r2.finish()  # no first token: not served, teaches nothing
    assert router.speed.speed("a").hold_samples == 1
    assert router.load.snapshot(A) is IDLE
