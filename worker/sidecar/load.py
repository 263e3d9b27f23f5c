"""Engine load from a vLLM ``/metrics`` page (``parse_vllm_load``).

Reads the gauges the router's load terms need, per data-parallel rank (vLLM V1 labels
each engine core's gauges with ``engine="<rank>"``; pages without the label are rank 0):

* ``vllm:num_requests_running``, ``vllm:num_requests_waiting``;
* ``vllm:kv_cache_usage_perc`` (V1, a 0..1 fraction despite its name), falling back to
  ``vllm:gpu_cache_usage_perc`` (older vLLM and simulators that kept the old name).

Several samples for one rank (one per served model name) are summed, KV usage takes
the highest. Pure: text in, numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


class LoadParseError(ValueError):
    """The page is not Prometheus text or carries none of vLLM's load gauges."""


@dataclass(slots=True)
class EngineLoad:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0


def parse_vllm_load(text: str) -> dict[int, EngineLoad]:
    """Load per dp rank; raises ``LoadParseError`` when nothing usable is on the page."""
    running: dict[int, float] = {}
    waiting: dict[int, float] = {}
    usage: dict[str, dict[int, float]] = {name: {} for name in KV_USAGE}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == RUNNING:
                    target = running
                elif sample.name == WAITING:
                    target = waiting
                elif sample.name in usage:
                    per_rank = usage[sample.name]
                    rank = _rank(sample.labels)
                    per_rank[rank] = max(per_rank.get(rank, 0.0), sample.value)
                    continue
                else:
                    continue
                rank = _rank(sample.labels)
                target[rank] = target.get(rank, 0.0) + sample.value
    except ValueError as err:
        raise LoadParseError(f"not Prometheus text: {err}") from None
    kv = next((usage[name] for name in KV_USAGE if usage[name]), {})
    ranks = set(running) | set(waiting) | set(kv)
    if not ranks:
        raise LoadParseError(f"no {RUNNING}, {WAITING} or KV usage gauge on the page")
    return {
        rank: EngineLoad(
            running=_count(running.get(rank, 0.0)),
            waiting=_count(waiting.get(rank, 0.0)),
            kv_usage=min(1.0, max(0.0, kv.get(rank, 0.0))),
        )
        for rank in sorted(ranks)
    }


def _rank(labels: dict[str, str]) -> int:
    try:
        return max(0, int(labels.get("engine", 0)))
    except ValueError:
        return 0


def _count(value: float) -> int:
    return max(0, int(round(value))) if value == value else 0
