"""How fast each worker delivers a first token, learned online from what the gateway sees.

The ``kv`` cost of a candidate is its predicted time to first token (router/README.md):

    ttft = overhead + tier_load
           + (queued_tokens + uncached_tokens) * seconds_per_token * (1 + decode_slowdown * kv_usage)

Each term's rate is a ``WorkerSpeed``: seeded from ``SpeedConfig``, then moved by every
answer (``observe``):

* ``seconds_per_token`` and ``overhead`` (per worker): a least-squares line through the
  worker's answers, TTFT (less tier loads) against its prefill work (the tokens queued
  ahead of it at send time plus its own uncached tokens as the engine reported them,
  times the decode slowdown factor), over exponentially weighted sums (each answer's
  weight decays by ``1 - smoothing`` per later answer); the overhead is the engine's
  first step, the network and the gateway. The overhead is fitted from the answers sent
  with nothing queued ahead (a queued answer's work overstates what was left of the queue)
  and a prior answer of the seed overhead at no work, which fades as their work spreads;
  the rate from all answers. So with every prompt about the same size the rate, not the
  overhead, carries what a prompt (and a queue of them) costs. Predictions use each
  worker's own rate and the fleet's mean overhead (``predicting``);
* ``decode_slowdown`` (the fleet's, one figure): decode load makes every engine step
  longer, so prefill runs slower on a worker busy generating; each sample's ratio of
  observed to predicted per-token time nudges it (the sign of the error times the
  worker's KV usage), so decode counts only through its measured effect on speed;
* ``tier block seconds`` (per tier, the fleet's): samples whose prefix came from one lower
  tier give ``residual / blocks``.

Once a worker has answered ``_WARM_SAMPLES`` times, an answer further than 3x from its
prediction counts as 3x off: one stalled answer cannot swing the fit. Every learned
figure stays within ``[seed / bound, seed * bound]`` (overheads and tier
costs within ``[0, seed * bound]``), and a worker that slows down is seen within about
``1 / smoothing`` answers. Pure and synchronous.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvgate.protocol.events import Tier, WorkerKey
from kvgate.router.config import SpeedConfig

__all__ = ["WorkerSpeed", "SpeedModel", "Sample"]

_WARM_SAMPLES = 10
"""Answers after which a worker's fit is established and single answers are limited."""
_OUTLIER = 3.0
"""How far from the prediction (either way) one answer may pull an established fit."""
_OWN_SAMPLES = 3
_PRIOR_WEIGHT = 2.0
"""Weight, in answers, of the seed overhead at no work in each worker's line (see ``_fit``)."""
"""Answers after which a worker is predicted with its own rates rather than the fleet's."""


@dataclass(slots=True)
class WorkerSpeed:
    """One worker's learned rates (seconds) and the weighted sums they are fitted from."""

    seconds_per_token: float
    overhead: float
    samples: int = 0
    updated: float = 0.0
    """Clock time of its last answer."""
    # Exponentially weighted sums over samples of x = effective work tokens, y = TTFT
    # (less tier loads): weight, x, y, x*x, x*y.
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    # The same sums over answers sent with nothing queued ahead on the worker: their work is
    # exactly their own. A queued answer's work counts the whole queue, though the engine may
    # have done most of it by then, so those answers' x overstates the work and a line through
    # them is too flat; the line's shape (overhead) is fitted from these, the rate from all.
    cw: float = 0.0
    csx: float = 0.0
    csy: float = 0.0
    csxx: float = 0.0
    csxy: float = 0.0
    hold: float = 0.0
    """Moving average of seconds from sending a request to its finish (0: none yet)."""
    hold_samples: int = 0

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds_per_token

    def add(self, x: float, y: float, keep: float, queued: bool = False) -> None:
        self.w = self.w * keep + 1.0
        self.sx = self.sx * keep + x
        self.sy = self.sy * keep + y
        self.sxx = self.sxx * keep + x * x
        self.sxy = self.sxy * keep + x * y
        if not queued:
            self.cw = self.cw * keep + 1.0
            self.csx = self.csx * keep + x
            self.csy = self.csy * keep + y
            self.csxx = self.csxx * keep + x * x
            self.csxy = self.csxy * keep + x * y


