"""A request as the engine holds it: its tokens, its progress, and where it stands.

Mirrors vLLM v1's ``vllm/v1/request.py``: ``Request`` carries the prompt and output
token ids, the block hashes of its full blocks, how many tokens are computed, its prefix
hit and its ``RequestStatus``. The scheduler moves it between statuses and the KV cache
gives it blocks; both depend on this module, and it on neither. Owns no scheduling
and no blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampler: Iterator[int]  # the simulated model: yields the next output token id
    eos_token_id: int | None = None  # None: generation never stops on EOS (ignore_eos)
    cache_salt: str | None = None  # keys the first block's hash (so the whole chain), as vLLM's
    all_token_ids: list[int] = field(init=False)
    output_token_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix hit at first admission (all tiers); -1 until admitted
    cached_tokens_per_tier: tuple[int, int, int] = (0, 0, 0)  # that hit by (GPU, CPU, disk)
    # Prompt tokens of full blocks the prefill computes (vLLM's created_cache_tokens).
    num_created_cache_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
