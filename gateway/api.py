"""The OpenAI request fields the gateway reads, validated; everything else passes through.

``parse_chat`` / ``parse_completion`` take the raw body bytes and return what routing
needs (messages or prompt, model, stream, token budget, ``cache_salt``) or raise
``ApiError`` (400).
The body forwarded to the worker is the client's bytes, never a re-serialization of
these objects, so fields this module does not know still reach vLLM untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from kvgate.gateway.errors import ApiError, bad_request, too_many_messages
from kvgate.protocol import lax
from kvgate.protocol.http import TruncationRefused, truncated_ids, without_bom

T = TypeVar("T")

# Deeper JSON than this is refused (400): rendering and re-parsing it would recurse past
# Python's limit. Tool parameter schemas in the wild stay far below it.
MAX_JSON_DEPTH = 64

# Chat-template inputs vLLM accepts besides the messages, handed to the template renderer
# so the gateway hashes the prompt the worker will actually see.
TEMPLATE_FIELDS = ("tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "chat_template")

# vLLM 0.32's rules for ``cache_salt`` (``validate_cache_salt``): refused here as the worker
# would refuse it, before a salt the engine never uses could key the routing.
MAX_CACHE_SALT_LENGTH = 128
_CACHE_SALT_FORBIDDEN = frozenset("@/\\\x00")


@dataclass(slots=True)
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]
    stream: bool
    max_tokens: int | None
    template_args: dict[str, Any] = field(default_factory=dict)
    cache_salt: str | None = None
    n: int = 1
    truncation: Truncation | None = None


@dataclass(slots=True)
class CompletionRequest:
    model: str | None
    # One entry per prompt of a batch: text, or token ids the client already has.
    prompts: list[str | list[int]]
    stream: bool
    max_tokens: int | None
    cache_salt: str | None = None
    n: int = 1
    truncation: Truncation | None = None


@dataclass(frozen=True, slots=True)
class Truncation:
    """vLLM's ``truncate_prompt_tokens`` / ``truncation_side``: the engine keeps ``keep`` of the prompt's
    tokens (-1: the context window less one), the last ones unless ``side`` is 'right', so the gateway
    counts and hashes those."""

    keep: int
    side: str | None = None

    def apply(self, ids: list[int], context_length: int) -> list[int]:
        """The ids the engine keeps; ``ApiError`` where vLLM 0.32 refuses the request instead."""
        try:
            return truncated_ids(ids, self.keep, self.side, context_length)
        except TruncationRefused as refused:
            raise bad_request(refused.message, refused.param) from None


def parse_json_object(body: bytes, max_messages: int | None = None) -> dict[str, Any]:
    if not body:
        raise bad_request("Request body is empty; expected a JSON object.")
    body = without_bom(body)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        data = _python_json(body, exc)
    if not isinstance(data, dict):
        raise bad_request(f"Request body must be a JSON object, not {_type_name(data)}.")
    messages = data.get("messages")
    # Counted before the depth walk, which costs time per message on the event loop.
    if max_messages is not None and isinstance(messages, list) and len(messages) > max_messages:
        raise too_many_messages(len(messages), max_messages)
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise bad_request(f"Request body is nested more than {MAX_JSON_DEPTH} levels deep.")
    return data


def _python_json(body: bytes, error: orjson.JSONDecodeError) -> Any:
    """What orjson refuses but vLLM's parser (Python's json) reads: NaN, Infinity and -Infinity as
    numbers, a lone surrogate escape in a string; anything else is refused with orjson's words."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise bad_request(f"Request body is not valid JSON: {error}") from None
    if _has_lone_surrogate(data):
        # Not text a tokenizer can encode: vLLM's tokenizer refuses it in a prompt with these words (the
        # gateway refuses it in any field; vLLM would serve one outside the prompt).
        raise bad_request("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
    return data


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _depth_exceeds(value: Any, limit: int) -> bool:
    """True when ``value`` nests containers deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return False


def parse_chat(body: bytes, max_messages: int | None = None) -> ChatRequest:
    data = parse_json_object(body, max_messages)
    messages = data.get("messages")
    if "messages" not in data:
        raise bad_request("Missing required field `messages`.", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list of {role, content} objects.", "messages")
    for i, message in enumerate(messages):
        _check_message(i, message)
    common = _common(data, token_budget=("max_completion_tokens", "max_tokens"))
    template_args = {k: data[k] for k in TEMPLATE_FIELDS if data.get(k) is not None}
    for name in ("add_generation_prompt", "continue_final_message"):
        if name in template_args:
            # The template sees what the engine's request model made of the value ("no" is false there).
            template_args[name] = _optional(data, name, lax.as_bool, "a boolean")
    _optional(data, "chat_template_kwargs", lax.as_dict, "an object")
    _optional(data, "chat_template", lax.as_str, "a string")
    _optional(data, "tools", lax.as_list, "a list")
    return ChatRequest(
        common.model,
        messages,
        common.stream,
        common.max_tokens,
        template_args,
        common.cache_salt,
        common.n,
        common.truncation,
    )


def parse_completion(body: bytes) -> CompletionRequest:
    data = parse_json_object(body)
    if "prompt" not in data:
        raise bad_request("Missing required field `prompt`.", "prompt")
    prompts = _prompts(data["prompt"])
    # vLLM answers an echoed prompt with no tokens at all (`max_tokens` 0: the prompt and its logprobs).
    echo = _optional(data, "echo", lax.as_bool, "a boolean") is True
    common = _common(data, token_budget=("max_tokens",), zero_ok=echo)
    return CompletionRequest(
        common.model, prompts, common.stream, common.max_tokens, common.cache_salt, common.n, common.truncation
    )


@dataclass(slots=True)
class _Common:
    model: str | None
    stream: bool
    max_tokens: int | None
    cache_salt: str | None
    n: int
    truncation: Truncation | None


def _common(data: dict[str, Any], token_budget: tuple[str, ...], zero_ok: bool = False) -> _Common:
    # vLLM makes `model` optional (it serves one model); the gateway follows it.
    model = _optional(data, "model", lax.as_str, "a string")
    stream = _optional(data, "stream", lax.as_bool, "a boolean")
    max_tokens = None
    for name in token_budget:
        value = _positive_int(data, name, minimum=0 if zero_ok else 1)
        if value is not None and max_tokens is None:
            max_tokens = value
    n = _positive_int(data, "n")
    temperature, top_p = (_optional(data, name, lax.as_float, "a number") for name in ("temperature", "top_p"))
    for name in ("presence_penalty", "frequency_penalty"):
        _optional(data, name, lax.as_float, "a number")
    if temperature is not None and temperature < 0:
        raise bad_request("`temperature` must be >= 0.", "temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad_request("`top_p` must be in (0, 1].", "top_p")
    stop = data.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise bad_request("`stop` must be a string or a list of strings.", "stop")
    _optional(data, "stream_options", lax.as_dict, "an object")
    # vLLM 0.32 answers a 500 to a non-object here (it calls .get on it): refused as the client's mistake.
    _optional(data, "structured_outputs", lax.as_dict, "an object")
    n = 1 if n is None else n
    return _Common(model, bool(stream), max_tokens, _cache_salt(data), n, _truncation(data))


def _truncation(data: dict[str, Any]) -> Truncation | None:
    keep = _optional(data, "truncate_prompt_tokens", lax.as_int, "an integer")
    if keep is not None and not -1 <= keep <= lax.INT64_MAX:
        raise bad_request(f"`truncate_prompt_tokens` must be in [-1, 2**63 - 1], got {keep}.", "truncate_prompt_tokens")
    side = data.get("truncation_side")
    if side is not None and side not in ("left", "right"):
        raise bad_request("`truncation_side` must be 'left' or 'right'.", "truncation_side")
    return None if keep is None else Truncation(keep, side)


def _cache_salt(data: dict[str, Any]) -> str | None:
    salt = data.get("cache_salt")
    if salt is None:
        return None
    if type(salt) is not str or not salt:
        raise bad_request("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    if len(salt) > MAX_CACHE_SALT_LENGTH or not _CACHE_SALT_FORBIDDEN.isdisjoint(salt):
        raise bad_request(
            f"Parameter 'cache_salt' must be at most {MAX_CACHE_SALT_LENGTH} characters and must "
            "not contain '@', '/', '\\\\', or NUL.",
            "cache_salt",
        )
    return salt


def _check_message(i: int, message: Any) -> None:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(f"`{param}` must be an object with `role` and `content`.", param)
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise bad_request(f"`{param}.role` must be a non-empty string.", f"{param}.role")
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise bad_request(f"`{param}.name` must be a string, not {_type_name(name)}.", f"{param}.name")
    if "content" not in message:
        # An assistant turn that only calls tools legitimately carries no content.
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            return
        raise bad_request(f"`{param}.content` is required.", f"{param}.content")
    content = message["content"]
    if content is None:
        if role == "assistant":
            return
        raise bad_request(f"`{param}.content` must not be null for role `{role}`.", f"{param}.content")
    if isinstance(content, str):
        return
    if isinstance(content, list) and all(
        isinstance(part, dict) and isinstance(part.get("type"), str) for part in content
    ):
        return
    raise bad_request(
        f"`{param}.content` must be a string or a list of content parts with a `type`.", f"{param}.content"
    )


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        ids = _token_ids(prompt)
        if ids is not None:
            return [ids]
        batch = [_token_ids(p) if isinstance(p, list) and p else None for p in prompt]
        if all(ids is not None for ids in batch):
            return [ids for ids in batch if ids is not None]
    raise bad_request(
        "`prompt` must be a string, a non-empty list of strings, a list of token ids or a list of token-id lists.",
        "prompt",
    )


def _token_ids(values: list[Any]) -> list[int] | None:
    """Token ids as vLLM's request model reads them (pydantic's lax mode: ``true`` is 1, ``5.0`` is 5),
    none negative; None when they are not."""
    if all(type(value) is int and value >= 0 for value in values):
        return values
    ids = []
    for value in values:
        if isinstance(value, str):
            return None
        try:
            token = lax.as_int(value)
        except lax.LaxError:
            return None
        if token < 0:
            return None
        ids.append(token)
    return ids


def _optional(data: dict[str, Any], name: str, read: Callable[[Any], T], described: str) -> T | None:
    """A field as vLLM's request model reads it (``protocol.lax``: pydantic's lax mode), None when absent."""
    value = data.get(name)
    if value is None:
        return None
    try:
        return read(value)
    except lax.LaxError as err:
        raise bad_request(f"`{name}` must be {described}, not {_type_name(value)} ({err.msg}).", name) from None


def _positive_int(data: dict[str, Any], name: str, minimum: int = 1) -> int | None:
    value = _optional(data, name, lax.as_int, "an integer")
    if value is not None and value < minimum:
        raise bad_request(f"`{name}` must be >= {minimum}, got {value}.", name)
    return value


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


__all__ = [
    "ApiError",
    "ChatRequest",
    "CompletionRequest",
    "Truncation",
    "parse_chat",
    "parse_completion",
    "parse_json_object",
]
