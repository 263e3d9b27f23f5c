"""How long a simulated engine step takes: the timing model of Dynamo's mocker, plus loads.

prefill ms = 4.209989e-7·t² + 0.01518344·t + 16.50142, t = prompt tokens computed in
the step (tokens found in the prefix cache are not computed, so cost nothing);
decode ms = max(1, −25.74·u² + 54.01·u + 5.74), u = KV-cache utilisation in [0, 1];
load ms = Σ over tiers of blocks loaded back from that tier × bytes per block / the
tier's bandwidth (a block found in the CPU or disk tier is transferred, not recomputed).
A step pays the prefill term if it computes prompt tokens, the decode term if it
advances any request that is already generating, and the load term for the blocks its
newly admitted requests load; all are divided by the speedup ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvgate.worker.sim.config import EngineConfig

_DEFAULT = EngineConfig()


@dataclass(frozen=True, slots=True)
class StepWork:
    prefill_tokens: int = 0
    decode_requests: int = 0
    kv_usage: float = 0.0
    cpu_loaded_blocks: int = 0
    disk_loaded_blocks: int = 0


def prefill_ms(tokens: int) -> float:
    if tokens <= 0:
        return 0.0
    return 4.209989e-7 * tokens * tokens + 1.518344e-2 * tokens + 1.650142e1


def decode_ms(kv_usage: float) -> float:
    u = min(max(kv_usage, 0.0), 1.0)
    return max(1.0, -25.74 * u * u + 54.01 * u + 5.74)


def transfer_ms(num_bytes: float, bandwidth_gbps: float) -> float:
    """Milliseconds to move ``num_bytes`` at ``bandwidth_gbps`` GB/s (10^9 bytes per second)."""
    return num_bytes / (bandwidth_gbps * 1e9) * 1e3


@dataclass(frozen=True, slots=True)
class TimingModel:
    speedup_ratio: float = _DEFAULT.speedup_ratio
    bytes_per_block: int = _DEFAULT.bytes_per_block
    cpu_bandwidth_gbps: float = _DEFAULT.tiers.cpu_bandwidth_gbps
    disk_bandwidth_gbps: float = _DEFAULT.tiers.disk_bandwidth_gbps

    @classmethod
    def from_config(cls, config: EngineConfig) -> TimingModel:
        t = config.tiers
        return cls(config.speedup_ratio, config.bytes_per_block, t.cpu_bandwidth_gbps, t.disk_bandwidth_gbps)

    def load_ms(self, work: StepWork) -> float:
        return transfer_ms(work.cpu_loaded_blocks * self.bytes_per_block, self.cpu_bandwidth_gbps) + transfer_ms(
            work.disk_loaded_blocks * self.bytes_per_block, self.disk_bandwidth_gbps
        )

    def step_seconds(self, work: StepWork) -> float:
        ms = prefill_ms(work.prefill_tokens) + self.load_ms(work)
        if work.decode_requests:
            ms += decode_ms(work.kv_usage)
        return ms / 1000.0 / self.speedup_ratio
