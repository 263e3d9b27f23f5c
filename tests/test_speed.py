"""router.speed: the kv cost model learns each worker's prefill rate and overhead, the
fleet's decode slowdown and tier block costs from answered requests; the Router feeds it
from its requests' lifecycle and routes cold traffic in proportion to the learned speeds."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.protocol.events import Tier, WorkerKey
from kvgate.router.config import RouterConfig, SpeedConfig
from kvgate.router.load import LoadTracker
from kvgate.router.registry import StaticDiscovery
from kvgate.router.routing import Router
from kvgate.router.speed import Sample, SpeedModel

A, B = WorkerKey("a"), WorkerKey("b")
SEEDS = SpeedConfig()


def answers(
    model: SpeedModel,
    key: WorkerKey,
    n: int,
    *,
    tokens_per_s: float,
    overhead: float = 0.020,
    kv_usage: float = 0.0,
    slowdown: float = 0.0,
    cpu_blocks: int = 0,
    cpu_block_s: float = 0.0,
    seed: int = 1,
) -> None:
    """``n`` exact answers of a worker with these true figures, prompts of 512-4,096 uncached tokens."""
    rng = random.Random(seed)
    for _ in range(n):
        work = rng.randint(512, 4096)
        ttft = overhead + work / tokens_per_s * (1 + slowdown * kv_usage) + cpu_blocks * cpu_block_s
        assert model.observe(Sample(key, ttft, work, kv_usage, cpu_blocks, 0))


def predicted_ttft(model: SpeedModel, worker_id: str, work: int) -> float:
    s = model.speed(worker_id)
    return s.overhead + work * s.seconds_per_token


def test_unanswered_worker_has_the_seed_rates():
    model = SpeedModel(SEEDS)
    s = model.speed("a")
    assert s.tokens_per_second == pytest.approx(SEEDS.prefill_tokens_per_s) and s.samples == 0
    assert s.overhead == pytest.approx(SEEDS.overhead_ms / 1e3)
    assert model.decode_slowdown == SEEDS.decode_slowdown
    assert model.block_seconds(Tier.GPU) == 0.0
    assert model.block_seconds(Tier.CPU) == pytest.approx(SEEDS.cpu_block_ms / 1e3)
    assert model.block_seconds(Tier.DISK) == pytest.approx(SEEDS.disk_block_ms / 1e3)
    assert model.seconds_per_token("a", 0.5) == pytest.approx((1 + 0.5 * SEEDS.decode_slowdown) / 20_000)


def test_learning_converges_to_each_workers_true_rate():
    model = SpeedModel(SEEDS)
    # Neither is at the seed (20k tokens/s, 20 ms); b is twice as fast as a.
    answers(model, A, 200, tokens_per_s=30_000, overhead=0.015, seed=1)
    answers(model, B, 200, tokens_per_s=60_000, overhead=0.015, seed=2)
    a, b = model.speed("a"), model.speed("b")
    assert a.tokens_per_second == pytest.approx(30_000, rel=0.05)
    assert b.tokens_per_second == pytest.approx(60_000, rel=0.05)
    assert b.tokens_per_second / a.tokens_per_second == pytest.approx(2.0, rel=0.05)
    assert a.overhead == pytest.approx(0.015, abs=0.002) and b.overhead == pytest.approx(0.015, abs=0.002)
    assert (a.samples, b.samples, model.samples, model.rejected) == (200, 200, 400, 0)
    out = model.to_dict()
    assert out["workers"]["b"]["prefill_tokens_per_s"] == pytest.approx(60_000, rel=0.05)
    assert out["workers"]["a"]["overhead_ms"] == pytest.approx(15, abs=2) and out["samples"] == 400


def test_a_worker_that_slows_down_is_seen_within_a_few_over_smoothing_answers():
    model = SpeedModel(SEEDS)
    answers(model, A, 100, tokens_per_s=40_000)
    assert model.speed("a").tokens_per_second == pytest.approx(40_000, rel=0.05)
    answers(model, A, math.ceil(3 / SEEDS.smoothing), tokens_per_s=10_000, seed=2)
    assert model.speed("a").tokens_per_second == pytest.approx(10_000, rel=0.10)


def test_overhead_is_learned_from_answers_with_almost_no_work():
    # Every prompt cached whole: 1-16 tokens to compute, a 5 ms first token.
    model = SpeedModel(SEEDS)
    for i in range(60):
        work = i % 16 + 1
        assert model.observe(Sample(A, 0.005 + work / 20_000, work, 0.0))
    s = model.speed("a")
    assert s.overhead == pytest.approx(0.005, abs=0.0005)
    assert s.tokens_per_second == pytest.approx(SEEDS.prefill_tokens_per_s)  # too little work to teach a rate


def test_alike_prompts_with_queues_keep_the_queue_costly():
    # Every prompt 2,048 tokens; one in four was sent behind another, mostly done by then, so its
    # "work" reads 4,096 tokens for a first token only a little later: the no-sharing control at
    # load. A free line through that fitted an overhead of ~0.58 s and a tenth of the true rate,
    # so a queue ahead looked almost free and cold prompts piled onto one worker. The overhead now
    # comes from the answers with nothing queued (all of one size: anchored at the seed), so the
    # rate carries what a prompt costs.
    model = SpeedModel(SEEDS)
    for i in range(200):
        queued = i % 4 == 3
        work, queue = (4096, 2048) if queued else (2048, 0)
        assert model.observe(Sample(A, 0.66 if queued else 0.60, work, 0.0, queued_tokens=queue))
    s = model.speed("a")
    assert s.overhead < 0.2
    assert s.seconds_per_token * 2048 > 0.4  # a 2,048-token prompt queued ahead costs most of its 0.6 s


def test_workers_are_predicted_with_the_fleets_overhead_and_their_own_rate():
    model = SpeedModel(SEEDS)
    answers(model, A, 50, tokens_per_s=30_000, overhead=0.010, seed=1)
    answers(model, B, 50, tokens_per_s=60_000, overhead=0.050, seed=2)
    a, b = model.predicting("a"), model.predicting("b")
    assert a.overhead == b.overhead == pytest.approx((model.speed("a").overhead + model.speed("b").overhead) / 2)
    assert (a.tokens_per_second, b.tokens_per_second) == (
        model.speed("a").tokens_per_second,
        model.speed("b").tokens_per_second,
    )


def test_bounds_clamp_what_outliers_can_teach():
    config = SpeedConfig(bound=10.0)
    fast, slow, stuck = SpeedModel(config), SpeedModel(config), SpeedModel(config)
    answers(fast, A, 100, tokens_per_s=5_000_000, overhead=0.020)  # 250x the seed
    assert fast.speed("a").tokens_per_second == pytest.approx(20_000 * 10)
    answers(slow, A, 100, tokens_per_s=100, overhead=0.020)  # 1/200 of the seed
    assert slow.speed("a").tokens_per_second == pytest.approx(20_000 / 10)
    for _ in range(100):  # a cached prompt answered after 5 s
        stuck.observe(Sample(A, 5.0, 1, 0.0))
    assert 0.0 <= stuck.speed("a").overhead <= config.overhead_ms / 1e3 * 10 + 1e-12
    for model in (fast, slow, stuck):
        s = model.speed("a")
        assert 1 / (20_000 * 10) - 1e-15 <= s.seconds_per_token <= 1 / (20_000 / 10) + 1e-15
        assert 0.0 <= s.overhead <= 0.2 + 1e-12


def test_smoothing_bounds_a_single_outliers_effect():
    model = SpeedModel(SEEDS)
    answers(model, A, 100, tokens_per_s=30_000)
    before = model.speed("a").tokens_per_second
    typical = predicted_ttft(model, "a", 2048)
    # One answer 100x slower than usual (a stalled engine, a slow network).
    assert model.observe(Sample(A, 0.020 + 2048 / 30_000 * 100, 2048, 0.0))
    after = model.speed("a").tokens_per_second
    # A slow answer never makes the worker look faster, and moves it by a bounded step.
    assert before / 6 <= after <= before * 1.01
    assert typical <= predicted_ttft(model, "a", 2048) <= typical * (1 + SEEDS.smoothing * SEEDS.bound)
    answers(model, A, math.ceil(3 / SEEDS.smoothing), tokens_per_s=30_000, seed=2)
    assert model.speed("a").tokens_per_second == pytest.approx(30_000, rel=0.05)


def busy_and_idle(model: SpeedModel, n: int, *, usage: float, slowdown: float, seed: int = 1) -> None:
    """``n`` answers of a 30k tokens/s worker, alternately idle and at KV usage ``usage``."""
    rng = random.Random(seed)
    for i in range(n):
        u = usage if i % 2 else 0.0
        work = rng.randint(512, 4096)
        assert model.observe(Sample(A, 0.020 + work / 30_000 * (1 + slowdown * u), work, u))


def test_decode_slowdown_rises_when_busy_answers_are_slower_and_stays_in_bounds():
    model = SpeedModel(SEEDS)
    # True slowdown 0.8 (the seed says 0.3): at KV usage 0.8 prefill is 1.64x slower than idle.
    busy_and_idle(model, 400, usage=0.8, slowdown=0.8)
    assert 0.55 < model.decode_slowdown <= SEEDS.max_decode_slowdown
    assert model.speed("a").tokens_per_second == pytest.approx(30_000, rel=0.15)
    # Absurdly slow busy answers: capped at max_decode_slowdown.
    busy_and_idle(model, 400, usage=0.9, slowdown=100.0, seed=2)
    assert model.decode_slowdown == pytest.approx(SEEDS.max_decode_slowdown, abs=0.05)
    # Busy answers as fast as idle ones: it falls, never below 0.
    busy_and_idle(model, 1200, usage=0.9, slowdown=0.0, seed=3)
    assert 0.0 <= model.decode_slowdown < 0.2
    # Learning it can be turned off on its own.
    frozen = SpeedModel(SpeedConfig(learn_decode_slowdown=False))
    busy_and_idle(frozen, 100, usage=0.8, slowdown=2.0)
    assert frozen.decode_slowdown == SEEDS.decode_slowdown


def test_tier_block_cost_is_learned_from_answers_with_a_prefix_in_one_tier():
    model = SpeedModel(SEEDS)
    # Loading a CPU block really takes 1 ms (the seed says 0.34); half the answers load 10.
    for i in range(40):
        answers(model, A, 10, tokens_per_s=30_000, cpu_blocks=10 if i % 2 else 0, cpu_block_s=0.001, seed=i)
    assert model.block_seconds(Tier.CPU) == pytest.approx(0.001, rel=0.05)
    assert model.to_dict()["cpu_block_ms"] == pytest.approx(1.0, rel=0.05)
    assert model.block_seconds(Tier.DISK) == pytest.approx(SEEDS.disk_block_ms / 1e3)  # no disk answers
    assert model.speed("a").tokens_per_second == pytest.approx(30_000, rel=0.05)


def test_learn_false_learns_nothing():
    model = SpeedModel(SpeedConfig(learn=False))
    for work in (1, 1000, 4000):
        assert not model.observe(Sample(A, 1.0, work, 0.9, 10, 0))
    assert (model.samples, model.rejected, model.decode_slowdown) == (0, 0, SEEDS.decode_slowdown)
    s = model.speed("a")
    assert s.samples == 0 and s.tokens_per_second == pytest.approx(20_000) and s.overhead == pytest.approx(0.020)
    assert model.block_seconds(Tier.CPU) == pytest.approx(SEEDS.cpu_block_ms / 1e3)


@pytest.mark.parametrize(
    "ttft, work, usage",
    [(0.0, 100, 0.0), (-1.0, 100, 0.0), (float("nan"), 100, 0.0), (float("inf"), 100, 0.0), (4000.0, 100, 0.0)]
    + [(0.1, -1, 0.0), (0.1, 100, 1.5), (0.1, 100, -0.1), (0.1, 100, float("nan"))],
)
def test_bad_samples_are_rejected_and_counted(ttft, work, usage):
    model = SpeedModel(SEEDS)
    assert not model.observe(Sample(A, ttft, work, usage))
    assert (model.rejected, model.samples, model.to_dict()["rejected"]) == (1, 0, 1)
    assert model.speed("a").samples == 0 and model.speed("a").tokens_per_second == pytest.approx(20_000)


def test_forget_starts_a_returning_worker_from_the_seed():
    model = SpeedModel(SEEDS)
    answers(model, A, 50, tokens_per_s=60_000)
    answers(model, B, 50, tokens_per_s=60_000)
    model.forget("a")
    model.forget("nobody")
    assert model.speed("a").samples == 0 and model.speed("a").tokens_per_second == pytest.approx(20_000)
    assert model.speed("b").tokens_per_second == pytest.approx(60_000, rel=0.05)


# -- through the Router: InFlight timings teach it, routing follows ------------------------

BS = 64


class Fleet:
    """A Router over workers a and b with a fake clock; b's engine is twice as fast."""

    TRUE_TOKENS_PER_S = {"a": 25_000.0, "b": 50_000.0}
    OVERHEAD = 0.020

    def __init__(self, **kw) -> None:
        self.now = 0.0
        self.config = RouterConfig(**kw)
        clock = self.clock
        self.indexer = KvIndexer(block_size=BS, clock=clock)
        ids = [{"id": w, "url": f"http://127.0.0.1:{9000 + n}"} for n, w in enumerate(self.TRUE_TOKENS_PER_S)]
        self.registry = StaticDiscovery(ids).registry()
        load = LoadTracker.from_config(self.config, clock=clock)
        self.router = Router(self.config, self.indexer, self.registry, load, clock=clock)
        self.prompts = 0

    def clock(self) -> float:
        return self.now

    def prompt(self, n: int) -> list[int]:
        """A prompt nobody holds."""
        self.prompts += 1
        return [self.prompts * 100_000 + i for i in range(n)]

    def serve(
        self, worker_id: str, n: int, *, cached: int = 0, streamed: bool = True, first_token: bool = True
    ) -> None:
        """One request sent to ``worker_id`` alone, answered after the engine's true TTFT for
        the ``n - cached`` tokens it had to compute (``cached``: what its usage reports)."""
        tokens = self.prompt(n)
        decision = self.router.route(tokens)
        flight = self.router.begin(f"r{self.prompts}", decision, n, WorkerKey(worker_id))
        self.now += self.OVERHEAD + (n - cached) / self.TRUE_TOKENS_PER_S[worker_id]
        if first_token:
            flight.first_token()
        flight.report_usage(cached, streamed=streamed)
        self.now += 0.5  # the rest of the answer does not count
        flight.finish("done")
        self.now += 1.0


