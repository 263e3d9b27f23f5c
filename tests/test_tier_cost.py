"""The ``kv`` cost model's tier defaults are the simulated worker's load / recompute ratio.

``router.config.CostWeights`` documents the derivation; these tests recompute it from the
simulator's own defaults and check that the router's costs of reusing a prefix from each
tier rank and space workers as the simulated engine's step times do.
"""

from __future__ import annotations

import itertools

import pytest

from kvgate.indexer.index import Match
from kvgate.protocol.events import WorkerKey
from kvgate.router.config import CostWeights, RouterConfig
from kvgate.router.policies import score_candidates
from kvgate.worker.sim.config import EngineConfig, TierConfig
from kvgate.worker.sim.request import Request
from kvgate.worker.sim.scheduler import Scheduler
from kvgate.worker.sim.timing import prefill_ms, transfer_ms

SIM = EngineConfig()
TYPICAL_STEP_TOKENS = SIM.max_num_batched_tokens // 2


def recompute_ms(block_size: int, step_tokens: int) -> float:
    """Marginal prefill time of one more block in a step already computing ``step_tokens`` (> 0:
    the per-step constant is paid whoever serves the request)."""
    return prefill_ms(step_tokens + block_size) - prefill_ms(step_tokens)


def test_defaults_are_the_simulators_load_over_recompute_ratios():
    block_ms = recompute_ms(SIM.block_size, TYPICAL_STEP_TOKENS)
    assert SIM.bytes_per_block == 8 * 1024 * 1024 and block_ms == pytest.approx(1.0286, abs=1e-4)
    cpu = transfer_ms(SIM.bytes_per_block, SIM.tiers.cpu_bandwidth_gbps) / block_ms
    disk = transfer_ms(SIM.bytes_per_block, SIM.tiers.disk_bandwidth_gbps) / block_ms
    w = CostWeights()
    assert (round(cpu, 2), round(disk, 2)) == (w.cpu_load_fraction, w.disk_load_fraction) == (0.33, 0.82)
    # Over any step size the engine runs, the ratios stay within a few hundredths.
    for t in range(SIM.block_size, SIM.max_num_batched_tokens, SIM.block_size):
        ms = recompute_ms(SIM.block_size, t)
        assert abs(transfer_ms(SIM.bytes_per_block, SIM.tiers.cpu_bandwidth_gbps) / ms - w.cpu_load_fraction) < 0.03
        assert abs(transfer_ms(SIM.bytes_per_block, SIM.tiers.disk_bandwidth_gbps) / ms - w.disk_load_fraction) < 0.06


def first_step_ms(tier_of_prefix: str, blocks: int) -> float:
    """The simulated time of the step admitting a ``blocks``-block prompt whose prefix sits in one tier."""
    s = Scheduler(
        EngineConfig(
            num_gpu_blocks=blocks + 1,
            max_model_len=(blocks + 1) * 64,
            seed=1,
            tiers=TierConfig(cpu_blocks=blocks, disk_blocks=blocks),
        )
    )
    ids = itertools.count()
    tokens = list(range(1, blocks * 64 + 2))
    other = list(range(100_000, 100_000 + blocks * 64 + 1))

    def run(prompt: list[int]) -> float:
        s.add_request(Request(f"r{next(ids)}", prompt, 1, iter(range(50_000, 10**9)), None))
        first = s.schedule()
        s.update(first)
        while s.has_work:
            s.update(s.schedule())
        return first.seconds * 1e3

    if tier_of_prefix == "absent":
        return run(tokens)
    run(tokens)
    if tier_of_prefix in ("cpu", "disk"):
        run(other)  # evicts the prompt from the GPU into the CPU
    if tier_of_prefix == "disk":
        run(list(range(200_000, 200_000 + blocks * 64 + 1)))  # and from the CPU to disk
    return run(tokens)


def test_router_costs_track_the_engines_step_times():
    blocks = 16
    ms = {tier: first_step_ms(tier, blocks) for tier in ("gpu", "cpu", "disk", "absent")}
    assert ms["gpu"] < ms["cpu"] < ms["disk"] < ms["absent"]
    keys = {tier: WorkerKey(tier) for tier in ms}
    matches = {
        keys["gpu"]: Match(blocks, [blocks, 0, 0]),
        keys["cpu"]: Match(blocks, [0, blocks, 0]),
        keys["disk"]: Match(blocks, [0, 0, blocks]),
    }
    scores = {
        s.key.worker_id: s.prefill_cost
        for s in score_candidates(RouterConfig(), list(keys.values()), matches, blocks, {})
    }
    # What reusing each tier saves over a recompute, as a share of the whole recompute:
    # the router's cost units against the engine's milliseconds.
    for tier in ("cpu", "disk"):
        engine_share = (ms[tier] - ms["gpu"]) / (ms["absent"] - ms["gpu"])
        router_share = (scores[tier] - scores["gpu"]) / (scores["absent"] - scores["gpu"])
        assert router_share == pytest.approx(engine_share, rel=0.05), tier
