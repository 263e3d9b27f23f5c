"""Prometheus ``/metrics`` snapshots of the gateway and the workers, and what changed.

Owns parsing the text exposition into flat ``{'name{label="v",...}': value}``
snapshots, the before/after deltas, and the figures the report takes from
them: the workers' prefix-cache hit rate (``vllm:prefix_cache_hits_total`` over
``vllm:prefix_cache_queries_total``, both in tokens, as vLLM defines them) and, from
simulated workers, the hit rate per cache tier (``kvgate_sim_cached_tokens_total{tier}``
over the same queries; with tiers, vLLM's own hit counter holds the GPU's hits only).
The fetch itself is a small asyncio edge.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Snapshot = dict[str, float]

PREFIX_HITS = "vllm:prefix_cache_hits_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
TIER_CACHED = "kvgate_sim_cached_tokens_total"
EXTERNAL_QUERIES = "vllm:external_prefix_cache_queries_total"
TIERS = ("gpu", "cpu", "disk")


def parse_metrics(text: str) -> Snapshot:
    snap: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue  # creation timestamps, not measurements
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            snap[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return snap


def sample_name(key: str) -> str:
    return key.split("{", 1)[0]


def delta(before: Snapshot, after: Snapshot) -> Snapshot:
    """after - before for every sample present after (a sample new since ``before`` counts from 0)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def total(snap: Mapping[str, float], name: str) -> float:
    return sum(v for k, v in snap.items() if sample_name(k) == name)


def prefix_hit_rate(worker_deltas: Mapping[str, Snapshot]) -> float | None:
    """Token-weighted prefix-cache hit rate over all workers; None if no worker reported queries."""
    hits = sum(total(d, PREFIX_HITS) for d in worker_deltas.values())
    queries = sum(total(d, PREFIX_QUERIES) for d in worker_deltas.values())
    return hits / queries if queries > 0 else None


def tier_hit_rates(worker_deltas: Mapping[str, Snapshot]) -> dict[str, float] | None:
    """Token-weighted hit rate per tier over all workers; None unless a worker has lower
    tiers (it then reports vLLM's connector counters, ``vllm:external_prefix_cache_*``)."""
    if not any(sample_name(k) == EXTERNAL_QUERIES for d in worker_deltas.values() for k in d):
        return None
    queries = sum(total(d, PREFIX_QUERIES) for d in worker_deltas.values())
    cached = dict.fromkeys(TIERS, 0.0)
    seen = False
    for d in worker_deltas.values():
        for key, value in d.items():
            if sample_name(key) == TIER_CACHED:
                tier = key.partition('tier="')[2].partition('"')[0]
                if tier in cached:
                    cached[tier] += value
                    seen = True
    return {t: v / queries for t, v in cached.items()} if seen and queries > 0 else None


async def fetch_metrics(session: aiohttp.ClientSession, base_url: str) -> Snapshot:
    async with session.get(base_url.rstrip("/") + "/metrics") as resp:
        resp.raise_for_status()
        return parse_metrics(await resp.text())


async def fetch_all(session: aiohttp.ClientSession, urls: Mapping[str, str]) -> dict[str, Snapshot]:
    """Snapshots by name; an endpoint that does not answer gives an empty snapshot (it is reported, not fatal)."""
    out: dict[str, Snapshot] = {}
    for name, url in urls.items():
        try:
            out[name] = await fetch_metrics(session, url)
        except (aiohttp.ClientError, OSError, ValueError):
            out[name] = {}
    return out