def test_router_learns_from_streamed_answers_only():
    fleet = Fleet()
    speed = fleet.router.speed
    fleet.serve("a", 2048, streamed=False)  # a whole answer's first byte comes after its last token
    fleet.serve("a", 2048, first_token=False)  # failed before its first token
    assert speed.samples == 0 and speed.speed("a").samples == 0
    fleet.serve("a", 2048)
    assert speed.samples == 1 and speed.speed("a").samples == 1


def test_an_answer_predicted_to_wait_for_kv_memory_teaches_no_speed():
    fleet = Fleet(prediction_capacity_blocks=40)
    speed = fleet.router.speed
    # A request in flight on a holds 32 of its 40 blocks: a 32-block prompt there waits for memory.
    tokens = fleet.prompt(2048)
    held = fleet.router.begin("held", fleet.router.route(tokens), 2048, WorkerKey("a"))
    fleet.serve("a", 2048)
    assert speed.speed("a").samples == 0 and speed.speed("a").hold_samples == 1
    held.finish("done")
    fleet.serve("a", 2048)
    assert speed.speed("a").samples == 1


def test_router_learns_from_the_engines_own_cached_token_count():
    # The index knew nothing of these prompts, but the engine found half of each cached:
    # its usage says so, and the rate is learned from the tokens it really computed.
    fleet = Fleet()
    rng = random.Random(3)
    for _ in range(40):
        n = rng.randint(16, 64) * BS
        fleet.serve("b", n, cached=n // 2)
    assert fleet.router.speed.speed("b").tokens_per_second == pytest.approx(50_000, rel=0.05)


def test_router_learns_each_workers_speed_and_sends_the_faster_more_cold_work():
    fleet = Fleet()
    rng = random.Random(7)
    for _ in range(40):
        for worker in ("a", "b"):
            fleet.serve(worker, rng.randint(8, 64) * BS)
    speed = fleet.router.speed
    a, b = speed.speed("a"), speed.speed("b")
    assert a.tokens_per_second == pytest.approx(25_000, rel=0.05)
    assert b.tokens_per_second == pytest.approx(50_000, rel=0.05)
    assert a.overhead == pytest.approx(0.020, abs=0.002) and b.overhead == pytest.approx(0.020, abs=0.002)
    # A burst of cold 1,024-token prompts, none answered yet: the first goes to b (equal
    # queues, b twice as fast); as b's queue grows a gets some, about a third in the end.
    chosen = []
    for i in range(30):
        decision = fleet.router.route(fleet.prompt(1024))
        fleet.router.begin(f"burst{i}", decision, 1024)
        chosen.append(decision.chosen.worker_id)
    assert chosen[0] == "b"
    counts = Counter(chosen)
    assert 18 <= counts["b"] <= 22 and counts["a"] == 30 - counts["b"], counts
    # Each choice was the cheaper predicted TTFT: b's queue ends about twice a's.
    queued = {k.worker_id: fleet.router.load.snapshot(k).prefill_tokens for k in (A, B)}
    assert queued["b"] / queued["a"] == pytest.approx(2.0, rel=0.25)


def test_a_removed_worker_forgets_its_speed():
    fleet = Fleet()
    for _ in range(10):
        fleet.serve("b", 2048)
    assert fleet.router.speed.speed("b").samples == 10
    fleet.registry.remove("b")
    assert "b" not in fleet.router.speed.workers


def test_hold_time_is_learned_per_worker_bounded_and_shared_with_new_workers():
    config = SpeedConfig(hold_seconds=2.0, smoothing=0.5, bound=10.0)
    model = SpeedModel(config)
    assert model.hold_seconds("a") == 2.0  # the seed, before any answer
    assert model.observe_hold("a", 1.0) and model.observe_hold("a", 1.0)
    assert model.hold_seconds("a") == 2.0  # two answers: still the fleet's (the seed)
    model.observe_hold("a", 3.0)
    assert model.hold_seconds("a") == pytest.approx(2.0)  # 1, 1, then halfway to 3
    # A worker with too few answers of its own is predicted with the fleet's mean.
    assert model.hold_seconds("b") == pytest.approx(2.0)
    model.observe_hold("a", 3000.0)  # a stuck request counts as bound x seed at most
    assert model.hold_seconds("a") == pytest.approx((2.0 + 20.0) / 2)
    assert not model.observe_hold("a", -1.0) and not model.observe_hold("a", float("nan"))
    assert model.to_dict()["workers"]["a"]["hold_s"] == pytest.approx(11.0)
    assert not SpeedModel(SpeedConfig(learn=False)).observe_hold("a", 1.0)
