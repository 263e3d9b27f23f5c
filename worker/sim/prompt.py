"""Prompts to token ids, exactly as vLLM's OpenAI server (and the kvgate gateway) do it.

Chat: the model directory's chat template (or, with --trust-request-chat-template, the request's own),
``apply_chat_template(messages, tokenize=False, add_generation_prompt=..., continue_final_message=...,
tools=..., **chat_template_kwargs)``, then ``encode(text, add_special_tokens=False)``.
Completions: ``encode(prompt)`` with the tokenizer's default special tokens, or the
client's own token ids (checked against the vocabulary). Failures are ``ApiError`` 400s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
from transformers import AutoTokenizer

from kvgate.worker.sim.protocol import ApiError, GenerateParams

UNTRUSTED_CHAT_TEMPLATE = (
    "Chat template is passed with request, but --trust-request-chat-template is not set. "
    "Refused request with untrusted chat template."
)
# apply_chat_template arguments a request may not set (they change what it returns, not what it renders).
_RESERVED_KWARGS = frozenset(
    {"tokenize", "conversation", "return_dict", "return_tensors", "return_assistant_tokens_mask"}
)


class PromptRenderer:
    """``encode_text``: a rendered chat prompt's ids, without special tokens; by default the tokenizer's
    whole encode, as vLLM does (another encoder must give the same ids: kvgate.dev.cached_sim's does)."""

    def __init__(self, tokenizer, encode_text: Callable[[str], list[int]] | None = None) -> None:
        self.tokenizer = tokenizer
        # vLLM's --trust-request-chat-template; build_app sets it from the worker's config.
        self.trust_request_chat_template = False
        self.vocab_size = len(tokenizer)
        self._encode_text = encode_text or (lambda text: tokenizer.encode(text, add_special_tokens=False))

    @classmethod
    def from_dir(cls, model_dir: Path | str) -> PromptRenderer:
        return cls(AutoTokenizer.from_pretrained(str(model_dir)))

    def token_ids(self, params: GenerateParams) -> list[int]:
        if params.kind == "chat":
            text = self.render_chat(params)
            # An empty render is the 400 below (an encoder other than the default may raise on it).
            ids = _encoded(self._encode_text, text) if text else []
        elif isinstance(params.prompt, str):
            ids = _encoded(self.tokenizer.encode, params.prompt)
        else:
            ids = list(params.prompt or ())
            if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
                raise ApiError(400, f"Token id {min(ids) if min(ids) < 0 else max(ids)} is out of vocabulary")
        if not ids:
            raise ApiError(400, "The decoder prompt cannot be empty")
        return ids

    def tokenize(self, params: GenerateParams, add_special_tokens: bool) -> list[int]:
        """vLLM's ``/tokenize``: the rendered chat (or the prompt) encoded with or without the tokenizer's
        special tokens as the request says; an empty prompt is no error there."""
        text = self.render_chat(params) if params.kind == "chat" else params.prompt
        assert isinstance(text, str)
        if not text:
            return []
        return _encoded(lambda t: self.tokenizer.encode(t, add_special_tokens=add_special_tokens), text)

    def token_strs(self, ids: list[int]) -> list[str]:
        tokens: list[str] = self.tokenizer.convert_ids_to_tokens(ids)
        return tokens

    def detokenize(self, ids: list[int]) -> str:
        """vLLM's ``/detokenize``: ids past the vocabulary are left out."""
        text: str = self.tokenizer.decode([i for i in ids if i < self.vocab_size])
        return text

    def render_chat(self, params: GenerateParams) -> str:
        """The chat's prompt text, as vLLM renders it."""
        # As vLLM: the request's chat_template_kwargs override the request's own fields (and may carry a
        # template); a template from the request needs --trust-request-chat-template.
        kwargs: dict[str, Any] = {
            "tools": params.tools,
            "add_generation_prompt": params.add_generation_prompt,
            "continue_final_message": params.continue_final_message,
            "chat_template": params.chat_template,
        }
        kwargs.update(params.chat_template_kwargs or {})
        if kwargs["chat_template"] is not None and not self.trust_request_chat_template:
            raise ApiError(400, UNTRUSTED_CHAT_TEMPLATE)
        reserved = _RESERVED_KWARGS.intersection(kwargs)
        if reserved:
            raise ApiError(400, f"chat_template_kwargs may not set {sorted(reserved)}", "chat_template_kwargs")
        try:
            text: str = self.tokenizer.apply_chat_template(params.messages, tokenize=False, **kwargs)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise ApiError(400, str(exc)) from None  # vLLM answers the template's own words
        return text


def _encoded(encode: Callable[[str], list[int]], text: str) -> list[int]:
    """``encode(text)``; what the tokenizer refuses (a lone surrogate from a ``\\ud800`` escape: not
    encodable text) is vLLM's 400 in the tokenizer's words."""
    try:
        return encode(text)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc)) from None
