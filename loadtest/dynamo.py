"""kvgate beside NVIDIA Dynamo 1.6.1 (the peer), on the same prompts, in one run.

    python -m kvgate.loadtest.dynamo --workload multi-turn --requests 300 --workers 4 --out reports/dynamo

For each workload and engine speed (``--speedup-ratios``), and each routing mode
(``--modes``), it starts one front end at a time on fresh processes, drives the same
seeded requests through it and stops everything it started, by PID:

* **Dynamo**: etcd + NATS (the binaries kvgate's tests use), ``python -m dynamo.mocker``
  with ``--num-workers N`` and ``python -m dynamo.frontend --router-mode MODE``, from
  their own virtualenv (``make dynamo``: ``.venv/dynamo``);
* **kvgate**: N simulated workers and ``python -m kvgate.gateway --router-mode MODE``
  (``loadtest.stack``). The workers are ``python -m kvgate.dev.cached_sim``: the simulator with
  its prompts encoded through the gateway's prefix cache (the same ids as a whole encode), since
  Dynamo's mocker receives ids and never tokenizes, and the workers share the cores with the
  front end; ``--whole-encode-workers`` runs ``kvgate.worker.sim`` itself, which encodes every
  prompt whole as vLLM does.

Both engines are sized alike (16,384 GPU blocks of 64 tokens, 8,192 batched tokens per
step, 256 sequences, the same speedup ratio; the sim's step timing is the mocker's
polynomial) and both front ends serve the same model directory (DeepSeek V3's 128k
tokenizer and one chat template). Per front end it reports the front-end process's CPU
time per request (utime + stime from ``/proc/<pid>/stat``, the process and its
descendants), TTFT at concurrency 1 and at load, E2E, the share of prompt tokens served
from cache (``usage.prompt_tokens_details.cached_tokens``, which both report), and for
kvgate the TTFT of the same kind of requests sent straight to one worker (the TTFT the
gateway adds) and any ``/metrics`` sample whose name contains ``loop`` (the gateway's
event-loop lag, when it exports one).

Workloads: ``multi-turn`` (issue 14: streamed multi-turn chat, ~2.4k-token prompts),
``long-prompt`` (single-message 8k-token first turns) and ``prefix-ratio`` (the shape of
Dynamo's own router benchmark, ``benchmarks/router/prefix_ratio_benchmark.py``: each
prompt one of 20 shared prefixes of ``isl * ratio`` tokens plus a random suffix of mean
``isl * (1 - ratio)``, standard deviation a quarter of that; outputs of mean ``osl``,
standard deviation ``osl / 4``). The assistant turns of a conversation are fixed seeded
text, not the engine's reply, so both front ends see byte-identical prompts.

The pure parts (``/proc`` accounting, request generation, summaries, ratios, the table,
argument parsing) are unit-tested without Dynamo installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kvgate.dev.cluster import Etcd, Nats
from kvgate.dev.launch import Service, free_port, stop_all
from kvgate.loadtest.corpus import Vocabulary, load_tokenizer
from kvgate.loadtest.driver import observer, send
from kvgate.loadtest.scrape import parse_metrics
from kvgate.loadtest.stack import REPO, Stack, StackConfig, repo_relative
from kvgate.loadtest.stream import RequestRecord
from kvgate.loadtest.workloads import (
    CHAT_PATH,
    MultiTurnSession,
    RequestSpec,
    WorkloadConfig,
    chat_body,
)

DYNAMO_VENV = REPO / ".venv" / "dynamo"
MODEL_DIR = REPO / ".venv" / "dynamo-model"
WORKLOADS = ("multi-turn", "long-prompt", "prefix-ratio")
FRONT_ENDS = ("dynamo", "kvgate")
MODES = ("kv", "round-robin")

# A DeepSeek-V3-format chat template written for this bench (DeepSeek's own file is not
# shipped with the tokenizer): BOS, the system text, then <｜User｜> / <｜Assistant｜>
# turns, each assistant turn closed by the end-of-sentence token. Text only.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


# --------------------------------------------------------------------------- model directory


def write_model_files(model_dir: Path) -> None:
    """tokenizer_config.json (with the chat template), config.json, generation_config.json beside tokenizer.json."""
    if not (model_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{model_dir}/tokenizer.json is missing: run `make dynamo` first")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "bos_token": "<｜begin▁of▁sentence｜>",
        "eos_token": "<｜end▁of▁sentence｜>",
        "pad_token": "<｜▁pad▁｜>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    # The front ends read max_position_embeddings and the special token ids; no weights exist.
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 129280,
        "max_position_embeddings": 32768,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    files = {
        "tokenizer_config.json": tokenizer_config,
        "config.json": config,
        "generation_config.json": {"bos_token_id": 0, "eos_token_id": 1},
    }
    for name, body in files.items():
        (model_dir / name).write_text(json.dumps(body, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- CPU accounting


def stat_fields(stat_text: str) -> tuple[int, int, int]:
    """(ppid, utime, stime) in clock ticks from one ``/proc/<pid>/stat`` line.

    The command name (field 2) is in parentheses and may itself hold spaces and
    parentheses, so the fields are counted from the last ``)``.
    """
    rest = stat_text[stat_text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    return int(rest[1]), int(rest[11]), int(rest[12])


def tree_ticks(root: int, stats: Mapping[int, str]) -> int:
    """utime + stime of ``root`` and all its descendants, given every process's stat line."""
    parsed = {pid: stat_fields(text) for pid, text in stats.items()}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in parsed.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in parsed:
            continue
        seen.add(pid)
        total += parsed[pid][1] + parsed[pid][2]
        todo += children.get(pid, [])
    return total


