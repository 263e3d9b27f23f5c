"""Typed configuration of the simulated worker; every default lives here.

The CLI (``worker.sim.__main__``) only fills these in. ``EngineConfig`` is all the pure
engine needs (``TierConfig`` is its optional CPU / disk tiers); ``SimConfig`` adds the
HTTP, event-stream and answer settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Llama-3-8B's KV cache per token: K and V x 32 layers x 8 KV heads x 128 dims x 2 bytes
# (bf16) = 131,072 bytes (128 KiB), so one 64-token block is 8 MiB.
LLAMA3_8B_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2

TierEventStyle = Literal["tokenless", "full"]


@dataclass(frozen=True, slots=True)
class TierConfig:
    """CPU and disk tiers below the GPU pool (a tiered KV-cache connector); 0 blocks = no tier.

    Bandwidths are in GB/s (10^9 bytes per second), host<->GPU transfer included: the
    CPU default is PCIe 4.0 x16 in practice (~25 GB/s), the disk default two PCIe 4.0
    NVMe drives striped (~10 GB/s; one ~5 GB/s drive would load a Llama-3-8B block in
    1.68 ms, slower than the timing model recomputes it, ~1.03 ms — see router/config.py).
    ``event_style``: ``tokenless`` tier stores name only hashes the GPU already announced
    (vLLM's OffloadingConnector); ``full`` ones carry tokens and parent (LMCache-style).
    """

    cpu_blocks: int = 0
    disk_blocks: int = 0
    bytes_per_block: int | None = None  # None: Llama-3-8B's 128 KiB per token x block_size
    cpu_bandwidth_gbps: float = 25.0
    disk_bandwidth_gbps: float = 10.0
    event_style: TierEventStyle = "tokenless"

    @property
    def enabled(self) -> bool:
        return self.cpu_blocks > 0 or self.disk_blocks > 0

    def validate(self) -> None:
        for name in ("cpu_blocks", "disk_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.bytes_per_block is not None and self.bytes_per_block <= 0:
            raise ValueError(f"bytes_per_block must be positive, got {self.bytes_per_block}")
        for name in ("cpu_bandwidth_gbps", "disk_bandwidth_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.event_style not in ("tokenless", "full"):
            raise ValueError(f"event_style must be tokenless or full, got {self.event_style!r}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The simulated engine: paged KV cache, scheduler limits, step timing."""

    block_size: int = 64
    num_gpu_blocks: int = 1024
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    speedup_ratio: float = 1.0
    # None: a random seed per process, as vLLM hashes without PYTHONHASHSEED.
    seed: int | None = None
    tiers: TierConfig = field(default_factory=TierConfig)

    @property
    def bytes_per_block(self) -> int:
        explicit = self.tiers.bytes_per_block
        return explicit if explicit is not None else LLAMA3_8B_KV_BYTES_PER_TOKEN * self.block_size

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        for name in ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.speedup_ratio > 0:
            raise ValueError(f"speedup_ratio must be positive, got {self.speedup_ratio}")
        capacity = self.num_gpu_blocks * self.block_size
        # As vLLM refuses to start: one request of max_model_len must fit in the cache,
        # otherwise it could wait forever (and preempt everyone else) without running.
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the KV cache capacity "
                f"({self.num_gpu_blocks} blocks x {self.block_size} tokens = {capacity}); "
                "lower --max-model-len or raise --num-gpu-blocks"
            )
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an unsigned 64-bit integer, got {self.seed}")
        self.tiers.validate()


@dataclass(frozen=True, slots=True)
class KvEventsConfig:
    """vLLM's ZMQ KV-event publisher (``--kv-events-config`` in vLLM).

    ``endpoint`` follows vLLM's rule: ``tcp://*:P`` (or a ``::`` host, ``ipc://``,
    ``inproc://``) is bound, any other endpoint is connected to; ``replay_endpoint`` is
    always bound.
    """

    endpoint: str | None = None  # None: no events published
    replay_endpoint: str | None = None
    topic: str = ""
    encoding: Literal["map", "array"] = "map"
    buffer_steps: int = 10_000  # batches kept for replay (vLLM's default)
    hwm: int = 100_000  # ZMQ high-water mark of the PUB socket (vLLM's default)


@dataclass(frozen=True, slots=True)
class AnswerConfig:
    """How long the simulated model talks when nothing (max_tokens, stop) cuts it short."""

    min_tokens: int = 64
    max_tokens: int = 512

    def validate(self) -> None:
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"answer lengths need 1 <= min <= max, got {self.min_tokens}..{self.max_tokens}")


@dataclass(frozen=True, slots=True)
class SimConfig:
    model_dir: Path
    served_model_name: str | None = None  # None: basename of model_dir
    host: str = "127.0.0.1"
    port: int = 8000
    engine: EngineConfig = field(default_factory=EngineConfig)
    events: KvEventsConfig = field(default_factory=KvEventsConfig)
    answer: AnswerConfig = field(default_factory=AnswerConfig)
    # vLLM's --trust-request-chat-template: render a request's own chat_template; without it, refuse (400).
    trust_request_chat_template: bool = False

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_dir).resolve().name

    def cli_args(self) -> list[str]:
        """The ``python -m kvgate.worker.sim`` arguments that reproduce this config (for launchers)."""
        e, ev, a = self.engine, self.events, self.answer
        args = [
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--model-dir",
            str(self.model_dir),
            "--block-size",
            str(e.block_size),
            "--num-gpu-blocks",
            str(e.num_gpu_blocks),
            "--max-num-seqs",
            str(e.max_num_seqs),
            "--max-num-batched-tokens",
            str(e.max_num_batched_tokens),
            "--max-model-len",
            str(e.max_model_len),
            "--speedup-ratio",
            repr(e.speedup_ratio),
            "--answer-min-tokens",
            str(a.min_tokens),
            "--answer-max-tokens",
            str(a.max_tokens),
            "--event-encoding",
            ev.encoding,
            "--kv-events-topic",
            ev.topic,
            "--kv-events-buffer-steps",
            str(ev.buffer_steps),
            "--kv-events-hwm",
            str(ev.hwm),
        ]
        if self.served_model_name:
            args += ["--served-model-name", self.served_model_name]
        if self.trust_request_chat_template:
            args.append("--trust-request-chat-template")
        if e.seed is not None:
            args += ["--seed", str(e.seed)]
        t = e.tiers
        args += [
            "--cpu-blocks",
            str(t.cpu_blocks),
            "--disk-blocks",
            str(t.disk_blocks),
            "--cpu-bandwidth-gbps",
            repr(t.cpu_bandwidth_gbps),
            "--disk-bandwidth-gbps",
            repr(t.disk_bandwidth_gbps),
            "--tier-event-style",
            t.event_style,
        ]
        if t.bytes_per_block is not None:
            args += ["--bytes-per-block", str(t.bytes_per_block)]
        if ev.endpoint:
            args += ["--kv-events-endpoint", ev.endpoint]
        if ev.replay_endpoint:
            args += ["--kv-events-replay-endpoint", ev.replay_endpoint]
        return args
