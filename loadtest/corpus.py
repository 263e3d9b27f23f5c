"""Seeded synthetic text whose token count is known exactly under a real tokenizer.

Owns the vocabulary every workload draws its prompts from. The words are taken
from the tokenizer's own vocabulary: each is a lowercase word with a leading
space that encodes to exactly one token, and the tokenizer's pre-tokenizer
splits on that space, so a text of N such words is exactly N tokens and the
tokens of a concatenation are the concatenation of the tokens. That is what
lets equal trace hash ids become equal token prefixes at the gateway.

Never talks to the network; the tokenizer is only read here to calibrate.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "kvgate-tiny"

_WORD = re.compile(r"^ [a-z]{3,12}$")
# Enough words that two independently drawn 64-token blocks never collide
# (64 * log2(32) = 320 bits) and the text still reads as varied prose.
MIN_WORDS = 32
MAX_WORDS = 2048


class VocabularyError(ValueError):
    """The tokenizer cannot give exact token counts for word-built text."""


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def get_vocab(self) -> dict[str, int]: ...


def load_tokenizer(model: str) -> Any:
    """A transformers tokenizer from a local directory or a hub id (offline when HF_HUB_OFFLINE=1)."""
    from transformers import AutoTokenizer  # heavy import, only paid by callers that need it

    return AutoTokenizer.from_pretrained(model)


@dataclass(frozen=True)
class Vocabulary:
    """Words (each with its leading space) that are exactly one token each."""

    words: tuple[str, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: TextTokenizer) -> Vocabulary:
        candidates: list[tuple[int, str]] = []
        for token_id in sorted(tokenizer.get_vocab().values()):
            text = tokenizer.decode([token_id])
            if _WORD.match(text) and tokenizer.encode(text, add_special_tokens=False) == [token_id]:
                candidates.append((token_id, text))
            if len(candidates) >= MAX_WORDS:
                break
        if len(candidates) < MIN_WORDS:
            raise VocabularyError(
                f"tokenizer has only {len(candidates)} single-token ' word' entries (need {MIN_WORDS})"
            )
        vocab = cls(tuple(text for _, text in candidates))
        vocab._check_additive(tokenizer)
        return vocab

    def _check_additive(self, tokenizer: TextTokenizer) -> None:
        # A tokenizer without a whitespace pre-tokenizer could merge across words,
        # which would break exact lengths and block-aligned sharing: refuse it.
        rng = random.Random(0)
        sample = [rng.choice(self.words) for _ in range(512)]
        ids = tokenizer.encode("".join(sample), add_special_tokens=False)
        if len(ids) != len(sample):
            raise VocabularyError(
                f"{len(sample)} single-token words encode to {len(ids)} tokens: "
                "the tokenizer merges across word boundaries"
            )

    def draw(self, rng: random.Random, n_tokens: int) -> list[str]:
        """``n_tokens`` words (one token each) from ``rng``."""
        return rng.choices(self.words, k=n_tokens)

    def text(self, rng: random.Random, n_tokens: int) -> str:
        return "".join(self.draw(rng, n_tokens))