def read_stats() -> dict[int, str]:
    stats: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
    return stats


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants."""
    return tree_ticks(pid, read_stats()) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class BenchConfig:
    workloads: tuple[str, ...] = ("multi-turn",)
    requests: int = 300
    c1_requests: int = 20
    workers: int = 4
    concurrency: int | None = None  # at load; default: workers (prefix-ratio: Dynamo's 20)
    speedup_ratios: tuple[float, ...] = (1000.0, 1.0)
    modes: tuple[str, ...] = ("kv",)
    front_ends: tuple[str, ...] = FRONT_ENDS
    seed: int = 0
    max_tokens: int = 32
    first_turn_tokens: int = 2200
    turn_tokens: int = 48
    turns: int = 6
    long_prompt_tokens: int = 8000
    isl: int = 14000
    osl: int = 200
    prefix_ratio: float = 0.5
    num_prefix_prompts: int = 20
    prefix_concurrency: int = 20
    num_gpu_blocks: int = 16384
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    block_size: int = 64
    direct: bool = True
    cached_workers: bool = True  # kvgate.dev.cached_sim, else kvgate.worker.sim (see the module docstring)
    loop_probe: bool = False  # kvgate's gateway times every loop callback (--loop-probe: asyncio's loop)
    out: Path = Path("reports/dynamo")
    model_dir: Path = MODEL_DIR
    dynamo_python: Path = DYNAMO_VENV / "bin" / "python"
    startup_timeout_s: float = 120.0

    def load_concurrency(self, workload: str) -> int:
        if self.concurrency is not None:
            return self.concurrency
        return self.prefix_concurrency if workload == "prefix-ratio" else self.workers


def _split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal counts, larger first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def multi_turn_streams(
    vocabulary: Vocabulary, config: BenchConfig, model: str, users: int, total: int, seed: int
) -> list[list[RequestSpec]]:
    """Each user's requests in order: conversations whose assistant turns are fixed seeded text."""
    wc = WorkloadConfig(
        seed=seed,
        max_tokens=config.max_tokens,
        turns=config.turns,
        first_turn_tokens=config.first_turn_tokens,
        turn_tokens=config.turn_tokens,
    )
    streams = []
    for user, count in enumerate(_split(total, users)):
        session = MultiTurnSession(user, vocabulary, wc, model)
        reply_rng = random.Random(f"dynamo-bench-reply:{seed}:{user}")
        specs = []
        for _ in range(count):
            specs.append(session.next_request())
            session.observe(vocabulary.text(reply_rng, config.max_tokens))
        streams.append(specs)
    return streams


def long_prompt_streams(
    vocabulary: Vocabulary, config: BenchConfig, model: str, users: int, total: int, seed: int
) -> list[list[RequestSpec]]:
    """Fresh single-message prompts of ``long_prompt_tokens`` tokens (a first turn: nothing to reuse)."""
    rng = random.Random(f"long-prompt:{seed}")
    specs = [
        RequestSpec(
            "long-prompt",
            CHAT_PATH,
            chat_body(
                model,
                [{"role": "user", "content": vocabulary.text(rng, config.long_prompt_tokens)}],
                config.max_tokens,
            ),
            turn=i,
        )
        for i in range(total)
    ]
    return _deal(specs, users)


def _gauss_len(rng: random.Random, mean: float, sd: float) -> int:
    return max(1, round(rng.gauss(mean, sd)))


