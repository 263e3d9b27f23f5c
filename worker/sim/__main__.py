"""``python -m kvgate.worker.sim``: run one simulated vLLM worker (see worker/README.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kvgate.worker.sim.config import (
    LLAMA3_8B_KV_BYTES_PER_TOKEN,
    AnswerConfig,
    EngineConfig,
    KvEventsConfig,
    SimConfig,
    TierConfig,
)

if TYPE_CHECKING:
    from kvgate.worker.sim.prompt import PromptRenderer

_E, _K, _A, _T = EngineConfig(), KvEventsConfig(), AnswerConfig(), TierConfig()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvgate.worker.sim",
        description="A simulated vLLM worker: vLLM's OpenAI HTTP API, a paged KV cache with prefix caching, "
        "continuous batching with chunked prefill, Dynamo-mocker step timing, and vLLM's "
        "KV-event stream on ZMQ. No GPU, no weights: answers are deterministic words.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    http = p.add_argument_group("HTTP server")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on")
    http.add_argument("--port", type=int, default=8000, help="port to listen on")
    http.add_argument(
        "--model-dir",
        type=Path,
        required=True,
        help="model directory with the tokenizer and chat template (e.g. models/kvgate-tiny)",
    )
    http.add_argument(
        "--served-model-name", default=None, help="model name in the API (default: basename of --model-dir)"
    )
    http.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="render a request's own chat_template (as vLLM's flag); without it such requests get a 400",
    )
    eng = p.add_argument_group("engine")
    eng.add_argument("--block-size", type=int, default=_E.block_size, help="tokens per KV block")
    eng.add_argument("--num-gpu-blocks", type=int, default=_E.num_gpu_blocks, help="KV blocks in the GPU pool")
    eng.add_argument("--max-num-seqs", type=int, default=_E.max_num_seqs, help="most requests running at once")
    eng.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=_E.max_num_batched_tokens,
        help="token budget of one engine step (prefill chunks + decodes)",
    )
    eng.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context window, prompt + output tokens (default: the model's max_position_embeddings, "
        "capped at the KV cache capacity); an explicit value above the capacity is an error",
    )
    eng.add_argument(
        "--speedup-ratio",
        type=float,
        default=_E.speedup_ratio,
        help="divide every simulated step time by this (100 = a hundred times faster than the model)",
    )
    eng.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the engine's block hashes (default: random per process, like vLLM without "
        "PYTHONHASHSEED); answers never depend on it",
    )
    tier = p.add_argument_group("KV-cache tiers below the GPU (a tiered offloading connector)")
    tier.add_argument(
        "--cpu-blocks",
        type=int,
        default=_T.cpu_blocks,
        help="blocks in the CPU tier: GPU evictions are offloaded here (LRU); 0 = no CPU tier",
    )
    tier.add_argument(
        "--disk-blocks",
        type=int,
        default=_T.disk_blocks,
        help="blocks in the disk tier: CPU evictions move here (LRU), its own evictions are dropped; 0 = no disk tier",
    )
    tier.add_argument(
        "--bytes-per-block",
        type=int,
        default=None,
        help=f"KV bytes of one block, for load times (default: Llama-3-8B's "
        f"{LLAMA3_8B_KV_BYTES_PER_TOKEN} bytes per token x --block-size = 8 MiB at 64 tokens)",
    )
    tier.add_argument(
        "--cpu-bandwidth-gbps",
        type=float,
        default=_T.cpu_bandwidth_gbps,
        help="CPU -> GPU load bandwidth in GB/s (10^9 bytes/s; PCIe 4.0 x16)",
    )
    tier.add_argument(
        "--disk-bandwidth-gbps",
        type=float,
        default=_T.disk_bandwidth_gbps,
        help="disk -> GPU load bandwidth in GB/s (two PCIe 4.0 NVMe drives striped)",
    )
    tier.add_argument(
        "--tier-event-style",
        choices=("tokenless", "full"),
        default=_T.event_style,
        help="CPU/DISK BlockStored events: tokenless = only hashes the GPU already announced "
        "(vLLM's OffloadingConnector); full = with tokens and parent (LMCache-style)",
    )
    ans = p.add_argument_group("simulated answers")
    ans.add_argument(
        "--answer-min-tokens",
        type=int,
        default=_A.min_tokens,
        help="shortest answer before the model emits EOS (unless max_tokens, stop or ignore_eos)",
    )
    ans.add_argument("--answer-max-tokens", type=int, default=_A.max_tokens, help="longest such answer")
    ev = p.add_argument_group("KV events (vLLM's ZMQ publisher)")
    ev.add_argument(
        "--kv-events-endpoint",
        default=None,
        help="ZMQ PUB endpoint, as vLLM's: tcp://*:5557 binds (so do ipc://, inproc://), "
        "tcp://HOST:5557 connects to a subscriber bound there (default: no events)",
    )
    ev.add_argument(
        "--kv-events-replay-endpoint",
        default=None,
        help="ZMQ ROUTER endpoint (always bound) for replaying recent batches, e.g. tcp://*:5558",
    )
    ev.add_argument("--kv-events-topic", default=_K.topic, help="topic frame of every published batch")
    ev.add_argument(
        "--event-encoding",
        choices=("map", "array"),
        default=_K.encoding,
        help="map: tagged maps (vLLM >= 0.26); array: legacy tagged arrays",
    )
    ev.add_argument(
        "--kv-events-buffer-steps", type=int, default=_K.buffer_steps, help="published batches kept for replay"
    )
    ev.add_argument("--kv-events-hwm", type=int, default=_K.hwm, help="ZMQ high-water mark of the PUB socket")
    p.add_argument("--log-level", default="INFO", help="logging level")
    return p


def _model_max_len(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def config_from_args(args: argparse.Namespace) -> SimConfig:
    capacity = args.num_gpu_blocks * args.block_size
    max_model_len = args.max_model_len
    if max_model_len is None:
        max_model_len = min(_model_max_len(args.model_dir) or capacity, capacity)
    engine = EngineConfig(
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_model_len,
        speedup_ratio=args.speedup_ratio,
        seed=args.seed,
        tiers=TierConfig(
            cpu_blocks=args.cpu_blocks,
            disk_blocks=args.disk_blocks,
            bytes_per_block=args.bytes_per_block,
            cpu_bandwidth_gbps=args.cpu_bandwidth_gbps,
            disk_bandwidth_gbps=args.disk_bandwidth_gbps,
            event_style=args.tier_event_style,
        ),
    )
    events = KvEventsConfig(
        endpoint=args.kv_events_endpoint,
        replay_endpoint=args.kv_events_replay_endpoint,
        topic=args.kv_events_topic,
        encoding=args.event_encoding,
        buffer_steps=args.kv_events_buffer_steps,
        hwm=args.kv_events_hwm,
    )
    if events.replay_endpoint and not events.endpoint:
        raise ValueError("--kv-events-replay-endpoint needs --kv-events-endpoint")
    if events.buffer_steps <= 0:
        raise ValueError("--kv-events-buffer-steps must be positive")
    if events.hwm < 0:
        raise ValueError("--kv-events-hwm must be >= 0 (0: no limit)")
    config = SimConfig(
        model_dir=args.model_dir,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        engine=engine,
        events=events,
        answer=AnswerConfig(args.answer_min_tokens, args.answer_max_tokens),
        trust_request_chat_template=args.trust_request_chat_template,
    )
    engine.validate()
    config.answer.validate()
    return config


def main(argv: list[str] | None = None, renderer: Callable[[Path], PromptRenderer] | None = None) -> None:
    """``renderer``: builds the prompt renderer from the model directory (default: whole encodes, as vLLM)."""
    p = parser()
    args = p.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        p.error(str(exc))
    if not args.model_dir.is_dir():
        p.error(f"--model-dir {args.model_dir} is not a directory")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Imported late: transformers is slow to import and --help should not wait for it.
    import zmq
    from aiohttp import web

    from kvgate.worker.sim.server import build_app

    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        import asyncio

        loop = asyncio.new_event_loop()
    try:
        app = build_app(config, renderer(config.model_dir) if renderer is not None else None)
    except (OSError, ValueError, zmq.ZMQError) as exc:  # unreadable tokenizer, event endpoint in use, ...
        sys.exit(f"worker.sim: {exc}")
    e = config.engine
    logging.getLogger("kvgate.worker.sim").info(
        "serving %s on http://%s:%d  blocks=%d x %d  max_num_seqs=%d  max_num_batched_tokens=%d  "
        "max_model_len=%d  speedup=%g  events=%s  cpu_blocks=%d  disk_blocks=%d",
        config.model_name,
        config.host,
        config.port,
        e.num_gpu_blocks,
        e.block_size,
        e.max_num_seqs,
        e.max_num_batched_tokens,
        e.max_model_len,
        e.speedup_ratio,
        config.events.endpoint or "off",
        e.tiers.cpu_blocks,
        e.tiers.disk_blocks,
    )
    try:
        web.run_app(
            app,
            host=config.host,
            port=config.port,
            handler_cancellation=True,
            access_log=None,
            print=None,
            shutdown_timeout=2.0,
            loop=loop,
        )
    except OSError as exc:  # the HTTP port is taken
        sys.exit(f"worker.sim: cannot listen on {config.host}:{config.port}: {exc}")


if __name__ == "__main__":
    main()
