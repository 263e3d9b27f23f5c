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

from kvgate.protocol.hashing import DEFAULT_BLOCK_SIZE

RouterMode = Literal["kv", "round-robin", "random"]
ROUTER_MODES: tuple[str, ...] = get_args(RouterMode)


@dataclass(frozen=True, slots=True)
class SpeedConfig:
    """Seeds and learning settings of the ``kv`` cost model, which predicts each
    candidate's time to first token (router/README.md has the formula; ``speed.py``
    learns the rates online).

    Seeds are what a worker is assumed to deliver before it has answered anything:

    * ``prefill_tokens_per_s``: 20,000, a mid-sized model on one GPU (Llama-3-8B on an
      H100 prefills 15-40k tokens/s; the simulated worker's mocker timing gives ~42k at
      2,048-token steps and ~48k at 8,192); learned per worker within ``bound``x;
    * ``overhead_ms``: the fixed part of a first token (the engine's step, the network);
    * ``cpu_block_ms`` / ``disk_block_ms``: loading one 64-token block back from the CPU
      / disk tier: 8 MiB for Llama-3-8B (2 x 32 layers x 8 KV heads x 128 dims x 2 bytes x
      64 tokens) at 25 GB/s (PCIe 4.0 x16) = 0.34 ms, and at 10 GB/s (two NVMe 4.0 drives
      striped) = 0.84 ms (tests/test_tier_cost.py recomputes them from ``worker.sim``);
    * ``decode_slowdown``: per-token prefill time grows by this factor times the
      worker's KV usage, because decode work shares each engine step (the mocker's decode
      term adds 6-34 ms to a ~50-170 ms prefill step as usage goes 0 -> 1: ~0.3).

    ``max_decode_slowdown`` caps the learned slowdown (the mocker's decode term is at most
    ~0.7 of a prefill step). A worker's own rates fade into the fleet's with half-life
    ``forget_after_s`` when it stops answering, so one that looked slow is tried again.
    ``smoothing`` is the weight of one answer in each moving average; ``bound`` keeps
    every learned rate within [seed / bound, seed x bound]; ``min_sample_tokens`` is the
    prefill work below which an answer teaches the overhead instead of the rate.

    ``hold_seconds`` seeds how long a request keeps its KV blocks on its worker (sent to
    finished), learned per worker as a moving average of its answers: the memory term
    predicts how soon a full KV pool frees room from it (router/README.md).
    """

    prefill_tokens_per_s: float = 20_000.0
    overhead_ms: float = 20.0
    cpu_block_ms: float = 0.34
    disk_block_ms: float = 0.84
    decode_slowdown: float = 0.3
    learn: bool = True
    learn_decode_slowdown: bool = True
    max_decode_slowdown: float = 1.0
    forget_after_s: float = 60.0
    smoothing: float = 0.1
    bound: float = 50.0
    min_sample_tokens: int = 256
    hold_seconds: float = 2.0

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "bound", "forget_after_s", "hold_seconds"):
            _check_number(name, getattr(self, name), minimum=0.0, strict=True)
        for name in ("overhead_ms", "cpu_block_ms", "disk_block_ms", "decode_slowdown", "max_decode_slowdown"):
            _check_number(name, getattr(self, name), minimum=0.0)
        _check_number("smoothing", self.smoothing, minimum=0.0, strict=True)
        if self.smoothing > 1.0:
            raise ValueError(f"smoothing is the weight of one sample, in (0, 1]; got {self.smoothing}")
        if self.bound < 1.0:
            raise ValueError(f"bound must be >= 1 (rates stay within seed / bound .. seed x bound), got {self.bound}")
        for name in ("learn", "learn_decode_slowdown"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_int("min_sample_tokens", self.min_sample_tokens, minimum=0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "speed") -> SpeedConfig:
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

    ``temperature`` is in seconds of predicted TTFT: with T > 0 a worker predicted T
    slower than the best one is e times less likely to be picked; 0 always picks the
    cheapest. ``gpu_only`` ignores the CPU / disk tiers (blocks held only there count as
    absent), the baseline the tier benchmark compares against.

    ``added_work_weight``: the cost is the predicted TTFT plus this times the request's
    own prefill time there: compute it adds to that worker delays later requests, so of
    two workers giving about the same TTFT the one reusing more cache wins (a burst
    sharing a new prefix follows its first request; a hot prefix replicates once its
    holder's queue costs more than 1.5 recomputes). 0.5 was chosen by the benchmark suite
    (loadtest/README.md): against 0 it cached 100 % of the pooled-LRU oracle on bursts
    (87-89 %) and cut multi-turn TTFT p90 to 0.63x round-robin (0.68x), at a burst p50
    of 1.17x round-robin at 4/s (1.05x).

    ``running_work_weight``: plus this times the request's own prefill time per request
    already in flight on that worker: the engine runs a new prefill in the steps that
    decode its running requests, so every one of them waits that long for its next token.
    0.05 (twenty running requests weigh one more recompute) keeps long new prefills off a
    worker that is decoding a pile of requests, while a short cached suffix barely pays
    it. On bursts of 8 sharing a new 4k-token document at 8/s (2 workers), kv piled the
    bursts' decodes onto the holder: 40-50 requests in flight there, each new document
    stalling them all, TTFT p90 / p99 1.29x / 1.09x round-robin's at 0; 1.00x / 0.83x at
    0.05. The trace replay at real speed did not move (p50 / p90 / p99 74 / 401 / 762 ms
    against 77 / 399 / 761); 0.25 there took kv's p90 / p99 from 0.69x / 0.81x round-robin's
    to 0.81x / 0.91x.

    ``predict_sent``: a routed prompt's blocks count as held by its worker at once, for
    ``prediction_ttl`` seconds unless the engine's events confirm or remove them first
    (``indexer/predictions.py``). ``approximate`` routes without KV events (the gateway's
    ``--kv-events off``): predictions are then the whole model of each worker's cache,
    living ``approximate_prediction_ttl`` seconds, at most ``prediction_capacity_blocks``
    per worker rank (set it to the engines' GPU block count).

    ``memory_wait``: a request whose blocks do not fit in a worker's free KV pool waits
    there until running requests free enough of it (vLLM admits a request only when its
    blocks can be allocated, and preempts when they run out), so the predicted TTFT adds
    that wait: until the longest-running requests there, each expected to finish the
    worker's learned ``hold_seconds`` after it was sent, have freed enough. The pool is
    the size the engine reports (``vllm:cache_config_info``), else
    ``prediction_capacity_blocks``; held blocks are the engine's KV usage (less the blocks
    of this router's requests that finished since it reported) or the blocks of the
    requests in flight there, whichever is more.
    """

    mode: RouterMode = "kv"
    block_size: int = DEFAULT_BLOCK_SIZE
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    added_work_weight: float = 0.5
    running_work_weight: float = 0.05
    temperature: float = 0.0
    gpu_only: bool = False
    busy: BusyThresholds = field(default_factory=BusyThresholds)
    predict_sent: bool = True
    prediction_ttl: float = 20.0
    approximate: bool = False
    approximate_prediction_ttl: float = 600.0
    prediction_capacity_blocks: int = 16_384
    memory_wait: bool = True
    # Leak protection only: the gateway frees every request it begins; a TTL this long
    # outlives any sane generation, so it never frees a request that is still running.
    active_request_ttl: float = 600.0
    engine_load_stale_after: float = 10.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ROUTER_MODES:
            raise ValueError(f"mode must be one of {', '.join(ROUTER_MODES)}; got {self.mode!r}")
        _check_int("block_size", self.block_size, minimum=1)
        if not isinstance(self.speed, SpeedConfig):
            raise ValueError(f"speed must be a SpeedConfig, got {type(self.speed).__name__}")
        if not isinstance(self.busy, BusyThresholds):
            raise ValueError(f"busy must be a BusyThresholds, got {type(self.busy).__name__}")
        _check_number("temperature", self.temperature, minimum=0.0)
        _check_number("added_work_weight", self.added_work_weight, minimum=0.0)
        _check_number("running_work_weight", self.running_work_weight, minimum=0.0)
        if not isinstance(self.gpu_only, bool):
            raise ValueError(f"gpu_only must be true or false, got {self.gpu_only!r}")
        for name in ("predict_sent", "approximate", "memory_wait"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_number("prediction_ttl", self.prediction_ttl, minimum=0.0, strict=True)
        _check_number("approximate_prediction_ttl", self.approximate_prediction_ttl, minimum=0.0, strict=True)
        _check_int("prediction_capacity_blocks", self.prediction_capacity_blocks, minimum=1)
        _check_number("active_request_ttl", self.active_request_ttl, minimum=0.0, strict=True)
        _check_number("engine_load_stale_after", self.engine_load_stale_after, minimum=0.0, strict=True)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "router") -> RouterConfig:
        """Build from a YAML mapping; ``speed`` and ``busy`` are nested mappings."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
        data = dict(data)
        if "speed" in data:
            data["speed"] = SpeedConfig.from_dict(data["speed"], f"{where}.speed")
        if "busy" in data:
            data["busy"] = BusyThresholds.from_dict(data["busy"], f"{where}.busy")
        return _from_dict(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view, as shown by ``Decision.explain()``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (SpeedConfig, BusyThresholds)):
                value = {g.name: getattr(value, g.name) for g in fields(value)}
            out[f.name] = value
        return out


_Config = TypeVar("_Config", SpeedConfig, BusyThresholds, RouterConfig)


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
