"""Engine load from a vLLM ``/metrics`` page: the one reader of vLLM's Prometheus text.

``parse_engine_load`` turns the page into running / waiting request counts and KV-cache
usage per data-parallel rank. vLLM V1 labels each engine core's gauges with
``engine="<rank>"``; a page without the label is rank 0. It reads:

* ``vllm:num_requests_running`` and ``vllm:num_requests_waiting``;
* ``vllm:kv_cache_usage_perc`` (V1, a 0..1 fraction despite its name), or the older
  ``vllm:gpu_cache_usage_perc`` on pages that lack it (vLLM before 0.10, simulators);
* ``vllm:cache_config_info``'s ``num_gpu_blocks`` and ``block_size`` labels: the size of
  the engine's GPU KV pool in tokens (None when the page lacks them).

Several samples of one rank (one per served model name) add up; KV usage takes the
highest. The gateway (scraping a worker itself) and the sidecar (scraping its engine
for the NATS load message) both read load through here, so they can never disagree on
what a page says. Pure: text in, numbers out; never fetches a page.

A real vLLM page is ~65 KB and ~750 lines, almost all histograms kvgate never reads;
Prometheus' text parser takes ~8 ms over all of it, on the event loop, once per worker
per scrape. So the page is first cut down to the sample lines of the gauges above (a
substring search per name) and only those few lines are parsed, by the small exact reader
of the text format's sample lines below (Prometheus' own took ~0.7 ms over them, most of it
on the cache config's ~40 labels; this one ~0.03 ms).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
# Newest name first: a page carrying both (vLLM's deprecation window) is read by the new one.
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
CACHE_CONFIG = "vllm:cache_config_info"


class EngineMetricsError(ValueError):
    """The page is not Prometheus text, holds an impossible load value, or no complete rank."""


class EngineLoad(NamedTuple):
    """One rank's load as its engine reports it."""

    running: int
    waiting: int
    kv_usage: float
    """Fraction of the KV cache in use, 0..1."""
    capacity_tokens: int | None = None
    """Tokens the engine's GPU KV pool holds (``num_gpu_blocks`` x ``block_size``), if the page says."""


def parse_engine_load(text: str, dp_size: int) -> dict[int, EngineLoad]:
    """``{dp_rank: EngineLoad}`` for the ranks ``0 .. dp_size-1`` the page fully reports.

    A rank needs both request gauges (a missing one is unknown, not zero); KV usage
    defaults to 0 and is clamped to 0..1. Ranks outside the worker's ``dp_size`` are
    ignored. Raises ``EngineMetricsError`` when no rank is complete, on text that is
    not Prometheus, and on a negative or non-finite count or a non-finite usage.
    """
    running: dict[int, float] = {}
    waiting: dict[int, float] = {}
    usage: dict[str, dict[int, float]] = {name: {} for name in KV_USAGE}
    capacity: dict[int, int] = {}
    for name, labels, value in _samples(_load_lines(text)):
        if name != RUNNING and name != WAITING and name not in usage:
            if name == CACHE_CONFIG:
                tokens = _pool_tokens(labels)
                rank = _rank(labels)
                if tokens is not None and 0 <= rank < dp_size:
                    capacity[rank] = tokens
            continue
        rank = _rank(labels)
        if not 0 <= rank < dp_size:
            continue
        if name in usage:
            if not math.isfinite(value):
                raise EngineMetricsError(f"{name} is {value}")
            per_rank = usage[name]
            per_rank[rank] = max(per_rank.get(rank, 0.0), value)
            continue
        if not math.isfinite(value) or value < 0:
            raise EngineMetricsError(f"{name} is {value}, not a count")
        counts = running if name == RUNNING else waiting
        counts[rank] = counts.get(rank, 0.0) + value
    kv = next((usage[name] for name in KV_USAGE if usage[name]), {})
    ranks = sorted(set(running) & set(waiting))
    if not ranks:
        raise EngineMetricsError(f"no rank below {dp_size} with both {RUNNING} and {WAITING}")
    return {
        rank: EngineLoad(
            round(running[rank]),
            round(waiting[rank]),
            min(1.0, max(0.0, kv.get(rank, 0.0))),
            capacity.get(rank),
        )
        for rank in ranks
    }


def _pool_tokens(labels: dict[str, str]) -> int | None:
    """``num_gpu_blocks`` x ``block_size`` from the cache config's labels; None unless both are positive integers."""
    try:
        blocks, size = int(labels["num_gpu_blocks"]), int(labels["block_size"])
    except (KeyError, ValueError):
        return None
    return blocks * size if blocks > 0 and size > 0 else None


_LOAD_NAMES = (RUNNING, WAITING, *KV_USAGE, CACHE_CONFIG)


def _load_lines(text: str) -> str:
    """The page's sample lines of the load gauges, in page order, and nothing else."""
    page = "\n" + text
    found: list[tuple[int, str]] = []
    for name in _LOAD_NAMES:
        needle = "\n" + name
        at = page.find(needle)
        while at >= 0:
            start = at + 1
            after = at + len(needle)
            end = page.find("\n", after)
            if end < 0:
                end = len(page)
            # The name itself, not a longer one it begins (vllm:num_requests_waiting_by_reason).
            if after < len(page) and page[after] in "{ \t":
                found.append((start, page[start:end]))
            at = page.find(needle, end)
    found.sort()
    return "".join(line + "\n" for _, line in found)


# A sample line of the text format: name, optional {labels}, value, optional timestamp.
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+-?[0-9]+)?[ \t]*")
# One label pair and the comma after it; values escape backslash, double quote and newline.
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"[ \t]*(?:,|$)')
_UNESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"n": "\n", "\\": "\\", '"': '"'}


def _samples(lines: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample line; EngineMetricsError on a line that is not one."""
    samples = []
    for line in lines.splitlines():
        found = _SAMPLE.fullmatch(line)
        if found is None:
            raise EngineMetricsError(f"not Prometheus text: {line[:80]!r}")
        name, inner, raw = found.groups()
        labels: dict[str, str] = {}
        if inner:
            at = 0
            while at < len(inner):
                pair = _LABEL.match(inner, at)
                if pair is None or pair.end() == at:
                    raise EngineMetricsError(f"not Prometheus text: bad labels in {line[:80]!r}")
                key, quoted = pair.groups()
                labels[key] = _UNESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), quoted)
                at = pair.end()
        try:
            value = float(raw)
        except ValueError:
            raise EngineMetricsError(f"not Prometheus text: value {raw[:40]!r}") from None
        samples.append((name, labels, value))
    return samples


def _rank(labels: dict[str, str]) -> int:
    # A label that is not a number cannot name another rank: it is the only engine.
    try:
        return int(labels.get("engine", 0))
    except ValueError:
        return 0
