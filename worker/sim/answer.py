"""What the simulated model says: deterministic answers and their text, cut at stop strings.

The answer to a prompt depends only on the prompt's token ids (not on the worker, its
seed, or the sampling temperature): a pseudo-random sequence of whole-word tokens of
the model's own tokenizer, ended by EOS after a length drawn from ``AnswerConfig``.
Words are tokens that decode to one lowercase word and re-encode to themselves, so the
answer text re-tokenizes to the very ids the engine cached: a follow-up turn that
quotes the answer hits those blocks, as with a real model.

``TextStream`` turns output ids into text deltas with vLLM's stop-string semantics: the
text is cut before the first stop string, which never appears in the output, and the
last ``len(longest stop) - 1`` characters are held back while streaming so a stop
string split across tokens never leaks.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import xxhash

from kvgate.protocol.hashing import pack_tokens
from kvgate.worker.sim.config import AnswerConfig

_WORD = re.compile(r"[a-z]{2,}")
_ANSWER_SEED = 0x6B7667617465  # fixed: answers must not depend on the process


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """The tokens answers are made of, with their text."""

    first_words: tuple[int, ...]  # bare words, to open an answer without a leading space
    words: tuple[int, ...]  # space-prefixed words
    eos_token_id: int
    pieces: dict[int, str]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Vocabulary:
        spaced: dict[str, int] = {}
        bare: dict[str, int] = {}
        for token_id in range(len(tokenizer)):
            piece = tokenizer.decode([token_id])
            word = piece[1:] if piece.startswith(" ") else piece
            if not _WORD.fullmatch(word) or tokenizer.encode(piece, add_special_tokens=False) != [token_id]:
                continue
            (spaced if piece.startswith(" ") else bare)[word] = token_id
        if len(spaced) < 16:
            raise ValueError(f"tokenizer has only {len(spaced)} whole-word tokens; need at least 16")
        # Bare forms of real words (ones that also exist spaced), not word fragments.
        first = tuple(bare[w] for w in sorted(bare) if w in spaced) or tuple(spaced.values())
        words = tuple(sorted(spaced.values()))
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("tokenizer has no eos_token_id")
        pieces = {i: tokenizer.decode([i]) for i in (*first, *words)}
        pieces[eos] = ""  # special tokens are skipped in text, as vLLM's default
        return cls(first, words, eos, pieces)


def answer_tokens(
    prompt_token_ids: Sequence[int],
    vocab: Vocabulary,
    config: AnswerConfig,
    ignore_eos: bool = False,
    sample: int = 0,
) -> Iterator[int]:
    """The model's output for a prompt, one token id at a time (endless with ``ignore_eos``).
    ``sample`` numbers the choices of a request with ``n`` > 1: each samples its own answer
    (the first is the answer ``n`` = 1 gets)."""
    rng = random.Random(xxhash.xxh3_64_intdigest(pack_tokens(prompt_token_ids), _ANSWER_SEED + sample))
    length = rng.randint(config.min_tokens, config.max_tokens)
    yield rng.choice(vocab.first_words)
    produced = 1
    while True:
        if produced >= length and not ignore_eos:
            yield vocab.eos_token_id
            return
        yield rng.choice(vocab.words)
        produced += 1


class TextStream:
    """Output text of one request, delivered in deltas."""

    def __init__(self, pieces: dict[int, str], stop: Sequence[str] = ()) -> None:
        self._pieces = pieces
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._sent = 0
        self.stop_reason: str | None = None

    def add(self, token_ids: Sequence[int]) -> bool:
        """Append tokens; True when a stop string ended the text."""
        if self.stop_reason is not None:
            return True
        before = len(self.text)
        self.text += "".join(self._pieces.get(t, "") for t in token_ids)
        if not self._stop:
            return False
        # Only a stop string overlapping the new text can be new.
        start = max(0, before - self._hold)
        found: tuple[int, str] | None = None
        for s in self._stop:
            idx = self.text.find(s, start)
            if idx >= 0 and (found is None or idx < found[0]):
                found = (idx, s)
        if found is None:
            return False
        self.text = self.text[: found[0]]
        self.stop_reason = found[1]
        return True

    def delta(self, final: bool = False) -> str:
        """Text not yet delivered; while not final, holds back a possible stop-string prefix."""
        end = len(self.text) if final or self.stop_reason is not None else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent : end]
        self._sent = end
        return out


def step_logprobs(vocab: Vocabulary, key: int, position: int, token_id: int, top: int) -> list[tuple[int, float]]:
    """A made-up but stable distribution at one position: the token the answer has there first
    (the most likely, as a sampler at low temperature would pick) with its logprob, then the
    next ``top`` - 1 most likely tokens, each less likely than the one before. ``key`` and
    ``position`` seed it, so a request asked twice gets the same figures. vLLM's order: the
    sampled token, then the top-k ranks without repeating it."""
    rng = random.Random(key * 1_000_003 + position)
    logprob = -rng.uniform(0.01, 1.0)
    out = [(token_id, logprob)]
    pool = vocab.words
    while len(out) < top and len(out) < len(pool):
        other = pool[rng.randrange(len(pool))]
        if any(other == t for t, _ in out):
            continue
        logprob -= rng.uniform(0.1, 2.0)
        out.append((other, logprob))
    return out


def logprobs_key(token_ids: Sequence[int], sample: int) -> int:
    """The seed of a prompt's (and choice's) made-up logprobs."""
    return xxhash.xxh3_64_intdigest(pack_tokens(token_ids), _ANSWER_SEED + 1_000_000 + sample)