def prefix_ratio_streams(
    vocabulary: Vocabulary, config: BenchConfig, model: str, users: int, total: int, seed: int
) -> list[list[RequestSpec]]:
    """Dynamo's router-benchmark shape: one of ``num_prefix_prompts`` shared prefixes + a random suffix."""
    prefix_len = int(config.isl * config.prefix_ratio)
    suffix_mean = config.isl * (1 - config.prefix_ratio)
    prefixes = [
        vocabulary.text(random.Random(f"prefix-ratio:prefix:{config.seed}:{p}"), prefix_len)
        for p in range(config.num_prefix_prompts)
    ]
    rng = random.Random(f"prefix-ratio:{seed}")
    specs = []
    for i in range(total):
        prefix = prefixes[rng.randrange(len(prefixes))]
        suffix = vocabulary.text(rng, _gauss_len(rng, suffix_mean, round(suffix_mean / 4)))
        out = _gauss_len(rng, config.osl, round(config.osl / 4))
        body = chat_body(model, [{"role": "user", "content": prefix + suffix}], out)
        specs.append(RequestSpec("prefix-ratio", CHAT_PATH, body, turn=i))
    return _deal(specs, users)


def _deal(specs: Sequence[RequestSpec], users: int) -> list[list[RequestSpec]]:
    """Round-robin ``specs`` over ``users`` closed-loop streams, keeping their order."""
    streams: list[list[RequestSpec]] = [[] for _ in range(users)]
    for i, spec in enumerate(specs):
        spec.user = i % users
        streams[i % users].append(spec)
    return streams


STREAMS: dict[str, Callable[..., list[list[RequestSpec]]]] = {
    "multi-turn": multi_turn_streams,
    "long-prompt": long_prompt_streams,
    "prefix-ratio": prefix_ratio_streams,
}


@dataclass
class Phases:
    """The request streams of one (workload, speed) cell; every front end gets these same ones."""

    c1: list[list[RequestSpec]]  # one stream: TTFT at concurrency 1
    load: list[list[RequestSpec]]  # one stream per concurrent user
    direct: list[list[RequestSpec]]  # kvgate only: concurrency 1 straight to one worker (its own prompts)
    # kvgate only: concurrency 1 through the gateway, each request paired with the direct one of the same index
    # (sent one after the other, so the pair sees the same machine): the added TTFT
    paired: list[list[RequestSpec]] = field(default_factory=list)


def build_phases(vocabulary: Vocabulary, config: BenchConfig, workload: str, model: str) -> Phases:
    make = STREAMS[workload]
    s = config.seed
    return Phases(
        c1=make(vocabulary, config, model, 1, config.c1_requests, s + 1000),
        load=make(
            vocabulary, config, model, min(config.load_concurrency(workload), config.requests), config.requests, s
        ),
        direct=make(vocabulary, config, model, 1, config.c1_requests, s + 2000),
        paired=make(vocabulary, config, model, 1, config.c1_requests, s + 3000),
    )


