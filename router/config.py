"""Router configuration: typed dataclasses, every default in one place.

The CLI, the YAML file and tests only fill these in (``from_dict`` for YAML sections);
nothing else in ``router/`` holds a tunable constant. Values are validated on
construction, so a bad config fails at start-up with a message naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar, get_args

from kvgate.protocol.events import Tier
from kvgate.protocol.hashing import DEFAULT_BLOCK_SIZE

RouterMode = Literal["kv", "round-robin", "random"]
ROUTER_MODES: tuple[str, ...] = get_args(RouterMode)


@dataclass(frozen=True, slots=True)
class CostWeights:
    """Weights of the ``kv`` cost model (see router/README.md for the formula).

    Costs are in units of "recomputing one block" (``compute_cost``). A prefix block
    found in a lower tier costs a fraction of that: loading it back is cheaper than
    recomputing it, but not free.

    The tier defaults are load time / recompute time of one 64-token block under the
    simulated worker's defaults (worker/sim/config.py, worker/sim/timing.py;
    tests/test_tier_cost.py recomputes them):

    * recompute: the marginal prefill cost of 64 more tokens, from Dynamo's mocker
      polynomial 4.209989e-7·t² + 0.01518344·t + 16.50142 ms, at a step already computing
      t = 1024 tokens (half the default 2,048-token budget): 1.0286 ms (0.973 ms at
      t = 0, 1.080 ms at t = 1,984; the 16.5 ms per-step constant is paid whoever serves);
    * block size: Llama-3-8B, 2 (K, V) × 32 layers × 8 KV heads × 128 dims × 2 bytes
      × 64 tokens = 8 MiB = 8,388,608 bytes;
    * CPU load at 25 GB/s (PCIe 4.0 x16): 0.3355 ms → 0.3355 / 1.0286 = 0.326 ≈ 0.33
      (0.31–0.34 over t = 0…1,984);
    * disk load at 10 GB/s (two PCIe 4.0 NVMe drives striped): 0.8389 ms → 0.816 ≈ 0.82
      (0.78–0.86). A single ~5 GB/s drive would take 1.68 ms, 1.63× the recompute: such a
      disk tier is not worth loading from, and no fraction <= 1 describes it.
    """

    prefill_weight: float = 1.0
    decode_weight: float = 1.0
    compute_cost: float = 1.0
    cpu_load_fraction: float = 0.33
    disk_load_fraction: float = 0.82

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_number(f.name, getattr(self, f.name), minimum=0.0)
        for name in ("cpu_load_fraction", "disk_load_fraction"):
            if getattr(self, name) > 1.0:
                # Loading a block back slower than recomputing it would make the tier useless;
                # almost certainly a unit mix-up (an absolute cost where a fraction belongs).
                raise ValueError(f"{name} must be <= 1 (a fraction of compute_cost), got {getattr(self, name)}")

    def tier_load_cost(self, tier: Tier) -> float:
        """Cost of reusing one block held in ``tier`` (GPU: free)."""
        if tier == Tier.GPU:
            return 0.0
        fraction = self.cpu_load_fraction if tier == Tier.CPU else self.disk_load_fraction
        return fraction * self.compute_cost

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "weights") -> CostWeights:
        return _from_dict(cls, data, where)


@dataclass(frozen=True, slots=True)
class BusyThresholds:
    """A worker over any threshold is skipped; ``None`` turns a check off.

    ``max_kv_usage`` and ``max_waiting`` use the engine-reported load and only apply
    while it is fresh; ``max_prefill_tokens`` uses the router's own tracking (this
    replica's and remote replicas' requests still in prefill).
    """

    max_kv_usage: float | None = None
    max_waiting: int | None = None
    max_prefill_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_kv_usage is not None:
            _check_number("max_kv_usage", self.max_kv_usage, minimum=0.0)
            if self.max_kv_usage > 1.0:
                raise ValueError(f"max_kv_usage is a fraction in [0, 1], got {self.max_kv_usage}")
        for name in ("max_waiting", "max_prefill_tokens"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=0)

    @property
    def enabled(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "busy") -> BusyThresholds:
        return _from_dict(cls, data, where)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Everything the router needs to decide.

    ``temperature`` is in cost units (blocks): with T > 0 a worker costing T more than
    the best one is e times less likely to be picked; 0 always picks the cheapest.
    ``gpu_only`` ignores the CPU / disk tiers (blocks held only there count as absent),
    the baseline the tier benchmark compares against.
    """

    mode: RouterMode = "kv"
    block_size: int = DEFAULT_BLOCK_SIZE
    weights: CostWeights = field(default_factory=CostWeights)
    temperature: float = 0.0
    gpu_only: bool = False
    busy: BusyThresholds = field(default_factory=BusyThresholds)
    # Leak protection only: the gateway frees every request it begins; a TTL this long
    # outlives any sane generation, so it never frees a request that is still running.
    active_request_ttl: float = 600.0
    engine_load_stale_after: float = 10.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ROUTER_MODES:
            raise ValueError(f"mode must be one of {', '.join(ROUTER_MODES)}; got {self.mode!r}")
        _check_int("block_size", self.block_size, minimum=1)
        if not isinstance(self.weights, CostWeights):
            raise ValueError(f"weights must be a CostWeights, got {type(self.weights).__name__}")
        if not isinstance(self.busy, BusyThresholds):
            raise ValueError(f"busy must be a BusyThresholds, got {type(self.busy).__name__}")
        _check_number("temperature", self.temperature, minimum=0.0)
        if not isinstance(self.gpu_only, bool):
            raise ValueError(f"gpu_only must be true or false, got {self.gpu_only!r}")
        _check_number("active_request_ttl", self.active_request_ttl, minimum=0.0, strict=True)
        _check_number("engine_load_stale_after", self.engine_load_stale_after, minimum=0.0, strict=True)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "router") -> RouterConfig:
        """Build from a YAML mapping; ``weights`` and ``busy`` are nested mappings."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
        data = dict(data)
        if "weights" in data:
            data["weights"] = CostWeights.from_dict(data["weights"], f"{where}.weights")
        if "busy" in data:
            data["busy"] = BusyThresholds.from_dict(data["busy"], f"{where}.busy")
        return _from_dict(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view, as shown by ``Decision.explain()``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (CostWeights, BusyThresholds)):
                value = {g.name: getattr(value, g.name) for g in fields(value)}
            out[f.name] = value
        return out


_Config = TypeVar("_Config", CostWeights, BusyThresholds, RouterConfig)


def _from_dict(cls: type[_Config], data: Mapping[str, Any], where: str) -> _Config:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _check_number(name: str, value: Any, *, minimum: float, strict: bool = False) -> None:
    # bool is an int subclass; `prefill_weight: true` in YAML is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
