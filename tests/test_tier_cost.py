"""The ``kv`` cost model's tier seeds are the simulated worker's transfer times.

``router.config.SpeedConfig`` documents the derivation (8 MiB blocks over PCIe / NVMe);
these tests recompute it from the simulator's own defaults and check that the router's
predicted time to first token, for a prefix reused from each tier, matches the simulated
engine's step times in milliseconds.
"""

from __future__ import annotations

import itertools

import pytest

from kvgate.indexer.index import Match
from kvgate.protocol.events import WorkerKey
from kvgate.router.config import RouterConfig, SpeedConfig
from kvgate.router.policies import score_candidates
from kvgate.router.speed import SpeedModel
from kvgate.worker.sim.config import EngineConfig, TierConfig
from kvgate.worker.sim.request import Request
from kvgate.worker.sim.scheduler import Scheduler
from kvgate.worker.sim.timing import prefill_ms, transfer_ms

SIM = EngineConfig()


def test_tier_seeds_are_the_simulators_transfer_times():
    # Llama-3-8B: 2 (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes x 64 tokens = 8 MiB.
    assert SIM.block_size == 64 and SIM.bytes_per_block == 2 * 32 * 8 * 128 * 2 * 64 == 8 * 1024 * 1024
    assert (SIM.tiers.cpu_bandwidth_gbps, SIM.tiers.disk_bandwidth_gbps) == (25.0, 10.0)
    cpu = transfer_ms(SIM.bytes_per_block, SIM.tiers.cpu_bandwidth_gbps)
    disk = transfer_ms(SIM.bytes_per_block, SIM.tiers.disk_bandwidth_gbps)
    seeds = SpeedConfig()
    assert (round(cpu, 2), round(disk, 2)) == (seeds.cpu_block_ms, seeds.disk_block_ms) == (0.34, 0.84)
    # Loading a block back is cheaper than recomputing it, at any step size the engine runs.
    for t in range(0, SIM.max_num_batched_tokens, SIM.block_size):
        recompute = prefill_ms(t + SIM.block_size) - prefill_ms(t)
        assert cpu < disk < recompute, t


def test_prefill_seed_is_within_the_simulators_range():
    # The seed (20k tokens/s) is conservative against the mocker's ~42k tokens/s at 2,048-token
    # steps, so an unlearned worker is never predicted faster than it is.
    seeds = SpeedConfig()
    rate_2k = 2048 / prefill_ms(2048) * 1e3
    assert rate_2k == pytest.approx(41_500, rel=0.02)
    assert seeds.prefill_tokens_per_s < rate_2k < seeds.prefill_tokens_per_s * seeds.bound


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


def test_router_ttft_tracks_the_engines_step_times():
    blocks = 16
    ms = {tier: first_step_ms(tier, blocks) for tier in ("gpu", "cpu", "disk", "absent")}
    assert ms["gpu"] < ms["cpu"] < ms["disk"] < ms["absent"]
    keys = {tier: WorkerKey(tier) for tier in ms}
    matches = {
        keys["gpu"]: Match(blocks, [blocks, 0, 0]),
        keys["cpu"]: Match(blocks, [0, blocks, 0]),
        keys["disk"]: Match(blocks, [0, 0, blocks]),
    }
    prompt_tokens = blocks * 64 + 1  # as the simulated prompts: 16 full blocks and one more token
    # A router whose rate matches the engine's for this prompt (as learning would make it):
    # the engine computed prompt_tokens - 1 more tokens without a prefix.
    rate = (prompt_tokens - 1) / (ms["absent"] - ms["gpu"]) * 1e3
    config = RouterConfig(speed=SpeedConfig(prefill_tokens_per_s=rate, overhead_ms=ms["gpu"]))
    scores = {
        s.key.worker_id: s.ttft * 1e3
        for s in score_candidates(
            config, SpeedModel(config.speed), list(keys.values()), matches, blocks, {}, prompt_tokens=prompt_tokens
        )
    }
    assert scores["gpu"] < scores["cpu"] < scores["disk"] < scores["absent"]
    # Every predicted first token within 2% (and 0.2 ms) of the engine's step: the tier
    # seeds in milliseconds are what the engine pays to load the prefix back.
    for tier in ms:
        assert scores[tier] == pytest.approx(ms[tier], rel=0.02, abs=0.2), tier
    for tier, per_block in (("cpu", config.speed.cpu_block_ms), ("disk", config.speed.disk_block_ms)):
        assert ms[tier] - ms["gpu"] == pytest.approx(blocks * per_block, rel=0.02), tier