# --------------------------------------------------------------------------- summaries


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_records(records: Sequence[RequestRecord]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s * 1000 for r in ok if r.e2e_s is not None]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    with_usage = [r for r in ok if r.cached_tokens is not None]
    cached = sum(r.cached_tokens or 0 for r in with_usage)
    usage_prompt = sum(r.prompt_tokens or 0 for r in with_usage)
    errors = [r.error for r in records if not r.ok]
    return {
        "requests": len(records),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "e2e_p50_ms": percentile(e2e, 50),
        "e2e_p99_ms": percentile(e2e, 99),
        "prompt_tokens_mean": prompt / len(ok) if ok else None,
        "cached_fraction": cached / usage_prompt if usage_prompt else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def loop_samples(metrics_text: str) -> dict[str, float]:
    """Every Prometheus sample whose metric name contains ``loop`` (the gateway's event-loop lag), and how
    many long prompts were routed on their head alone."""
    found: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        metric = name.split("{", 1)[0]
        if "loop" in metric or metric == "kvgate_tokenizer_head_encodes_total":
            try:
                found[name] = float(value)
            except ValueError:
                continue
    return found


# kvgate_routing_overhead_seconds' stages; "forward" is all of them, arrival to worker.
STAGES = ("tokenize", "hash", "match", "score", "forward")


def stage_means(metrics_text: str) -> dict[str, float]:
    """The gateway's mean time per request in each routing stage (``kvgate_routing_overhead_seconds``), in ms;
    ``forward`` is all of it: from a request's arrival until it is sent to a worker."""
    snap = parse_metrics(metrics_text)
    means: dict[str, float] = {}
    for stage in STAGES:
        count = snap.get(f'kvgate_routing_overhead_seconds_count{{stage="{stage}"}}')
        seconds = snap.get(f'kvgate_routing_overhead_seconds_sum{{stage="{stage}"}}')
        if count and seconds is not None:
            means[stage] = 1000 * seconds / count
    return means


@dataclass
class RunResult:
    """One front end in one mode on one (workload, speed) cell."""

    workload: str
    speedup_ratio: float
    front_end: str
    mode: str
    cpu_s: float = 0.0
    requests_through_front_end: int = 0
    c1: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    direct: dict[str, Any] | None = None
    paired_ttft_diffs_ms: list[float] = field(default_factory=list)
    """Per pair (a request through the gateway, one straight to a worker, sent back to back): the difference
    of their TTFTs."""
    load_duration_s: float = 0.0
    loop_metrics: dict[str, float] = field(default_factory=dict)
    paired_stages_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def cpu_ms_per_request(self) -> float | None:
        if not self.requests_through_front_end:
            return None
        return self.cpu_s * 1000 / self.requests_through_front_end

    @property
    def added_ttft_ms(self) -> float | None:
        """The median of the paired differences when there are pairs; else kvgate's gateway TTFT p50 at
        concurrency 1 minus a worker's own (direct) p50 (two phases a minute apart: a machine whose speed
        drifts between them moves that difference by a few ms)."""
        if self.paired_ttft_diffs_ms:
            return percentile(self.paired_ttft_diffs_ms, 50)
        if self.direct is None:
            return None
        a, b = self.c1.get("ttft_p50_ms"), self.direct.get("ttft_p50_ms")
        return None if a is None or b is None else a - b

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_ms_per_request"] = self.cpu_ms_per_request
        d["added_ttft_ms"] = self.added_ttft_ms
        return d


COMPARED = (
    ("cpu_ms_per_request", "CPU ms/req"),
    ("c1.ttft_p50_ms", "TTFT p50 c=1"),
    ("c1.ttft_p99_ms", "TTFT p99 c=1"),
    ("load.ttft_p50_ms", "TTFT p50 load"),
    ("load.ttft_p99_ms", "TTFT p99 load"),
    ("load.e2e_p50_ms", "E2E p50 load"),
    ("load.e2e_p99_ms", "E2E p99 load"),
    ("load.cached_fraction", "cached"),
)


def figure(run: RunResult, key: str) -> float | None:
    if key == "cpu_ms_per_request":
        return run.cpu_ms_per_request
    phase, _, name = key.partition(".")
    value = getattr(run, phase).get(name)
    return None if value is None else float(value)


def comparisons(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """kvgate / Dynamo for every figure, per (workload, speed, mode) where both ran."""
    by_cell: dict[tuple[str, float, str], dict[str, RunResult]] = {}
    for run in runs:
        by_cell.setdefault((run.workload, run.speedup_ratio, run.mode), {})[run.front_end] = run
    out = []
    for (workload, speed, mode), pair in by_cell.items():
        if "kvgate" in pair and "dynamo" in pair:
            k, d = pair["kvgate"], pair["dynamo"]
            out.append(
                {
                    "workload": workload,
                    "speedup_ratio": speed,
                    "mode": mode,
                    "kvgate_over_dynamo": {key: ratio(figure(k, key), figure(d, key)) for key, _ in COMPARED},
                }
            )
    return out


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    if unit == "%":
        return f"{value * 100:.1f}%"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def markdown(runs: Sequence[RunResult], notes: Sequence[str] = ()) -> str:
    lines = ["# kvgate beside Dynamo 1.6.1", ""]
    lines += [f"- {n}" for n in notes]
    cells: dict[tuple[str, float], list[RunResult]] = {}
    for run in runs:
        cells.setdefault((run.workload, run.speedup_ratio), []).append(run)
    ratios = {(c["workload"], c["speedup_ratio"], c["mode"]): c["kvgate_over_dynamo"] for c in comparisons(runs)}
    for (workload, speed), cell in cells.items():
        lines += ["", f"## {workload}, speedup ratio {speed:g}", ""]
        header = ["front end", "mode", "requests", "errors", *(label for _, label in COMPARED), "added TTFT ms"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for run in cell:
            values = [_fmt(figure(run, key), "%" if key.endswith("fraction") else "") for key, _ in COMPARED]
            row = [
                run.front_end,
                run.mode,
                str(run.load.get("requests", 0) + run.c1.get("requests", 0)),
                str(run.load.get("errors", 0) + run.c1.get("errors", 0)) if run.error is None else run.error[:60],
                *values,
                _fmt(run.added_ttft_ms),
            ]
            lines.append("| " + " | ".join(row) + " |")
        for mode in dict.fromkeys(r.mode for r in cell):
            r = ratios.get((workload, speed, mode))
            if r:
                parts = [f"{label} {_fmt(r[key])}" for key, label in COMPARED]
                lines += ["", f"kvgate / Dynamo ({mode}): " + ", ".join(parts)]
        for run in cell:
            if run.loop_metrics:
                shown = [
                    f"{name.removeprefix('kvgate_event_loop_')} {value * 1e3:.1f} ms"
                    if name.endswith("_seconds")
                    else f"{name.removeprefix('kvgate_event_loop_').removeprefix('kvgate_tokenizer_')} {value:g}"
                    for name, value in sorted(run.loop_metrics.items())
                ]
                lines += ["", f"{run.front_end} {run.mode} event loop and heads: " + ", ".join(shown)]
            if run.paired_stages_ms:
                stages = run.paired_stages_ms
                parts = [f"{stage} {stages[stage]:.2f}" for stage in STAGES[:-1] if stage in stages]
                lines += [
                    "",
                    f"{run.front_end} {run.mode} in the pairs, before forwarding (mean ms per request): "
                    f"{_fmt(stages.get('forward'))} from arrival to the worker, of which " + ", ".join(parts),
                ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- arguments


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _names(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (got {text!r})")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m kvgate.loadtest.dynamo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workload", type=_names(WORKLOADS), default=d.workloads, help="comma-separated: " + ", ".join(WORKLOADS)
    )
    p.add_argument("--requests", type=int, default=d.requests, help="requests at load, per front end and cell")
    p.add_argument(
        "--c1-requests",
        type=int,
        default=d.c1_requests,
        help="requests at concurrency 1 (and pairs direct / through kvgate)",
    )
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--concurrency", type=int, default=None, help="users at load (default: --workers; prefix-ratio: 20)")
    p.add_argument("--speedup-ratios", type=_floats, default=d.speedup_ratios, help="engine speeds, e.g. 1000,1")
    p.add_argument("--modes", type=_names(MODES), default=d.modes, help="kv and/or round-robin")
    p.add_argument("--front-ends", type=_names(FRONT_ENDS), default=d.front_ends)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--first-turn-tokens", type=int, default=d.first_turn_tokens)
    p.add_argument("--turn-tokens", type=int, default=d.turn_tokens)
    p.add_argument("--turns", type=int, default=d.turns)
    p.add_argument("--long-prompt-tokens", type=int, default=d.long_prompt_tokens)
    p.add_argument("--isl", type=int, default=d.isl, help="prefix-ratio: input tokens")
    p.add_argument("--osl", type=int, default=d.osl, help="prefix-ratio: mean output tokens")
    p.add_argument("--prefix-ratio", type=float, default=d.prefix_ratio)
    p.add_argument("--num-prefix-prompts", type=int, default=d.num_prefix_prompts)
    p.add_argument("--prefix-concurrency", type=int, default=d.prefix_concurrency)
    p.add_argument("--num-gpu-blocks", type=int, default=d.num_gpu_blocks)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--no-direct", dest="direct", action="store_false", help="skip the paired phase (no added TTFT)")
    p.add_argument(
        "--whole-encode-workers",
        dest="cached_workers",
        action="store_false",
        help="kvgate's workers encode every prompt whole, as vLLM does (default: through the prefix cache, "
        "like Dynamo's mocker, which gets ids: the workers share the host's cores with the front end)",
    )
    p.add_argument(
        "--loop-probe",
        action="store_true",
        help="run kvgate's gateway with --loop-probe (asyncio's loop, every callback's CPU timed): reports the "
        "longest single callback beside the loop-lag figures; CPU and latency figures of such a run are not uvloop's",
    )
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--model-dir", type=Path, default=d.model_dir)
    p.add_argument("--dynamo-python", type=Path, default=d.dynamo_python)
    return p


def parse_config(argv: Sequence[str] | None = None) -> BenchConfig:
    a = build_parser().parse_args(argv)
    if a.requests < 1 or a.c1_requests < 1 or a.workers < 1:
        raise SystemExit("--requests, --c1-requests and --workers must be >= 1")
    if not 0 < a.prefix_ratio < 1:
        raise SystemExit("--prefix-ratio must be in (0, 1)")
    if any(s <= 0 for s in a.speedup_ratios):
        raise SystemExit("--speedup-ratios must be > 0")
    return BenchConfig(
        workloads=a.workload,
        requests=a.requests,
        c1_requests=a.c1_requests,
        workers=a.workers,
        concurrency=a.concurrency,
        speedup_ratios=a.speedup_ratios,
        modes=a.modes,
        front_ends=a.front_ends,
        seed=a.seed,
        max_tokens=a.max_tokens,
        first_turn_tokens=a.first_turn_tokens,
        turn_tokens=a.turn_tokens,
        turns=a.turns,
        long_prompt_tokens=a.long_prompt_tokens,
        isl=a.isl,
        osl=a.osl,
        prefix_ratio=a.prefix_ratio,
        num_prefix_prompts=a.num_prefix_prompts,
        prefix_concurrency=a.prefix_concurrency,
        num_gpu_blocks=a.num_gpu_blocks,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_num_seqs=a.max_num_seqs,
        direct=a.direct,
        cached_workers=a.cached_workers,
        loop_probe=a.loop_probe,
        out=a.out,
        model_dir=a.model_dir,
        dynamo_python=a.dynamo_python,
    )


# --------------------------------------------------------------------------- running


def spread(urls: Sequence[str]) -> Callable[[RequestSpec], str]:
    """Where a router that keeps a conversation on its worker and spreads new work would send each request,
    for the direct phase: a multi-turn conversation's later turns go where its first went, and anything
    else (a conversation's first turn, a single prompt) to the next worker in turn. So a worker reached
    directly serves what it would through the gateway, no more warmed by repetition than there."""
    turn = 0
    where: dict[int, str] = {}

    def place(spec: RequestSpec) -> str:
        nonlocal turn
        if spec.workload != "multi-turn" or spec.turn == 0 or spec.user not in where:
            where[spec.user] = urls[turn % len(urls)]
            turn += 1
        return where[spec.user]

    return place


async def drive(
    base_url: str | Callable[[RequestSpec], str],
    streams: Sequence[Sequence[RequestSpec]],
    timeout_s: float = 600.0,
) -> list[RequestRecord]:
    """Closed loop: each stream is one user sending its requests in order; every record kept. ``base_url``
    may choose per request (``spread``)."""
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    place = base_url if callable(base_url) else (lambda spec: base_url)

    async def user(stream: Sequence[RequestSpec], http: aiohttp.ClientSession) -> None:
        for spec in stream:
            records.append(await send(http, place(spec), spec, observer(spec), t0, timeout_s))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(1, len(streams)))) as http:
        await asyncio.gather(*(user(s, http) for s in streams))
    return records


async def drive_pairs(
    place: Callable[[RequestSpec], str],
    gateway_url: str,
    direct: Sequence[RequestSpec],
    through: Sequence[RequestSpec],
    timeout_s: float = 600.0,
) -> tuple[list[RequestRecord], list[RequestRecord], list[float]]:
    """Concurrency 1, alternating: direct[i] to the worker ``place`` picks, through[i] via the gateway, the
    first of each pair alternating between the two. Returns both sides' records and, for every pair where
    both succeeded, the gateway's TTFT minus the direct one (ms)."""
    direct_records: list[RequestRecord] = []
    through_records: list[RequestRecord] = []
    diffs: list[float] = []
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        for i, (d, g) in enumerate(zip(direct, through, strict=True)):
            sends = [(place(d), d, direct_records), (gateway_url, g, through_records)]
            for url, spec, records in sends if i % 2 == 0 else reversed(sends):
                records.append(await send(http, url, spec, observer(spec), t0, timeout_s))
            a, b = direct_records[-1], through_records[-1]
            if a.ok and b.ok and a.ttft_s is not None and b.ttft_s is not None:
                diffs.append((b.ttft_s - a.ttft_s) * 1000)
    return direct_records, through_records, diffs


def _get(url: str, timeout: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode(errors="replace") if resp.status == 200 else None
    except (urllib.error.URLError, OSError):
        return None


def _wait(what: str, check: Callable[[], bool], alive: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if not alive():
            raise RuntimeError(f"{what}: a process exited during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s")
        time.sleep(0.25)


class DynamoStack:
    """etcd + NATS + one ``dynamo.mocker`` process with N workers + ``dynamo.frontend``."""

    def __init__(self, config: BenchConfig, mode: str, speedup: float, log_dir: Path, model: str):
        self.config, self.mode, self.speedup, self.log_dir, self.model = config, mode, speedup, log_dir, model
        self.services: list[Service] = []
        self.url = ""
        self.frontend_pid = 0

    def __enter__(self) -> DynamoStack:
        c = self.config
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            etcd, nats = Etcd(self.log_dir), Nats(self.log_dir)
            self.services += [etcd, nats]
            etcd.start()
            nats.start()
            etcd.wait_healthy(30)
            nats.wait_healthy(30)
            env = {
                "DYN_DISCOVERY_BACKEND": "etcd",
                "DYN_EVENT_PLANE": "nats",
                "DYN_REQUEST_PLANE": "tcp",
                "ETCD_ENDPOINTS": f"http://{etcd.endpoint}",
                "NATS_SERVER": nats.url,
                "DYN_LOG": "warn",
                "HF_HUB_OFFLINE": "1",
            }
            py = str(c.dynamo_python)
            mocker = Service(
                "mocker",
                [
                    py, "-m", "dynamo.mocker",
                    "--model-path", c.model_dir,
                    "--model-name", self.model,
                    "--num-workers", c.workers,
                    "--speedup-ratio", self.speedup,
                    "--num-gpu-blocks-override", c.num_gpu_blocks,
                    "--block-size", c.block_size,
                    "--max-num-batched-tokens", c.max_num_batched_tokens,
                    "--max-num-seqs", c.max_num_seqs,
                ],
                self.log_dir,
                env=env,
            )  # fmt: skip
            port = free_port()
            frontend = Service(
                "frontend",
                [
                    py, "-m", "dynamo.frontend",
                    "--router-mode", self.mode,
                    "--http-host", "127.0.0.1",
                    "--http-port", port,
                    "--kv-cache-block-size", c.block_size,
                ],
                self.log_dir,
                env=env,
            )  # fmt: skip
            self.services += [mocker, frontend]
            mocker.start()
            frontend.start()
            self.url = f"http://127.0.0.1:{port}"
            _wait(
                "Dynamo",
                lambda: self._workers_seen() >= c.workers,
                lambda: mocker.alive() and frontend.alive(),
                c.startup_timeout_s,
            )
            time.sleep(1.0)
            assert frontend.pid is not None
            self.frontend_pid = frontend.pid
        except BaseException:
            self.stop()
            raise
        return self

    def _workers_seen(self) -> int:
        models = _get(self.url + "/v1/models")
        if models is None or self.model not in models:
            return 0
        # The frontend's worker-count gauge when it exports one, else the model listing.
        metrics = _get(self.url + "/metrics") or ""
        for line in metrics.splitlines():
            if line.startswith(("dynamo_frontend_model_workers", "dynamo_frontend_worker_count")):
                return int(float(line.rsplit(" ", 1)[1]))
        return self.config.workers

    def stop(self) -> None:
        frontends = [s for s in self.services if s.name in ("frontend", "mocker")]
        stop_all(reversed(frontends))
        stop_all([s for s in self.services if s not in frontends])

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_cell_front_end(
    config: BenchConfig, phases: Phases, workload: str, speed: float, front_end: str, mode: str, model: str
) -> RunResult:
    result = RunResult(workload, speed, front_end, mode)
    log_dir = config.out / "logs" / f"{workload}-x{speed:g}-{front_end}-{mode}"
    if front_end == "dynamo":
        stack_cm: Any = DynamoStack(config, mode, speed, log_dir, model)
    else:
        stack_cm = Stack(
            StackConfig(
                workers=config.workers,
                model=str(config.model_dir),
                block_size=config.block_size,
                num_gpu_blocks=config.num_gpu_blocks,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=32768,
                speedup_ratio=speed,
                seed=config.seed,
                startup_timeout_s=config.startup_timeout_s,
                worker_module="kvgate.dev.cached_sim" if config.cached_workers else "kvgate.worker.sim",
                gateway_args=("--loop-probe",) if config.loop_probe else (),
            ),
            mode,
            log_dir,
        )
    label = f"[{workload} x{speed:g} {front_end} {mode}]"
    with stack_cm as stack:
        if front_end == "dynamo":
            url, pid = stack.url, stack.frontend_pid
            if config.direct:
                # The same requests kvgate's gateway serves in its pairs, so both front ends come to the
                # measured phases equally warm.
                print(f"{label} warm-up, concurrency 1", file=sys.stderr, flush=True)
                asyncio.run(drive(url, phases.paired))
        else:
            url = stack.gateway_url
            pid = next(c.pid for c in stack.children if c.name == "gateway")
            if config.direct:
                print(
                    f"{label} pairs: direct to a worker / through the gateway, concurrency 1",
                    file=sys.stderr,
                    flush=True,
                )
                place = spread([stack.worker_urls[w] for w in sorted(stack.worker_urls)])
                direct, _, diffs = asyncio.run(drive_pairs(place, url, phases.direct[0], phases.paired[0]))
                result.direct = summarize_records(direct)
                result.paired_ttft_diffs_ms = diffs
                # The pairs are the first requests through this gateway: its stage means are theirs.
                result.paired_stages_ms = stage_means(_get(url + "/metrics") or "")
        before = cpu_seconds(pid)
        print(f"{label} concurrency 1: {config.c1_requests} requests", file=sys.stderr, flush=True)
        c1 = asyncio.run(drive(url, phases.c1))
        print(f"{label} load: {config.requests} requests, concurrency {len(phases.load)}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        load = asyncio.run(drive(url, phases.load))
        result.load_duration_s = time.perf_counter() - t
        result.cpu_s = cpu_seconds(pid) - before
        result.requests_through_front_end = len(c1) + len(load)
        result.c1, result.load = summarize_records(c1), summarize_records(load)
        if front_end == "kvgate":
            result.loop_metrics = loop_samples(_get(url + "/metrics") or "")
    print(
        f"{label} cpu {_fmt(result.cpu_ms_per_request)} ms/req, TTFT p50 c1 {_fmt(result.c1['ttft_p50_ms'])} "
        f"load {_fmt(result.load['ttft_p50_ms'])} ms, cached {_fmt(result.load['cached_fraction'], '%')}, "
        f"errors {result.c1['errors'] + result.load['errors']} {result.load['first_error'] or ''}",
        file=sys.stderr,
        flush=True,
    )
    return result


def notes(config: BenchConfig) -> list[str]:
    return [
        f"workers {config.workers}; per worker {config.num_gpu_blocks} GPU blocks of {config.block_size} tokens, "
        f"{config.max_num_batched_tokens} batched tokens, {config.max_num_seqs} sequences",
        f"{config.c1_requests} requests at concurrency 1, {config.requests} at load; seed {config.seed}",
        "kvgate's workers encode prompts "
        + (
            "through the prefix cache (kvgate.dev.cached_sim; Dynamo's mocker gets ids)"
            if config.cached_workers
            else "whole, as vLLM does (kvgate.worker.sim)"
        ),
        "CPU ms/req: the front-end process (and descendants), utime + stime over both phases, per request",
        "cached: usage.prompt_tokens_details.cached_tokens / prompt_tokens at load",
        "added TTFT: the median, over pairs of requests sent back to back at concurrency 1 (one through kvgate's "
        "gateway, one of the same kind straight to a worker: a conversation to one worker, new conversations and "
        "single prompts to the next in turn), of the gateway's TTFT minus the worker's",
        *(
            ["kvgate's gateway ran with --loop-probe: asyncio's loop (not uvloop), every callback's CPU timed"]
            if config.loop_probe
            else []
        ),
        f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs "
        "(client, front end and engines share them)",
    ]


def write_results(config: BenchConfig, runs: Sequence[RunResult]) -> None:
    config.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "runs": [r.to_json() for r in runs],
        "comparisons": comparisons(runs),
    }
    (config.out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    (config.out / "report.md").write_text(markdown(runs, notes(config)))


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    if "dynamo" in config.front_ends and not config.dynamo_python.exists():
        print(f"{config.dynamo_python} not found: run `make dynamo` first", file=sys.stderr)
        return 2
    write_model_files(config.model_dir)
    model = config.model_dir.name
    vocabulary = Vocabulary.from_tokenizer(load_tokenizer(str(config.model_dir)))
    runs: list[RunResult] = []
    for workload in config.workloads:
        phases = build_phases(vocabulary, config, workload, model)
        for speed in config.speedup_ratios:
            for mode in config.modes:
                for front_end in config.front_ends:
                    try:
                        runs.append(run_cell_front_end(config, phases, workload, speed, front_end, mode, model))
                    except (RuntimeError, TimeoutError, OSError) as err:
                        print(f"{workload} x{speed:g} {front_end} {mode}: {err}", file=sys.stderr)
                        runs.append(RunResult(workload, speed, front_end, mode, error=str(err).splitlines()[0]))
                    write_results(config, runs)
    print((config.out / "report.md").read_text())
    return 0 if all(r.error is None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
