"""Prompts to token ids, exactly as vLLM's OpenAI server (and the kvgate gateway) do it.

Chat: the model directory's chat template, ``apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)``, then ``encode(text, add_special_tokens=False)``.
Completions: ``encode(prompt)`` with the tokenizer's default special tokens, or the
client's own token ids (checked against the vocabulary). Failures are ``ApiError`` 400s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jinja2
from transformers import AutoTokenizer

from kvgate.worker.sim.protocol import ApiError, GenerateParams


class PromptRenderer:
    """``encode_text``: a rendered chat prompt's ids, without special tokens; by default the tokenizer's
    whole encode, as vLLM does (another encoder must give the same ids: kvgate.dev.cached_sim's does)."""

    def __init__(self, tokenizer, encode_text: Callable[[str], list[int]] | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self._encode_text = encode_text or (lambda text: tokenizer.encode(text, add_special_tokens=False))

    @classmethod
    def from_dir(cls, model_dir: Path | str) -> PromptRenderer:
        return cls(AutoTokenizer.from_pretrained(str(model_dir)))

    def token_ids(self, params: GenerateParams) -> list[int]:
        if params.kind == "chat":
            try:
                text = self.tokenizer.apply_chat_template(
                    params.messages,
                    tools=params.tools,
                    tokenize=False,
                    add_generation_prompt=params.add_generation_prompt,
                )
            except (jinja2.TemplateError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
                raise ApiError(400, f"cannot render the chat template: {exc}", "messages") from None
            # An empty render is the 400 below (an encoder other than the default may raise on it).
            ids = self._encode_text(text) if text else []
        elif isinstance(params.prompt, str):
            ids = self.tokenizer.encode(params.prompt)
        else:
            ids = list(params.prompt or ())
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} is out of vocabulary (size {self.vocab_size})", "prompt")
        if not ids:
            raise ApiError(400, "the prompt cannot be empty", "messages" if params.kind == "chat" else "prompt")
        return ids