@dataclass(frozen=True, slots=True)
class Sample:
    """One answered request, as the router saw it."""

    key: WorkerKey
    ttft: float
    """Seconds from sending to the first byte of the answer."""
    work_tokens: int
    """Prefill tokens ahead of and including this request's own uncached tokens."""
    kv_usage: float
    cpu_blocks: int = 0
    disk_blocks: int = 0
    queued_tokens: int = 0
    """Of ``work_tokens``, those of requests queued ahead of it when it was sent."""


@dataclass(slots=True)
class SpeedModel:
    config: SpeedConfig
    workers: dict[str, WorkerSpeed] = field(default_factory=dict)
    decode_slowdown: float = 0.0
    tier_block_seconds: list[float] = field(default_factory=list)
    samples: int = 0
    rejected: int = 0
    clock: Callable[[], float] = time.monotonic
    _fleet: tuple[WorkerSpeed, int] | None = None  # (the fleet's rates, at self.samples)

    def __post_init__(self) -> None:
        c = self.config
        self.decode_slowdown = c.decode_slowdown
        self.tier_block_seconds = [0.0, c.cpu_block_ms / 1e3, c.disk_block_ms / 1e3]

    # -- prediction ------------------------------------------------------------------------

    def speed(self, worker_id: str) -> WorkerSpeed:
        """The worker's rates (its seed until it has answered)."""
        s = self.workers.get(worker_id)
        if s is None:
            c = self.config
            s = self.workers[worker_id] = WorkerSpeed(1.0 / c.prefill_tokens_per_s, c.overhead_ms / 1e3)
        return s

    def block_seconds(self, tier: Tier) -> float:
        return self.tier_block_seconds[tier]

    def predicting(self, worker_id: str) -> WorkerSpeed:
        """The rates to predict ``worker_id`` with: its own once it has answered
        ``_OWN_SAMPLES`` times, else the fleet's (the mean over workers that have, else the
        seeds), so a new worker is neither favoured nor shunned for a guess. Its own rates
        fade into the fleet's as they age (half-life ``forget_after_s``): a worker that
        looked slow once and so got no traffic is tried again instead of starved for good."""
        own = self.speed(worker_id)
        fleet = self._fleet_rates()
        if own.samples < _OWN_SAMPLES:
            return fleet
        # Every worker is predicted with the fleet's overhead: the fixed part of a first token
        # (the network, the engine's step) is alike across a fleet, and each worker's own
        # estimate of it wanders by tens of ms (it is fitted from noisy answers), which put
        # identical workers' costs apart and unbalanced prompts nobody holds. Speeds differ
        # through the rate.
        age = self.clock() - own.updated
        keep = 0.5 ** (age / self.config.forget_after_s) if age > 0.0 else 1.0
        rate = own.seconds_per_token
        if keep <= 0.999:
            rate = keep * rate + (1.0 - keep) * fleet.seconds_per_token
        return WorkerSpeed(rate, fleet.overhead, own.samples, own.updated)

    def _fleet_rates(self) -> WorkerSpeed:
        fleet = self._fleet
        if fleet is None or fleet[1] != self.samples:
            known = [s for s in self.workers.values() if s.samples >= _OWN_SAMPLES]
            if known:
                rate = sum(s.seconds_per_token for s in known) / len(known)
                overhead = sum(s.overhead for s in known) / len(known)
            else:
                c = self.config
                rate, overhead = 1.0 / c.prefill_tokens_per_s, c.overhead_ms / 1e3
            fleet = self._fleet = (WorkerSpeed(rate, overhead), self.samples)
        return fleet[0]

    def hold_seconds(self, worker_id: str) -> float:
        """How long a request keeps its KV blocks on ``worker_id``, sent to finished: its own
        average once it has finished ``_OWN_SAMPLES`` requests, else the fleet's, else the seed."""
        own = self.workers.get(worker_id)
        if own is not None and own.hold_samples >= _OWN_SAMPLES:
            return own.hold
        known = [s.hold for s in self.workers.values() if s.hold_samples >= _OWN_SAMPLES]
        return sum(known) / len(known) if known else self.config.hold_seconds

    def observe_hold(self, worker_id: str, seconds: float) -> bool:
        """A request ``worker_id`` served finished ``seconds`` after it was sent."""
        if not self.config.learn or not (0.0 < seconds < 3600.0):
            return False
        speed = self.speed(worker_id)
        seconds = min(seconds, self.config.bound * self.config.hold_seconds)
        if speed.hold_samples == 0:
            speed.hold = seconds
        else:
            speed.hold += self.config.smoothing * (seconds - speed.hold)
        speed.hold_samples += 1
        return True

    def seconds_per_token(self, worker_id: str, kv_usage: float) -> float:
        """Effective prefill seconds per token on ``worker_id`` at this KV usage."""
        return self.predicting(worker_id).seconds_per_token * (1.0 + self.decode_slowdown * kv_usage)

    # -- learning --------------------------------------------------------------------------

    def observe(self, sample: Sample) -> bool:
        """Learn from one answer; False when it taught nothing (learning off, bad figures)."""
        c = self.config
        if not c.learn:
            return False
        ttft = sample.ttft
        if not (0.0 < ttft < 3600.0) or sample.work_tokens < 0 or not 0.0 <= sample.kv_usage <= 1.0:
            self.rejected += 1
            return False
        speed = self.speed(sample.key.worker_id)
        per_block = self.tier_block_seconds
        tier = sample.cpu_blocks * per_block[Tier.CPU] + sample.disk_blocks * per_block[Tier.DISK]
        slow = 1.0 + self.decode_slowdown * sample.kv_usage
        x = sample.work_tokens * slow
        y = ttft - tier
        predicted = speed.overhead + x * speed.seconds_per_token
        if speed.samples >= _WARM_SAMPLES and predicted > 0:
            # Once the line is established, one answer can pull it at most _OUTLIER-fold:
            # a stalled answer (a GC pause, a preemption) must not swing the fit anywhere.
            y = min(predicted * _OUTLIER, max(predicted / _OUTLIER, y))
        self.samples += 1
        speed.samples += 1
        speed.updated = self.clock()
        speed.add(x, y, 1.0 - c.smoothing, queued=sample.queued_tokens > 0)
        self._fit(speed, y - predicted)
        # Decode slowdown: where KV usage is high, an answer slower than predicted says
        # decode slows prefill more than assumed, and a faster one says less.
        if c.learn_decode_slowdown and sample.kv_usage > 0.05 and x >= c.min_sample_tokens and predicted > 0:
            error = max(-1.0, min(1.0, (ttft - tier) / predicted - 1.0))
            step = c.smoothing * 0.5 * error * sample.kv_usage
            self.decode_slowdown = min(c.max_decode_slowdown, max(0.0, self.decode_slowdown + step))
        # A lower tier's load cost: from answers whose prefix came from that tier only.
        cpu, disk = sample.cpu_blocks, sample.disk_blocks
        if (cpu >= 4 or disk >= 4) and not (cpu and disk):
            kind, blocks, seed_ms = (Tier.CPU, cpu, c.cpu_block_ms) if cpu else (Tier.DISK, disk, c.disk_block_ms)
            observed = (ttft - speed.overhead - x * speed.seconds_per_token) / blocks
            current = per_block[kind]
            per_block[kind] = current + c.smoothing * (_clamp(observed, seed_ms / 1e3, c.bound, floor=0.0) - current)
        return True

    def _fit(self, speed: WorkerSpeed, residual: float) -> None:
        """Least squares of TTFT = overhead + x * seconds_per_token: the overhead from the sums
        of answers with nothing queued ahead and a prior answer of the seed overhead at x = 0,
        the rate from all answers' sums, clamped to the bounds; with little spread in x the
        overhead stays near the seed and the rate moves. An answer slower than predicted
        (``residual`` > 0) never makes the worker look faster, nor a faster one slower: the
        line may tilt within the sums, but what it predicts moves the answer's way."""
        c = self.config
        seed_rate = 1.0 / c.prefill_tokens_per_s
        seed_overhead = c.overhead_ms / 1e3
        w, sx, sy = speed.w, speed.sx, speed.sy
        mean_x = sx / w
        old_rate, old_overhead = speed.seconds_per_token, speed.overhead
        overhead = old_overhead
        # The line's overhead from the answers with nothing queued ahead (see WorkerSpeed).
        cw = speed.cw
        if speed.samples >= 3 and cw > 0:
            csx, csy, csxx, csxy = speed.csx, speed.csy, speed.csxx, speed.csxy
            mean_cx = csx / cw
            # The line is anchored by a prior answer of the seed overhead at no work, worth
            # _PRIOR_WEIGHT answers: with answers at one size of work (every prompt alike, a
            # few queued behind another) the intercept is not identified, and a free fit put
            # it at its bound (20 ms -> 580 ms) and the rate at a tenth of the truth, so a
            # queue ahead looked free. Work that spreads moves it where the answers say.
            # The prior fades as the answers' own spread of work grows past a quarter of its mean.
            spread = csxx / cw - mean_cx * mean_cx
            prior = _PRIOR_WEIGHT * min(1.0, (0.25 * mean_cx) ** 2 / spread) if spread > 0 else _PRIOR_WEIGHT
            pw = cw + prior
            px, py = csx / pw, (csy + prior * seed_overhead) / pw
            variance = csxx / pw - px * px
            if variance > 0:
                slope = (csxy / pw - px * py) / variance  # only for the intercept: the rate is fitted below
                overhead = min(seed_overhead * c.bound, max(0.0, py - slope * px))
        if mean_x >= c.min_sample_tokens:
            rate = _clamp((sy / w - overhead) / mean_x, seed_rate, c.bound)
        elif speed.samples >= 3:
            # Mostly cached prompts: the TTFT is almost all overhead.
            rate = old_rate
            overhead = min(seed_overhead * c.bound, max(0.0, sy / w - mean_x * old_rate))
        else:
            return
        if residual > 0:
            rate, overhead = max(rate, old_rate), max(overhead, old_overhead)
        elif residual < 0:
            rate, overhead = min(rate, old_rate), min(overhead, old_overhead)
        speed.seconds_per_token, speed.overhead = rate, overhead

    def forget(self, worker_id: str) -> None:
        """The worker left: one of that name coming back starts from the seed."""
        self.workers.pop(worker_id, None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "decode_slowdown": self.decode_slowdown,
            "cpu_block_ms": self.tier_block_seconds[Tier.CPU] * 1e3,
            "disk_block_ms": self.tier_block_seconds[Tier.DISK] * 1e3,
            "samples": self.samples,
            "rejected": self.rejected,
            "workers": {
                w: {
                    "prefill_tokens_per_s": s.tokens_per_second,
                    "overhead_ms": s.overhead * 1e3,
                    "samples": s.samples,
                    "hold_s": s.hold if s.hold_samples else None,
                }
                for w, s in sorted(self.workers.items())
            },
        }


def _clamp(value: float, seed: float, bound: float, *, floor: float | None = None) -> float:
    low = seed / bound if floor is None else floor
    return min(seed * bound, max(low, value))
