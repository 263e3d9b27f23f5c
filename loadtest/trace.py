"""Mooncake-format trace replay: read the trace, schedule arrivals, turn hash ids into text.

A Mooncake trace line is ``{"timestamp": ms, "input_length": tokens,
"output_length": tokens, "hash_ids": [...]}`` where each hash id names one
512-token block of the prompt and equal ids mean equal prefixes. Traces made with
another block size (Dynamo's and aiperf's generators take one) are read at the size
every line agrees with (``trace_block_tokens``); timestamps may be fractional ms, and
other fields (``session_id``, ``delay``, ...) are ignored.

Replay choice: prompts are sent as *strings* to ``/v1/completions`` (every
OpenAI server accepts them, and the gateway tokenizes exactly what a worker
would). Each hash id maps, through a generator seeded by ``(seed, hash id)``,
to a fixed run of single-token words (see ``corpus.Vocabulary``), so a block of
B tokens is exactly B tokens after the real tokenizer, and requests that share
their leading hash ids share a real token prefix. The last block of a request
is the first words of its id's block, cut to the request's input length.

``length_scale`` shrinks every block (512 -> round(512 * scale) tokens), so a
40k-token trace prompt can become 5k tokens on a small machine while keeping
its block structure; 0.125 turns each trace block into exactly one 64-token
router block. ``time_scale`` multiplies the gaps between arrivals (0.5 replays
twice as fast); ``max_requests`` and ``max_duration_s`` cap the replay.

Pure and synchronous: nothing here opens a socket.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kvgate.loadtest.corpus import Vocabulary

TRACE_BLOCK_TOKENS = 512
DEFAULT_TRACE = Path(__file__).resolve().parent / "traces" / "mooncake_synthetic_trace.jsonl"


class TraceError(ValueError):
    """A trace line that is not a valid Mooncake record."""


@dataclass(frozen=True)
class TraceRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    block_tokens: int = TRACE_BLOCK_TOKENS  # the trace's tokens per hash id


@dataclass(frozen=True)
class ReplayConfig:
    time_scale: float = 1.0
    length_scale: float = 1.0
    output_scale: float = 1.0
    max_requests: int | None = None
    max_duration_s: float | None = None
    skip: int = 0

    def __post_init__(self) -> None:
        if self.time_scale <= 0 or self.length_scale <= 0 or self.output_scale <= 0:
            raise ValueError("time_scale, length_scale and output_scale must be > 0")
        if self.max_requests is not None and self.max_requests < 0:
            raise ValueError("max_requests must be >= 0")
        if self.skip < 0:
            raise ValueError("skip must be >= 0")

    @property
    def block_tokens(self) -> int:
        """Tokens a 512-token trace block becomes (``scaled_block`` for a trace of another size)."""
        return self.scaled_block(TRACE_BLOCK_TOKENS)

    def scaled_block(self, trace_block_tokens: int) -> int:
        return max(1, round(trace_block_tokens * self.length_scale))


@dataclass(frozen=True)
class Arrival:
    """One request of the replay: when to send it (seconds after the start) and what it is."""

    index: int
    offset_s: float
    request: TraceRequest


def parse_line(line: str, lineno: int = 0) -> TraceRequest:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"line {lineno}: not JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise TraceError(f"line {lineno}: expected an object")
    try:
        ts, inp, out, ids = raw["timestamp"], raw["input_length"], raw["output_length"], raw["hash_ids"]
    except KeyError as exc:
        raise TraceError(f"line {lineno}: missing field {exc.args[0]!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (inp, out)):
        raise TraceError(f"line {lineno}: input_length/output_length must be non-negative integers")
    if not (isinstance(ts, (int, float)) and not isinstance(ts, bool) and 0 <= ts < float("inf")):
        raise TraceError(f"line {lineno}: timestamp must be a non-negative number of ms")
    if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in ids):
        raise TraceError(f"line {lineno}: hash_ids must be a list of integers")
    if inp < 1 or not ids:
        raise TraceError(f"line {lineno}: empty prompt")
    if len(ids) > inp:
        raise TraceError(f"line {lineno}: {len(ids)} hash ids for input_length {inp} (more blocks than tokens)")
    return TraceRequest(ts, inp, out, tuple(ids))


# Block sizes a trace may have been made with, tried when 512 does not fit every line.
_BLOCK_SIZES = (512, 16, 32, 64, 128, 256, 1024, 2048, 4096, 8192)


def _fits(request: TraceRequest, block_tokens: int) -> bool:
    return len(request.hash_ids) == -(-request.input_length // block_tokens)


def trace_block_tokens(requests: Sequence[TraceRequest]) -> int:
    """The trace's tokens per hash id: 512 (Mooncake's) when every line has ``ceil(input_length /
    512)`` ids, else the one size of ``_BLOCK_SIZES`` every line fits. A ``TraceError`` names the
    first line that 512 does not fit when no size fits them all."""
    for size in _BLOCK_SIZES:
        if all(_fits(r, size) for r in requests):
            return size
    first = next(i for i, r in enumerate(requests, 1) if not _fits(r, TRACE_BLOCK_TOKENS))
    bad = requests[first - 1]
    raise TraceError(
        f"request {first}: {len(bad.hash_ids)} hash ids for input_length {bad.input_length}, and no block size "
        f"({', '.join(map(str, _BLOCK_SIZES))}) fits every line of the trace"
    )


def load_trace(path: str | Path = DEFAULT_TRACE) -> list[TraceRequest]:
    with open(path, encoding="utf-8") as fh:
        requests = [parse_line(line, n) for n, line in enumerate(fh, 1) if line.strip()]
    size = trace_block_tokens(requests)  # 512 for an empty trace
    if size == TRACE_BLOCK_TOKENS:
        return requests
    return [replace(r, block_tokens=size) for r in requests]


def arrival_schedule(requests: Sequence[TraceRequest], config: ReplayConfig) -> list[Arrival]:
    """Arrivals relative to the first replayed request, gaps scaled, capped by count and duration."""
    chosen = requests[config.skip :]
    if config.max_requests is not None:
        chosen = chosen[: config.max_requests]
    if not chosen:
        return []
    t0 = chosen[0].timestamp_ms
    schedule: list[Arrival] = []
    for i, req in enumerate(chosen):
        offset = (req.timestamp_ms - t0) / 1000.0 * config.time_scale
        if config.max_duration_s is not None and offset >= config.max_duration_s:
            break
        schedule.append(Arrival(config.skip + i, max(0.0, offset), req))
    return schedule


class TracePrompts:
    """Hash ids -> text, deterministic in ``seed``; equal ids give equal token runs."""

    def __init__(self, vocabulary: Vocabulary, config: ReplayConfig, seed: int = 0):
        self.vocabulary = vocabulary
        self.config = config
        self.seed = seed
        self._blocks: dict[int, list[str]] = {}

    def block_words(self, hash_id: int, block_tokens: int) -> list[str]:
        """The words of a block of ``block_tokens`` (a trace's block, scaled), drawn once per hash id."""
        words = self._blocks.get(hash_id)
        if words is None:
            rng = random.Random(f"kvgate-trace:{self.seed}:{hash_id}")
            words = self.vocabulary.draw(rng, block_tokens)
            self._blocks[hash_id] = words
        return words

    def block_token_counts(self, request: TraceRequest) -> list[int]:
        """Tokens each hash id contributes: full blocks, then the remainder of the scaled length."""
        bt = self.config.scaled_block(request.block_tokens)
        full = len(request.hash_ids) - 1
        target = round(request.input_length * self.config.length_scale)
        last = min(bt, max(1, target - full * bt))
        return [bt] * full + [last]

    def prompt_tokens(self, request: TraceRequest) -> int:
        return sum(self.block_token_counts(request))

    def prompt(self, request: TraceRequest) -> str:
        parts: list[str] = []
        block = self.config.scaled_block(request.block_tokens)
        for hash_id, n in zip(request.hash_ids, self.block_token_counts(request)):
            parts.extend(self.block_words(hash_id, block)[:n])
        return "".join(parts)

    def max_tokens(self, request: TraceRequest) -> int:
        return max(1, round(request.output_length * self.config.output_scale))
