"""Preprocessing: a model's chat template and tokenizer, applied the way vLLM applies them.

Owns: loading a tokenizer (Hugging Face Hub id or local directory), rendering chat messages to the prompt
string vLLM would render, encoding prompts to token ids, the model's context length, and moving long
encodes off the event loop. Never routes, hashes blocks or talks HTTP; `TokenizerError` is the only error
it raises for bad input or a bad model, and the gateway maps it to a 400.

vLLM's way, reproduced here (same transformers version => same prompt and ids):
  chat        -> messages normalised as vLLM's chat_utils does (content "string" or "openai" format
                 detected from the template's AST; text parts joined with "\\n" for "string" templates,
                 kept as [{"type": "text", ...}] parts for "openai" ones; tool-call arguments parsed from
                 JSON) -> tokenizer.apply_chat_template(tokenize=False, add_generation_prompt=...,
                 tools=..., **chat_template_kwargs) -> encode(prompt, add_special_tokens=False)
  completions -> encode(prompt) with special tokens (add_special_tokens=True); a token-id list passes
                 through after validation.

Why long encodes go to a thread: `Tokenizer.encode` holds the GIL for its whole run (about 2 us per
token), so inline (or in a thread) it stalls the event loop for exactly that long, while
`Tokenizer.encode_batch` releases it, so run in a thread it leaves the loop free. The hop to the executor
costs more than encoding a short prompt, so prompts shorter than `offload_threshold_chars` (1536 chars,
~350 tokens) are encoded inline and longer ones in the thread pool. The measurements behind these
choices are in BENCHMARKS.md ("Tokenization").

Rendering (Jinja, pure Python) costs about the same per message whatever the message length (figures in
BENCHMARKS.md), ~100 us a message: inline for conversations shorter than `offload_render_messages` (256),
in the thread pool for longer ones, together with their segment split, encode and id assembly, which
also grow with the message count. A thread does not make rendering cheaper, as it holds the GIL while
it runs, but the interpreter hands the GIL back to the loop's thread every switch interval (5 ms), so the
loop keeps serving other requests instead of stalling for the whole render (4096 messages: ~0.5 s).

Encoding uses a private copy of the tokenizer's Rust backend with truncation and padding cleared (what
transformers does before every call), so concurrent encodes never mutate shared state.

Segment cache (encodes without special tokens: every chat prompt). `tokenizers` first splits the input at
its added tokens (leftmost-longest match), then normalizes and pre-tokenizes each text segment on its own,
so encoding the segments separately and splicing in the added tokens' ids gives the whole-string ids. A
rendered conversation is mostly the previous turn's segments (ChatML: one per message), so each encoded
segment is kept in a byte-bounded LRU keyed by its text and a new turn encodes only its new messages; the
offload threshold applies to the characters that still need encoding. The cache is used only when this is
exact: no added token strips whitespace or is single_word, normalized added tokens only without a
normalizer, special tokens are split, no Metaspace prepend_scheme="first" (it prepends to the first segment
only), and a load-time self-test on sample renders matches the whole-string encode; otherwise every prompt
is encoded whole (logged once at load). Its speed-up is measured in BENCHMARKS.md.

Prefix cache (gateway/incremental.py), used instead of the segment cache where it is exact: a prompt
sharing a long prefix with a recently encoded one (turn N of a conversation, a shared system prompt or
document, an agent's growing scratchpad) reuses that one's ids up to a cut proven safe for the tokenizer
and encodes only the rest, for chat and completions (special tokens framed around). It is on for the
byte-level BPE tokenizers (Llama 3, Qwen 2.5 / 3, DeepSeek V3 / V4, Mistral Nemo, kvgate-tiny) and off,
falling back to the segment cache or whole encodes, for the others (Gemma, Llama 2: BPE over whole
segments); the offload threshold applies to the characters left to encode.

Heads (with the prefix cache on; `head_chars`, the gateway's `route_head_chars`): a prompt with at least 4 x
head_chars chars left to encode is first encoded only to a head, cut where it is proven exact as split encodes' joins
are (`PrefixCache.head`; a first head of FIRST_HEAD_CHARS on the event loop, proven with a short overlap when
it can be), and returned as a `HeadEncoding`. A worker's prefix match ends at its first missing block, so when
no worker holds all of the head's blocks the head alone decides the route, and the rest of a long cold prompt
(a new document, a first turn) is never encoded: the gateway forwards text and the engine tokenizes it anyway.
Its size is estimated from the head's tokens per UTF-8 byte and bounded by its bytes (a byte-level token
covers at least one). When the head does not decide, `deepen_head_async` encodes a head HEAD_GROWTH times as
long past it, and so on until the rest is short, when it is encoded whole (the heads are not encoded again). A
routed head is tagged with where its prompt went (`tag_head`).
A prompt that extends a cached one by less than the offload threshold (a conversation's next turn), or that
shares more than its head with a prompt routed on its head and tagged (`Plan.beyond_head`: the turn after a
long first turn; an untagged one is encoded whole, by when its tag has usually come), is returned as a
`HeadEncoding` too, its head the cached prefix's ids (`HeadEncoding.prefix`), and in the second case with
where that prompt went and about how much the two share (`HeadEncoding.holder`, which the router scores that
worker with): the router decides on it when the rest cannot change the choice (`Router.route_head` with
`token_bound`), and the gateway encodes the rest once the request is on its way (`finish_prefix_route_async`;
a long rest on a thread of its own), storing the whole prompt for the next turn. When the head does not
decide, the prompt is encoded whole, and its `Tokenized` says how many of its first ids provably are a tagged
prompt's too, so the router predicts those blocks where that prompt went.

Chat templates are rendered by the compiled template itself, without `apply_chat_template`'s per-call copy
and normalization of the messages (most of its cost), for requests without `chat_template_kwargs`,
`continue_final_message` or reasoning fields; a load-time self-test compares the two on sample
conversations, and property tests on the real tokenizers' templates.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import pathlib
import re
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import jinja2
import jinja2.nodes
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from tokenizers import Tokenizer
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import _compile_jinja_template

from kvgate.gateway import incremental
from kvgate.gateway.incremental import IncrementalInfo, Plan, PrefixCache

ContentFormat = Literal["string", "openai"]

# config.json keys vLLM reads for the context length; the smallest present wins, as in vLLM.
CONTEXT_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# transformers uses a huge sentinel for "unknown" model_max_length.
_UNSET_MODEL_MAX_LENGTH = 10**9
# chat_template_kwargs vLLM refuses (or that would change what apply_chat_template returns).
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"chat_template", "tokenize", "conversation", "return_dict", "return_tensors", "return_assistant_tokens_mask"}
)
# vLLM's refusal of a request's own template when not started with --trust-request-chat-template.
UNTRUSTED_CHAT_TEMPLATE = (
    "Chat template is passed with request, but --trust-request-chat-template is not set. "
    "Refused request with untrusted chat template."
)
_PROBE_CONVERSATION = ({"role": "user", "content": "probe"},)
# The message fields transformers' `apply_chat_template` copies under each other's names.
_REASONING_KEYS = frozenset({"reasoning_content", "thinking", "reasoning"})


def _direct_render_samples(content_format: str) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]]:
    """Conversations the direct render is compared on at load (`Preprocessor._direct_render_setting`)."""
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    parts: Any = [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]
    yield [{"role": "user", "content": "Hello there"}], None
    yield (
        [
            {"role": "system", "content": "You are brief.", "name": None},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": parts if content_format == "openai" else "Part one.\nPart two."},
        ],
        None,
    )
    yield (
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 20C"},
        ],
        [tool],
    )
    yield [{"role": "user", "content": "Any tools?"}], [tool]


# Texts around which the load-time self-test places added tokens: whitespace and newlines that a
# pre-tokenizer could merge across a boundary, combining marks, non-BMP characters, CRLF.
_SELF_TEST_TEXTS = (
    "",
    " ",
    "\n",
    "\n\n",
    " \n ",
    "\r\n",
    "\t",
    "  x  ",
    "\nhello\n",
    "e\u0301\u00e9 \u2028\u00a0",
    "\u65e5\u672c\u8a9e \U0001f44d\U0001f3fd",
    "It's 3.14!\n\n```py\nx = 1\n```\n",
    "\u0645\u0631\u062d\u0628\u0627  \n\t",
)

# Text the incremental self-test cuts everywhere: words, digit runs, whitespace runs before words and
# newlines, contractions, punctuation runs, CJK, emoji with modifiers, combining marks, RTL, tabs, CRLF.
# Encodes of texts at least this long update the tokens-per-byte ratio heads estimate their prompt's size by.
_RATIO_MIN_CHARS = 4096
_SELF_TEST_PROSE = (
    "It's 3.14159, isn't it? We'll see: 1234567 items cost $89.99 (approx.)\n\n"
    "  Indented   words\tand\ttabs;   trailing spaces   \n"
    "def f(x):\r\n    return x**2  # comment\n\n\n"
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068English\u6df7\u5728\u3002 "
    "\U0001f44d\U0001f3fd\U0001f468\u200d\U0001f469 e\u0301t\u00e9 cafe\u0301 na\u00efve "
    "\u0645\u0631\u062d\u0628\u0627 \u0431\u0443\u043a\u0432\u044b ALLCAPS CamelCase snake_case "
    "x=y+z; <tag attr='v'>\u00a0nbsp\u2028sep</tag> ...!!! ??? ---\n\n"
    "Final paragraph with a URL https://example.com/a/b?c=d&e=f and an e-mail a.b@c.de."
)

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """Bad model directory or id, bad chat template, or bad messages / prompt. Maps to HTTP 400."""


@dataclass(frozen=True)
class PreprocessorConfig:
    model: str
    revision: str | None = None
    trust_remote_code: bool = False
    # Like vLLM's --chat-template: a file path or the template text; None = the tokenizer's own.
    chat_template: str | None = None
    # Like vLLM's --trust-request-chat-template: a request's own `chat_template` (or chat_template_kwargs'
    # one) renders its prompt; without it such a request is refused, as vLLM refuses it.
    trust_request_chat_template: bool = False
    # Overrides the context length read from config.json / tokenizer_config.json.
    context_length: int | None = None
    offload_threshold_chars: int = 1536
    # Conversations with at least this many messages are rendered in the thread pool.
    offload_render_messages: int = 256
    executor_threads: int = 2
    # Byte budget (approximate: text + id lists) of the tokenizer cache (prefix cache, else segment
    # cache); 0 turns both off.
    segment_cache_bytes: int = 128 * 1024 * 1024
    # Incremental (prefix) encoding where it is exact for the tokenizer; False: segment cache only.
    prefix_cache: bool = True
    # With the prefix cache on, a long text is encoded in up to this many parts at once, on the tokenizer's
    # own threads (see incremental.SPLIT_MIN_CHARS); None: one part per CPU this process may use; 1: off.
    split_parts: int | None = None
    # With the prefix cache on, a prompt with at least 4x this many chars left to encode is first encoded only
    # this far (its head, see `HeadEncoding`); 0: off.
    head_chars: int = 2048


# A prompt routed on its head (one with at least 4 x `head_chars` chars to encode) is first encoded this far
# past its cached prefix; a head that does not decide its route is followed by one HEAD_GROWTH times as long
# (`deepen_head_async`), while the rest is at least 4 x that long.
FIRST_HEAD_CHARS = 512
HEAD_GROWTH = 4
# Chars a head encodes past its cut to prove it (the split encodes' 512 when that is not enough): the two
# pieces after a cut are a few words unless the text has long runs without a word start.
HEAD_OVERLAP_CHARS = 128


@dataclass(frozen=True)
class HeadEncoding:
    """A prompt of which only the head is encoded: enough to route it when no worker holds all of the head's
    blocks, since a worker's match ends at its first missing block, or when the rest cannot change the choice
    (`Router.route_head`). `finish_head_async` encodes the rest when the head is not enough (or the exact
    count is needed).

    Two kinds: a long cold prompt's first `head_chars` (its rest is never encoded when the head decides), and
    a prompt extending a cached one (`plan` set: the head is the cached prefix's ids, and the rest is encoded
    after the request was forwarded, `finish_prefix_route_async`, so the next turn finds it cached). The rest
    is short (a new turn of a conversation the cache holds whole) or, when the cached prompt is itself a head
    whose rest was never encoded (the turn after a long first turn), as long as that rest."""

    text: str
    ids: list[int]  # the exact ids of text[:chars] (after the special-token head when framed)
    chars: int
    add_special_tokens: bool
    token_bound: int  # the whole prompt has no more tokens than this
    token_estimate: int  # its likely token count (the head's + the rest's bytes at the recent ratio)
    entry: object = field(default=None, repr=False, compare=False)  # the prefix cache's, for `tag_head`
    plan: Plan | None = field(default=None, repr=False, compare=False)  # a cached prefix's head: the rest's plan
    span: int = 0  # a cold head's: how many chars past the cached prefix it asked for (`deepen_head_async`)
    # A cached prefix's head that is part of a prompt routed on its head alone: that prompt's tag (where it
    # went, `tag_head`) and about how many of this prompt's first tokens the two share.
    holder: tuple[object, int] | None = None

    @property
    def prefix(self) -> bool:
        """The head is a cached prefix (see the class docstring)."""
        return self.plan is not None


@dataclass(frozen=True)
class Tokenized:
    """A prompt's ids. When `shared_tag` is set, its first `shared_tokens` ids are those of a prompt routed on
    its head alone, whose blocks went where the tag says (`Preprocessor.tag_head`)."""

    ids: list[int]
    shared_tag: object | None = None
    shared_tokens: int = 0


@dataclass(frozen=True)
class ChatEncoding:
    prompt: str
    token_ids: list[int]
    render_seconds: float
    tokenize_seconds: float
    offloaded: bool = False


@dataclass(frozen=True)
class SegmentCacheInfo:
    """`enabled` False with the `reason` when prompts are encoded whole; counters since load."""

    enabled: bool
    reason: str
    entries: int
    bytes: int
    hits: int
    misses: int
    encoded_chars: int


class Preprocessor:
    """A loaded tokenizer + chat template. Thread-safe; the async variants encode long prompts off the loop.

    `render_chat` / `encode_chat` / `render_and_encode` (and their async forms) take the same keyword
    options: add_generation_prompt, continue_final_message, tools, chat_template_kwargs, chat_template (a
    request's own template: refused unless `trust_request_chat_template`).
    """

    def __init__(self, config: PreprocessorConfig) -> None:
        self.config = config
        self.tokenizer = _load_tokenizer(config)
        self._template_override = _read_template_override(config.chat_template)
        self.chat_template = self._template(tools=None)
        self.content_format: ContentFormat = detect_content_format(self.chat_template)
        # Load-time probe: a syntax error or a template that cannot render one user turn fails here, not
        # on the first request.
        self._template_kwargs: dict[str, Any] = dict(self.tokenizer.special_tokens_map)
        self._direct_render = False
        self.render_chat(list(_PROBE_CONVERSATION))
        self._direct_render, self.direct_render_off_reason = self._direct_render_setting()
        self._backend = _private_backend(self.tokenizer)
        self.max_token_id = max(self.tokenizer.get_vocab().values())
        self.context_length = (
            config.context_length if config.context_length is not None else _context_length(config, self.tokenizer)
        )
        if self.context_length <= 0:
            raise TokenizerError(f"context_length must be positive, got {self.context_length}")
        if config.segment_cache_bytes < 0:
            raise TokenizerError(f"segment_cache_bytes must be >= 0, got {config.segment_cache_bytes}")
        self._prefix, self._prefix_off_reason, self._frame = self._prefix_cache()
        self._split_parts, self.split_off_reason = self._split_setting()
        self._head_chars, self.head_off_reason = self._head_setting()
        self._lock = threading.Lock()
        self._heads_completed = 0
        self._heads_deepened = 0
        self._prefix_routed = 0
        self._prefix_completed = 0
        # None when it cannot change a text (an empty sequence still copies it: ~0.3 ms for 50k chars).
        self._normalizer = self._backend.normalizer if incremental.normalizes(self._backend) else None
        # Tokens per UTF-8 byte of recent heads and long encodes, for a head's estimate (steadier across
        # scripts than per char); seeded by this tokenizer's prose.
        self._tokens_per_byte = len(self._backend.encode(_SELF_TEST_PROSE, add_special_tokens=False)) / _utf8_size(
            _SELF_TEST_PROSE
        )
        if self._prefix is not None:
            # The prefix cache covers what the segment cache would (a new turn extends the last prompt).
            self._segments, self._segments_off_reason = None, "the prefix cache is on"
        else:
            self._segments, self._segments_off_reason = self._segment_cache()
            if config.segment_cache_bytes and config.prefix_cache:
                log.warning("incremental tokenization off for %s: %s", config.model, self._prefix_off_reason)
            if self._segments is None and config.segment_cache_bytes:
                log.warning("tokenizer segment cache off for %s: %s", config.model, self._segments_off_reason)
        self._executor = ThreadPoolExecutor(max_workers=config.executor_threads, thread_name_prefix="kvgate-tokenize")
        # Rests of prompts already forwarded (`finish_prefix_route_async`): their own thread, so that no
        # request waiting for its tokens queues behind them.
        self._rest_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvgate-tokenize-rest")

    @classmethod
    def load(cls, model: str, **options: Any) -> Preprocessor:
        return cls(PreprocessorConfig(model=model, **options))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._rest_executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Preprocessor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- chat -------------------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> str:
        kwargs: dict[str, Any] = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            "tools": tools,
        }
        if chat_template_kwargs is not None:
            if not isinstance(chat_template_kwargs, Mapping):
                raise TokenizerError("chat_template_kwargs must be an object")
            if chat_template_kwargs.get("chat_template") is not None:
                chat_template = chat_template_kwargs["chat_template"]  # vLLM: the kwargs' one wins
            reserved = RESERVED_TEMPLATE_KWARGS.intersection(chat_template_kwargs) - {"chat_template"}
            if reserved:
                raise TokenizerError(f"chat_template_kwargs may not set {sorted(reserved)}")
            # vLLM lets request kwargs override add_generation_prompt / tools; so do we.
            kwargs.update((k, v) for k, v in chat_template_kwargs.items() if k != "chat_template")
        kwargs["tools"] = normalize_tools(kwargs["tools"])
        if kwargs["add_generation_prompt"] and kwargs["continue_final_message"]:
            raise TokenizerError("add_generation_prompt and continue_final_message cannot both be true")
        if chat_template is None:
            # As vLLM: a tokenizer with named templates picks "tool_use" when tools are given.
            template = self._template(kwargs["tools"])
        elif not self.config.trust_request_chat_template:
            raise TokenizerError(UNTRUSTED_CHAT_TEMPLATE)
        elif not isinstance(chat_template, str):
            raise TokenizerError("chat_template must be a string")
        else:
            template = chat_template
        conversation = normalize_messages(messages, detect_content_format(template))
        try:
            prompt = None
            if self._direct_render and chat_template_kwargs is None and not continue_final_message:
                prompt = self._render_direct(template, conversation, kwargs["tools"], add_generation_prompt)
            if prompt is None:
                prompt = self.tokenizer.apply_chat_template(
                    conversation, chat_template=template, tokenize=False, **kwargs
                )
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from exc
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise TokenizerError(f"cannot render these messages with the chat template: {exc}") from exc
        except RecursionError:
            raise TokenizerError("cannot render these messages: a value is nested too deeply") from None
        if not isinstance(prompt, str):
            raise TokenizerError("chat template did not render a string")
        return prompt

    def _render_direct(
        self, template: str, conversation: list[dict[str, Any]], tools: Any, add_generation_prompt: bool
    ) -> str | None:
        """What `apply_chat_template` renders for JSON-typed messages without reasoning fields, with none of its
        per-call copying and normalizing of the messages (most of its cost): messages without their null
        fields, the tokenizer's special tokens as template variables (`_direct_render_setting` checks it is
        the same at load). None for a message with reasoning: transformers aliases it under several names,
        which its own path does."""
        chat = []
        for message in conversation:
            if not _REASONING_KEYS.isdisjoint(message):
                return None
            chat.append({key: value for key, value in message.items() if value is not None})
        return _compile_jinja_template(template).render(
            messages=chat,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self._template_kwargs,
        )

    def _direct_render_setting(self) -> tuple[bool, str]:
        """Whether `_render_direct` renders what `apply_chat_template` does, on sample conversations (with and
        without a generation prompt, tools, tool calls and a tool's answer, null fields, content parts)."""
        self._direct_render = False
        for messages, tools in _direct_render_samples(self.content_format):
            for generation in (True, False):
                try:
                    expected = self.render_chat(messages, add_generation_prompt=generation, tools=tools)
                except TokenizerError:
                    continue
                conversation = normalize_messages(messages, self.content_format)
                try:
                    got = self._render_direct(self.chat_template, conversation, normalize_tools(tools), generation)
                except Exception as exc:  # noqa: BLE001 - any failure of the direct path turns it off
                    return False, f"self-test: the direct render failed: {exc}"
                if got != expected:
                    return False, "self-test: the direct render differs from apply_chat_template"
        self._direct_render = True
        return True, ""

    def _template(self, tools: Any) -> str:
        try:
            return self.tokenizer.get_chat_template(self._template_override, tools=tools)
        except ValueError as exc:
            raise TokenizerError(f"the model has no chat template: {exc}") from exc

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], **render_options: Any) -> list[int]:
        return self.render_and_encode(messages, **render_options).token_ids

    def render_and_encode(
        self, messages: Sequence[Mapping[str, Any]], *, add_special_tokens: bool = False, **render_options: Any
    ) -> ChatEncoding:
        started = time.perf_counter()
        prompt = self.render_chat(messages, **render_options)
        rendered = time.perf_counter()
        token_ids = self._encode_text(prompt, add_special_tokens)
        return ChatEncoding(prompt, token_ids, rendered - started, time.perf_counter() - rendered)

    async def render_and_encode_async(
        self, messages: Sequence[Mapping[str, Any]], *, add_special_tokens: bool = False, **render_options: Any
    ) -> ChatEncoding:
        if len(messages) >= self.config.offload_render_messages:
            work = functools.partial(self._render_and_encode_offloaded, messages, add_special_tokens, render_options)
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        started = time.perf_counter()
        prompt = self.render_chat(messages, **render_options)
        rendered = time.perf_counter()
        token_ids, offloaded = await self._encode_text_async(prompt, add_special_tokens)
        return ChatEncoding(prompt, token_ids, rendered - started, time.perf_counter() - rendered, offloaded)

    def _render_and_encode_offloaded(
        self, messages: Sequence[Mapping[str, Any]], add_special_tokens: bool, render_options: Mapping[str, Any]
    ) -> ChatEncoding:
        """A long conversation's whole preprocessing, in the thread pool: its segment split and
        id assembly cost per message too, and the encode runs with the GIL released."""
        started = time.perf_counter()
        prompt = self.render_chat(messages, **render_options)
        rendered = time.perf_counter()
        if self._uses_prefix(add_special_tokens):
            token_ids = self._finish_prefix(self._prefix_plan(prompt), add_special_tokens, released=True)
        elif self._segments is None or add_special_tokens:
            token_ids = self._encode_released([prompt], add_special_tokens)[0]
        else:
            parts, known, missing = self._segments.lookup(prompt)
            token_ids = self._segments.assemble(parts, known, missing, self._encode_released(missing, False))
        return ChatEncoding(prompt, _non_empty(token_ids), rendered - started, time.perf_counter() - rendered, True)

    async def encode_chat_async(self, messages: Sequence[Mapping[str, Any]], **render_options: Any) -> list[int]:
        return (await self.render_and_encode_async(messages, **render_options)).token_ids

    # -- heads: route a long cold prompt without encoding all of it -------------------------------------

    async def encode_chat_head_async(
        self, messages: Sequence[Mapping[str, Any]], **render_options: Any
    ) -> Tokenized | HeadEncoding:
        """`encode_chat_async`, or only the head of a long prompt when there is much left to encode."""
        if len(messages) >= self.config.offload_render_messages:
            return Tokenized(await self.encode_chat_async(messages, **render_options))
        return await self._encode_head_async(self.render_chat(messages, **render_options), False)

    async def encode_prompt_head_async(
        self, prompt: str | Sequence[int], *, add_special_tokens: bool = True
    ) -> Tokenized | HeadEncoding:
        """`encode_prompt_async`, or only the head of a long prompt string when there is much left to encode."""
        if isinstance(prompt, str):
            return await self._encode_head_async(prompt, add_special_tokens)
        return Tokenized(self.validate_token_ids(prompt))

    async def finish_head_async(self, head: HeadEncoding, counted: bool = True) -> Tokenized:
        """All of a head's prompt ids (the head, stored in the prefix cache, is not encoded again); `counted`:
        as a head that did not decide its route (the metrics)."""
        if counted:
            with self._lock:
                if head.plan is not None:
                    self._prefix_completed += 1
                else:
                    self._heads_completed += 1
        plan = head.plan if head.plan is not None else self._prefix_plan(head.text)
        return await self._encode_planned(plan, head.add_special_tokens)

    def finish_prefix_route(self, head: HeadEncoding, released: bool = False) -> list[int]:
        """All ids of a prompt routed on its cached prefix (`HeadEncoding.prefix`), its short rest encoded here,
        on the caller's thread (with the GIL released when `released`), and the whole prompt stored in the
        prefix cache for the next turn."""
        assert head.plan is not None and self._prefix is not None
        with self._lock:
            self._prefix_routed += 1
        return _non_empty(self._finish_prefix(head.plan, head.add_special_tokens, released=released))

    async def finish_prefix_route_async(self, head: HeadEncoding) -> list[int]:
        """`finish_prefix_route`, its rest encoded on a thread of its own when it is long (`long_rest`)."""
        if not self.long_rest(head):
            return self.finish_prefix_route(head)
        work = functools.partial(self.finish_prefix_route, head, released=True)
        return await asyncio.get_running_loop().run_in_executor(self._rest_executor, work)

    def long_rest(self, head: HeadEncoding) -> bool:
        """Whether the rest of a prompt routed on its cached prefix is too long to encode on the event loop."""
        return len(head.text) - head.chars >= self.config.offload_threshold_chars

    def tag_head(self, head: HeadEncoding, tag: object, ttl: float) -> None:
        """`head`'s whole prompt was sent where `tag` says (a prompt routed on its head alone). For `ttl`
        seconds, a prompt sharing more than that head with it is encoded whole, and its `Tokenized` says how
        many of its first ids the two share: their blocks went where the tag says."""
        assert self._prefix is not None
        self._prefix.tag(head.entry, tag, ttl)

    async def _encode_head_async(self, text: str, add_special_tokens: bool) -> Tokenized | HeadEncoding:
        text = _require_str(text)
        head_chars = self._head_chars
        if not (head_chars and self._uses_prefix(add_special_tokens)):
            return Tokenized((await self._encode_text_async(text, add_special_tokens))[0])
        assert self._prefix is not None
        plan = self._prefix_plan(text)
        if plan.done:
            return await self._encode_planned(plan, add_special_tokens)
        rest_chars = len(plan.text) - plan.cut
        if plan.cut and (plan.beyond_head or rest_chars < self.config.offload_threshold_chars):
            # A new turn of a cached conversation: routed on the cached prefix, the rest encoded after
            # forwarding. Also a text sharing more than a head with a prompt routed on that head alone (the
            # next turn of a long first turn): the head's blocks are where that prompt went, so the head
            # decides unless another worker is cheaper there (`Router.route_head`); when it does not, the
            # whole encode tells how much of it went where (`_encode_planned`, `PrefixCache.shared`).
            if not plan.beyond_head:
                return self._head_encoding(text, plan.prefix_ids.tolist(), plan.cut, add_special_tokens, None, plan)
            # Only once that prompt is tagged with where it went; before (a burst sharing a new document), the
            # whole encode below takes long enough for the tag to come, and says exactly what is shared.
            holder = self._prefix.holder(plan)
            if holder is not None:
                # Its long rest is estimated at its head's own ratio (the same document, see `_cold_head`).
                ratio = len(plan.prefix_ids) / max(1, _utf8_size(self._normalized(text[: plan.cut])))
                ids = plan.prefix_ids.tolist()
                head = self._head_encoding(text, ids, plan.cut, add_special_tokens, None, plan, ratio)
                tag, common = holder
                shared = _utf8_size(self._normalized(text[plan.cut : common]))
                return replace(head, holder=(tag, len(head.ids) + round(shared * ratio)))
        if plan.beyond_head or rest_chars < 4 * head_chars:
            return await self._encode_planned(plan, add_special_tokens)
        return await self._cold_head(plan, add_special_tokens, min(FIRST_HEAD_CHARS, head_chars))

    async def deepen_head_async(self, head: HeadEncoding) -> Tokenized | HeadEncoding:
        """For a head that did not decide its route: a cold head's next one, `HEAD_GROWTH` times as far past
        it (some worker holds all of it: its prompt may share more with that worker's), or all the prompt's
        ids when the rest is shorter than that; a cached prefix's head is encoded whole (`finish_head_async`)."""
        if head.plan is not None or not head.span:
            return await self.finish_head_async(head)
        assert self._prefix is not None
        # The plan starts at the head's last cut (its entry is cached), so only the new text is encoded.
        deeper = await self._cold_head(self._prefix_plan(head.text), head.add_special_tokens, HEAD_GROWTH * head.span)
        with self._lock:
            if isinstance(deeper, HeadEncoding):
                self._heads_deepened += 1
            else:
                self._heads_completed += 1
        return deeper

    async def _cold_head(self, plan: Plan, add_special_tokens: bool, span: int) -> Tokenized | HeadEncoding:
        """plan.text's ids up to a cut about `span` chars past plan.cut, or all of them when the rest is
        shorter than 4 x `span` (or no cut there can be proven)."""
        assert self._prefix is not None
        if len(plan.text) - plan.cut < 4 * span:
            return await self._encode_planned(plan, add_special_tokens)
        found = None
        if span + HEAD_OVERLAP_CHARS < self.config.offload_threshold_chars:
            # A short head is encoded here, on the loop, as a short prompt is: less than the threads' round trip.
            found = self._prefix.head(plan, span, HEAD_OVERLAP_CHARS, released=False)
        if found is None:
            # A long head, or a short one whose cut the short overlap could not prove.
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(self._executor, self._prefix.head, plan, span)
        if found is None:
            return await self._encode_planned(plan, add_special_tokens)
        ids, chars, entry = found
        # The rest is estimated at the head's own ratio: the same document, where the recent prompts' ratio
        # may be another script's or kind of text's (a synthetic document's 0.07 tokens per byte was
        # estimated at prose's 0.25: 3.5x its tokens queued on its worker until its first token).
        head_ratio = self._learn_tokens_per_byte(len(ids) - len(plan.prefix_ids), plan.text[plan.cut : chars])
        return self._head_encoding(plan.text, ids, chars, add_special_tokens, entry, None, head_ratio, span)

    def _head_encoding(
        self,
        text: str,
        ids: list[int],
        chars: int,
        add_special_tokens: bool,
        entry: object,
        plan: Plan | None,
        tokens_per_byte: float | None = None,
        span: int = 0,
    ) -> HeadEncoding:
        """`text`'s head: its ids up to char `chars`, with a bound and an estimate of the whole prompt's count
        (the rest's bytes at `tokens_per_byte`, by default the recent prompts' ratio)."""
        if tokens_per_byte is None:
            tokens_per_byte = self._tokens_per_byte
        rest_bytes = _utf8_size(self._normalized(text[chars:]))
        framed = 0
        if add_special_tokens:
            assert self._frame is not None
            ids = self._frame[0] + ids
            framed = len(self._frame[1])
        return HeadEncoding(
            text,
            ids,
            chars,
            add_special_tokens,
            len(ids) + self._token_bound(rest_bytes) + framed,
            len(ids) + round(rest_bytes * tokens_per_byte) + framed,
            entry,
            plan,
            span,
        )

    async def _encode_planned(self, plan: Plan, add_special_tokens: bool) -> Tokenized:
        ids = (await self._encode_text_async(plan.text, add_special_tokens, plan))[0]
        assert self._prefix is not None
        shared = self._prefix.shared(plan)
        if shared is None:
            return Tokenized(ids)
        framed = len(self._frame[0]) if add_special_tokens and self._frame is not None else 0
        return Tokenized(ids, shared[0], framed + shared[1])

    def _learn_tokens_per_byte(self, tokens: int, text: str) -> float:
        """Moves the recent ratio toward `text`'s, and returns `text`'s."""
        ratio = tokens / _utf8_size(text)
        self._tokens_per_byte += 0.1 * (ratio - self._tokens_per_byte)
        return ratio

    def _normalized(self, text: str) -> str:
        return self._normalizer.normalize_str(text) if self._normalizer is not None else text

    def _token_bound(self, normalized_bytes: int) -> int:
        """No encoding of a text has more tokens than this, given the UTF-8 size of the text normalized: a
        byte-level BPE token covers at least one byte of it; with Metaspace, a space becomes "\u2581" (3
        bytes, which byte fallback may spell as 3 tokens) and one may be prepended."""
        assert self._prefix is not None
        return 3 * normalized_bytes + 1 if self._prefix.metaspace else normalized_bytes

    # -- completions ------------------------------------------------------------------------------------

    def encode_prompt(
        self, prompt: str | Sequence[int], *, add_special_tokens: bool = True, release_gil: bool = False
    ) -> list[int]:
        """`release_gil`: encode through `encode_batch`, which lets the process's other threads run meanwhile
        (for a caller on a worker thread; on the event loop a short `encode` costs less)."""
        if isinstance(prompt, str):
            return self._encode_text(prompt, add_special_tokens, release_gil)
        return self.validate_token_ids(prompt)

    async def encode_prompt_async(self, prompt: str | Sequence[int], *, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return (await self._encode_text_async(prompt, add_special_tokens))[0]
        return self.validate_token_ids(prompt)

    def validate_token_ids(self, token_ids: Sequence[int]) -> list[int]:
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
            raise TokenizerError("prompt must be a string or a list of token ids")
        ids = list(token_ids)
        if not ids:
            raise TokenizerError("prompt is empty")
        for position, token in enumerate(ids):
            if type(token) is not int:
                raise TokenizerError(f"prompt token at position {position} is not an integer: {token!r}")
            if not 0 <= token <= self.max_token_id:
                raise TokenizerError(
                    f"prompt token {token} at position {position} is out of vocabulary (0..{self.max_token_id})"
                )
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=False)

    def incremental_info(self) -> IncrementalInfo:
        """The prefix cache's state and counters (see gateway/incremental.py)."""
        if self._prefix is None:
            return IncrementalInfo(False, self._prefix_off_reason, 0, 0, 0, 0, 0, 0)
        with self._lock:
            completed, routed, prefix_completed = self._heads_completed, self._prefix_routed, self._prefix_completed
            deepened = self._heads_deepened
        return IncrementalInfo(
            True,
            "",
            *self._prefix.counters(),
            heads_completed=completed,
            heads_deepened=deepened,
            prefix_routed=routed,
            prefix_completed=prefix_completed,
        )

    def segment_cache_info(self) -> SegmentCacheInfo:
        if self._segments is None:
            return SegmentCacheInfo(False, self._segments_off_reason, 0, 0, 0, 0, 0)
        return self._segments.info()

    # -- encoding core ----------------------------------------------------------------------------------

    def _encode_text(self, text: str, add_special_tokens: bool, released: bool = False) -> list[int]:
        text = _require_str(text)
        if self._uses_prefix(add_special_tokens):
            return _non_empty(self._finish_prefix(self._prefix_plan(text), add_special_tokens, released=released))
        if self._segments is None or add_special_tokens:
            if released:
                return _non_empty(self._encode_released([text], add_special_tokens)[0])
            return _non_empty(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)
        parts, known, missing = self._segments.lookup(text)
        fresh = self._encode_released(missing, False) if released else self._encode_segments(missing)
        return _non_empty(self._segments.assemble(parts, known, missing, fresh))

    async def _encode_text_async(
        self, text: str, add_special_tokens: bool, plan: Plan | None = None
    ) -> tuple[list[int], bool]:
        text = _require_str(text)
        if self._uses_prefix(add_special_tokens):
            # The lookup runs on the loop (a hash per 128 chars); what is left to encode goes by the
            # offload threshold, like a whole prompt.
            if plan is None:
                plan = self._prefix_plan(text)
            if plan.done or len(plan.text) - plan.cut < self.config.offload_threshold_chars:
                return _non_empty(self._finish_prefix(plan, add_special_tokens, released=False)), False
            work = functools.partial(self._finish_prefix, plan, add_special_tokens, released=True)
            ids = await asyncio.get_running_loop().run_in_executor(self._executor, work)
            if len(text) >= _RATIO_MIN_CHARS:
                self._learn_tokens_per_byte(len(ids), text)
            return _non_empty(ids), True
        if self._segments is None or add_special_tokens:
            if len(text) < self.config.offload_threshold_chars:
                return self._encode_text(text, add_special_tokens), False
            loop = asyncio.get_running_loop()
            ids = await loop.run_in_executor(self._executor, self._encode_released, [text], add_special_tokens)
            return _non_empty(ids[0]), True
        parts, known, missing = self._segments.lookup(text)
        if sum(map(len, missing)) < self.config.offload_threshold_chars:
            fresh = self._encode_segments(missing)
            offloaded = False
        else:
            loop = asyncio.get_running_loop()
            fresh = await loop.run_in_executor(self._executor, self._encode_released, missing, False)
            offloaded = True
        return _non_empty(self._segments.assemble(parts, known, missing, fresh)), offloaded

    def _uses_prefix(self, add_special_tokens: bool) -> bool:
        return self._prefix is not None and (not add_special_tokens or self._frame is not None)

    def _prefix_plan(self, text: str) -> Plan:
        assert self._prefix is not None
        return self._prefix.plan(text)

    def _finish_prefix(self, plan: Plan, add_special_tokens: bool, *, released: bool) -> list[int]:
        """plan's ids: its cached prefix + the encoding of the rest (with the GIL released when
        `released`, see the module docstring), framed by the special tokens when asked."""
        assert self._prefix is not None
        if released and not plan.done and self._split_parts > 1:
            # finish_split encodes a tail too short to split whole, as the branch below would.
            ids = self._prefix.finish_split(plan, self._split_parts)
        else:
            tail = None
            if not plan.done:
                if released:
                    tail = self._backend.encode_batch([plan.tail], add_special_tokens=False)[0]
                else:
                    tail = self._backend.encode(plan.tail, add_special_tokens=False)
            ids = self._prefix.finish(plan, tail)
        if add_special_tokens:
            assert self._frame is not None
            return self._frame[0] + ids + self._frame[1]
        return ids

    def _prefix_cache(self) -> tuple[PrefixCache | None, str, tuple[list[int], list[int]] | None]:
        """The prefix cache when cutting is exact for this tokenizer (and the special-token frame when
        completions can use it too), else None and why."""
        if self.config.segment_cache_bytes == 0:
            return None, "segment_cache_bytes is 0", None
        if not self.config.prefix_cache:
            return None, "prefix_cache is off", None
        reason = incremental.unsupported_reason(self._backend)
        if reason:
            return None, reason, None
        metaspace = incremental.uses_metaspace(self._backend)
        samples = list(self._prefix_samples())
        for cached, new in incremental.self_test_pairs(samples):
            probe = PrefixCache(self._backend, 1 << 30, metaspace)
            probe.finish(probe.plan(cached), self._backend.encode(cached, add_special_tokens=False))
            plan = probe.plan(new)
            tail = None if plan.done else self._backend.encode(plan.tail, add_special_tokens=False)
            if probe.finish(plan, tail) != self._backend.encode(new, add_special_tokens=False).ids:
                return None, f"self-test: incremental ids differ from whole-string ids for {new!r}", None
        frame = incremental.special_token_frame(self._backend, samples)
        return PrefixCache(self._backend, self.config.segment_cache_bytes, metaspace), "", frame

    def _prefix_samples(self) -> Iterator[str]:
        added = sorted(token.content for token in self._backend.get_added_tokens_decoder().values())
        yield _SELF_TEST_PROSE
        yield "".join(f"{text}{token}" for text, token in zip(_SELF_TEST_TEXTS * 4, added[:48]))
        messages = [
            {"role": role, "content": text}
            for role, text in zip(("system", "user", "assistant", "user"), _SELF_TEST_PROSE.split("\n\n"))
        ]
        try:
            yield self.render_chat(messages, add_generation_prompt=True)
        except TokenizerError:
            pass

    def _long_samples(self) -> Iterator[str]:
        """The prefix cache's self-test samples, each repeated to 1k+ chars (for split and head self-tests)."""
        for sample in self._prefix_samples():
            yield (sample + " ") * (8 * 128 // max(1, len(sample)) + 1)

    def _split_setting(self) -> tuple[int, str]:
        """How many parts a long text is encoded in (1: whole) and, when 1, why: the parts are joined only
        where a cut is exact, and a load-time self-test compares split with whole encodes first."""
        parts = self.config.split_parts if self.config.split_parts is not None else _usable_cpus()
        if parts < 1:
            raise TokenizerError(f"split_parts must be >= 1, got {parts}")
        if self._prefix is None:
            return 1, "the prefix cache is off"
        if parts == 1:
            return 1, "split_parts is 1" if self.config.split_parts is not None else "one CPU"
        for text in self._long_samples():
            probe = PrefixCache(
                self._backend, 1 << 30, self._prefix.metaspace, split_min_chars=128, split_overlap_chars=64
            )
            if probe.finish_split(probe.plan(text), 4) != self._backend.encode(text, add_special_tokens=False).ids:
                return 1, "self-test: split ids differ from whole-string ids"
        return parts, ""

    def _head_setting(self) -> tuple[int, str]:
        """The head length (0: heads off) and, when 0, why: a head is cut where a split encode's join would
        be, and a load-time self-test compares heads with whole encodes first."""
        if self.config.head_chars < 0:
            raise TokenizerError(f"head_chars must be >= 0 (0: off), got {self.config.head_chars}")
        if self._prefix is None:
            return 0, "the prefix cache is off"
        if self.config.head_chars == 0:
            return 0, "head_chars is 0"
        for text in self._long_samples():
            whole = self._backend.encode(text, add_special_tokens=False)
            for chars in range(64, len(text) // 2, 197):
                probe = PrefixCache(self._backend, 1 << 30, self._prefix.metaspace, split_overlap_chars=64)
                found = probe.head(probe.plan(text), chars)
                if found is None:
                    continue
                ids, end, _ = found
                at = whole.token_to_chars(len(ids)) if len(ids) < len(whole.ids) else None
                if ids != whole.ids[: len(ids)] or at is None or at[0] != end:
                    return 0, "self-test: head ids differ from whole-string ids"
        return self.config.head_chars, ""

    def _encode_segments(self, texts: list[str]) -> list[list[int]]:
        return [self._backend.encode(text, add_special_tokens=False).ids for text in texts]

    def _encode_released(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        # encode_batch releases the GIL while it runs; encode does not (see the module docstring).
        return [encoding.ids for encoding in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def _segment_cache(self) -> tuple[_SegmentCache | None, str]:
        """The segment cache when segment-wise encoding equals whole-string encoding for this tokenizer."""
        if self.config.segment_cache_bytes == 0:
            return None, "segment_cache_bytes is 0"
        reason = _unsplittable_reason(self._backend)
        if reason:
            return None, reason
        cache = _SegmentCache(self._backend.get_added_tokens_decoder(), self.config.segment_cache_bytes)
        for sample in self._self_test_samples():
            parts, _, missing = cache.split_only(sample)
            fresh = self._encode_segments(missing)
            if cache.assemble(parts, {}, missing, fresh, store=False) != self._encode_segments([sample])[0]:
                return None, f"self-test: segment-wise ids differ from whole-string ids for {sample!r}"
        return cache, ""

    def _self_test_samples(self) -> Iterator[str]:
        added = sorted(token.content for token in self._backend.get_added_tokens_decoder().values())
        texts = _SELF_TEST_TEXTS
        # Every added token between every kind of neighbour, and back to back.
        yield "".join(f"{texts[i % len(texts)]}{token}" for i, token in enumerate(added)) + texts[-1]
        yield "".join(added) + "".join(reversed(added))
        for text in texts:
            yield text + "".join(f"{token}{text}" for token in added[:8])
        for offset in range(0, len(texts), 3):
            window = (texts * 2)[offset : offset + 4]
            messages = [
                {"role": role, "content": text} for role, text in zip(("system", "user", "assistant", "user"), window)
            ]
            for generation in (True, False):
                try:
                    yield self.render_chat(messages, add_generation_prompt=generation)
                except TokenizerError:
                    continue


# -- segment cache -------------------------------------------------------------------------------------


def _unsplittable_reason(backend: Tokenizer) -> str:
    """Why segment-wise encoding could differ from whole-string encoding, or "" when it cannot."""
    added = backend.get_added_tokens_decoder().values()
    if not added:
        return "the tokenizer has no added tokens to split at"
    if backend.encode_special_tokens:
        return "split_special_tokens is set (special tokens are not split out)"
    for token in added:
        if token.lstrip or token.rstrip or token.single_word:
            return f"added token {token.content!r} has lstrip/rstrip/single_word"
        # Normalized added tokens are matched on normalized text; without a normalizer that is the raw text.
        if token.normalized and backend.normalizer is not None:
            return f"added token {token.content!r} is matched after normalization"
    pre_tokenizer = json.dumps(json.loads(backend.to_str()).get("pre_tokenizer"), separators=(",", ":"))
    if '"prepend_scheme":"first"' in pre_tokenizer:
        return "the pre-tokenizer prepends to the first segment only"
    return ""


def _alternation(contents: list[str]) -> re.Pattern[str] | None:
    # Longest first: at the leftmost match position the regex then takes the longest token, like the
    # leftmost-longest Aho-Corasick automaton tokenizers splits with.
    if not contents:
        return None
    return re.compile("|".join(map(re.escape, sorted(contents, key=len, reverse=True))))


def _entry_bytes(text: str, ids: list[int]) -> int:
    # The string, the list's pointers, an int object per id, and the dict entry + list header.
    return sys.getsizeof(text) + 36 * len(ids) + 120


class _SegmentCache:
    """Splits a prompt at the added tokens like tokenizers does; an LRU of text segment -> ids. Thread-safe."""

    def __init__(self, added_tokens: Mapping[int, Any], budget_bytes: int) -> None:
        self._ids = {token.content: token_id for token_id, token in added_tokens.items()}
        # tokenizers splits at the non-normalized tokens first, then each piece at the normalized ones.
        self._passes = [
            pattern
            for pattern in (
                _alternation([token.content for token in added_tokens.values() if not token.normalized]),
                _alternation([token.content for token in added_tokens.values() if token.normalized]),
            )
            if pattern is not None
        ]
        self._budget = budget_bytes
        self._entries: OrderedDict[str, list[int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._encoded_chars = 0

    def _split(self, text: str) -> list[str | int]:
        parts: list[str | int] = [text]
        for pattern in self._passes:
            split: list[str | int] = []
            for part in parts:
                if isinstance(part, int):
                    split.append(part)
                    continue
                start = 0
                for match in pattern.finditer(part):
                    split += [part[start : match.start()], self._ids[match.group()]]
                    start = match.end()
                split.append(part[start:])
            parts = split
        return [part for part in parts if part != ""]

    def split_only(self, text: str) -> tuple[list[str | int], dict[str, list[int]], list[str]]:
        parts = self._split(text)
        return parts, {}, list(dict.fromkeys(part for part in parts if isinstance(part, str)))

    def lookup(self, text: str) -> tuple[list[str | int], dict[str, list[int]], list[str]]:
        """The prompt's parts, the cached ids of its known segments, and its distinct uncached segments."""
        parts = self._split(text)
        known: dict[str, list[int]] = {}
        missing: dict[str, None] = {}
        with self._lock:
            for part in parts:
                if isinstance(part, int) or part in known or part in missing:
                    continue
                ids = self._entries.get(part)
                if ids is None:
                    missing[part] = None
                else:
                    self._entries.move_to_end(part)
                    known[part] = ids
            self._hits += len(known)
            self._misses += len(missing)
            self._encoded_chars += sum(map(len, missing))
        return parts, known, list(missing)

    def assemble(
        self,
        parts: list[str | int],
        known: dict[str, list[int]],
        missing: list[str],
        fresh: list[list[int]],
        *,
        store: bool = True,
    ) -> list[int]:
        """The prompt's ids from its parts; `fresh` are the encodings of `missing`, cached when `store`."""
        segments = {**known, **dict(zip(missing, fresh))}
        if store:
            self._store(zip(missing, fresh))
        ids: list[int] = []
        for part in parts:
            if isinstance(part, int):
                ids.append(part)
            else:
                ids += segments[part]
        return ids

    def _store(self, entries: Iterator[tuple[str, list[int]]]) -> None:
        with self._lock:
            for text, ids in entries:
                size = _entry_bytes(text, ids)
                if size > self._budget or text in self._entries:
                    continue
                self._entries[text] = ids
                self._bytes += size
                while self._bytes > self._budget:
                    old_text, old_ids = self._entries.popitem(last=False)
                    self._bytes -= _entry_bytes(old_text, old_ids)

    def info(self) -> SegmentCacheInfo:
        with self._lock:
            return SegmentCacheInfo(
                True, "", len(self._entries), self._bytes, self._hits, self._misses, self._encoded_chars
            )


# -- message normalisation (vLLM's chat_utils, text-only) ---------------------------------------------------


def normalize_messages(messages: Sequence[Mapping[str, Any]], content_format: ContentFormat) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TokenizerError("messages must be a non-empty array")
    return [_normalize_message(index, message, content_format) for index, message in enumerate(messages)]


def _normalize_message(index: int, message: Any, content_format: ContentFormat) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise TokenizerError(f"{where} must be an object")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise TokenizerError(f"{where}.role must be a non-empty string")
    texts = _content_texts(where, message.get("content"))
    normalized: dict[str, Any] = {"role": role}
    if content_format == "openai":
        normalized["content"] = [{"type": "text", "text": text} for text in texts]
    else:
        normalized["content"] = "\n".join(texts)
    if role == "assistant" and message.get("tool_calls") is not None:
        normalized["tool_calls"] = _normalize_tool_calls(where, message["tool_calls"])
    if role == "tool" and "tool_call_id" in message:
        normalized["tool_call_id"] = message["tool_call_id"]
    if isinstance(message.get("name"), str):
        normalized["name"] = message["name"]
    return normalized


def _content_texts(where: str, content: Any) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
        raise TokenizerError(f"{where}.content must be a string, an array of content parts, or null")
    texts = []
    for position, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise TokenizerError(f"{where}.content[{position}] must be an object")
        if part.get("type") != "text":
            raise TokenizerError(
                f"{where}.content[{position}]: unsupported content part type {part.get('type')!r} (text only)"
            )
        if not isinstance(part.get("text"), str):
            raise TokenizerError(f"{where}.content[{position}].text must be a string")
        texts.append(part["text"])
    return texts


def _normalize_tool_calls(where: str, tool_calls: Any) -> list[dict[str, Any]]:
    if isinstance(tool_calls, (str, bytes, Mapping)) or not isinstance(tool_calls, Sequence):
        raise TokenizerError(f"{where}.tool_calls must be an array")
    normalized = []
    for position, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise TokenizerError(f"{where}.tool_calls[{position}] needs a function with a string name")
        arguments = function.get("arguments")
        # vLLM 0.32 hands templates parsed arguments: a JSON object string becomes a dict; empty, not JSON
        # (a malformed call in a conversation's history must not fail every later turn) or JSON that is not
        # an object becomes {}.
        if isinstance(arguments, str) and arguments:
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {}
            except RecursionError:
                raise TokenizerError(
                    f"{where}.tool_calls[{position}].function.arguments is nested too deeply"
                ) from None
        if not isinstance(arguments, Mapping):
            arguments = {}
        normalized.append({**call, "function": {**function, "arguments": arguments}})
    return normalized


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The shape vLLM's pydantic `model_dump()` hands the template: declared fields first, None kept."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TokenizerError("tools must be an array")
    normalized = []
    for position, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise TokenizerError(f"tools[{position}] needs a function with a string name")
        normalized.append(
            {
                "type": tool.get("type", "function"),
                "function": {
                    "name": function["name"],
                    "description": function.get("description"),
                    "parameters": function.get("parameters"),
                    **{k: v for k, v in function.items() if k not in ("name", "description", "parameters")},
                },
                **{k: v for k, v in tool.items() if k not in ("type", "function")},
            }
        )
    return normalized


# -- content format detection (vLLM's _detect_content_format) ----------------------------------------------


@functools.lru_cache(maxsize=16)
def detect_content_format(chat_template: str) -> ContentFormat:
    """'openai' when the template loops over a message's content (it expects a list of parts), else 'string'."""
    try:
        root = _compile_jinja_template(chat_template).environment.parse(chat_template)
    except jinja2.TemplateError:
        return "string"
    message_names = {name for _, name in _loops_over(root, _assigned_names(root, "messages"), None)}
    return "openai" if any(True for _ in _loops_over(root, message_names, "content")) else "string"


def _is_access(node: jinja2.nodes.Node, name: str, key: str | None) -> bool:
    if isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)):
        return node.node is not None and _is_access(node.node, name, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _is_access(node.node, name, key)
    if key is None:
        return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name
    if isinstance(node, jinja2.nodes.Getitem):
        return _is_access(node.node, name, None) and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_access(node.node, name, None) and node.attr == key
    return False


def _assigned_names(root: jinja2.nodes.Template, name: str) -> set[str]:
    """`name` plus every variable assigned from it (or a slice / filter of it), transitively."""
    names, pending = {name}, deque([name])
    while pending:
        current = pending.popleft()
        for assign in root.find_all(jinja2.nodes.Assign):
            if isinstance(assign.target, jinja2.nodes.Name) and _is_access(assign.node, current, None):
                if assign.target.name not in names:
                    names.add(assign.target.name)
                    pending.append(assign.target.name)
    return names


def _loops_over(
    root: jinja2.nodes.Template, names: set[str], key: str | None
) -> Iterator[tuple[jinja2.nodes.For, str]]:
    for loop in root.find_all(jinja2.nodes.For):
        if isinstance(loop.target, jinja2.nodes.Name) and any(_is_access(loop.iter, name, key) for name in names):
            yield loop, loop.target.name


# -- loading ---------------------------------------------------------------------------------------------


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _looks_like_path(model: str) -> bool:
    # A hub id is "name" or "org/name"; anything else is a filesystem path.
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def _load_tokenizer(config: PreprocessorConfig) -> Any:
    model = config.model
    if not isinstance(model, str) or not model.strip():
        raise TokenizerError("model must be a hub id or a local directory")
    path = pathlib.Path(model).expanduser()
    if path.exists() and not path.is_dir():
        raise TokenizerError(f"model path is not a directory: {model}")
    if not path.exists() and _looks_like_path(model):
        raise TokenizerError(f"model directory not found: {model}")
    source = str(path) if path.is_dir() else model
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        where = "directory" if path.is_dir() else "hub id"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TokenizerError(f"cannot load a tokenizer from {where} {model!r}: {reason}") from exc
    if not isinstance(getattr(tokenizer, "backend_tokenizer", None), Tokenizer):
        raise TokenizerError(f"{model!r} has no fast (tokenizers) backend; kvgate needs a tokenizer.json")
    return tokenizer


def _read_template_override(override: str | None) -> str | None:
    # Like vLLM's --chat-template: text containing Jinja markup is the template, anything else a file path.
    if override is None or "{" in override:
        return override
    candidate = pathlib.Path(override).expanduser()
    if not candidate.is_file():
        raise TokenizerError(f"chat template file not found: {override}")
    return candidate.read_text(encoding="utf-8")


def _private_backend(tokenizer: Any) -> Tokenizer:
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend


def _read_model_config(config: PreprocessorConfig) -> dict[str, Any]:
    path = pathlib.Path(config.model).expanduser()
    try:
        if path.is_dir():
            file = path / "config.json"
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        downloaded = hf_hub_download(config.model, "config.json", revision=config.revision)
        return json.loads(pathlib.Path(downloaded).read_text(encoding="utf-8"))
    except (OSError, ValueError, HfHubHTTPError):
        # config.json is optional: the tokenizer's model_max_length is the fallback.
        return {}


def _context_length(config: PreprocessorConfig, tokenizer: Any) -> int:
    model_config = _read_model_config(config)
    text_config = model_config.get("text_config")
    merged = {**model_config, **text_config} if isinstance(text_config, dict) else model_config
    found = [merged[key] for key in CONTEXT_LENGTH_KEYS if type(merged.get(key)) is int and merged[key] > 0]
    if found:
        return min(found)
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max_length, int) and 0 < model_max_length < _UNSET_MODEL_MAX_LENGTH:
        return model_max_length
    raise TokenizerError(f"cannot tell the context length of {config.model!r}: set context_length")


def _utf8_size(text: str) -> int:
    # An ASCII string's UTF-8 is its chars (isascii reads a flag): no 30 KB copy for an 8k-token prompt.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _require_str(text: Any) -> str:
    if not isinstance(text, str):
        raise TokenizerError("prompt must be a string or a list of token ids")
    return text


def _non_empty(token_ids: list[int]) -> list[int]:
    if not token_ids:
        raise TokenizerError("prompt is empty")
    return token_ids
