"""The OpenAI surface as vLLM serves it: request validation, errors, response shapes.

Owns what a request may contain and what every answer looks like on the wire; never
tokenizes (``prompt``) or schedules (``engine_loop``). Sampling fields the simulation
has no use for are accepted and ignored (``temperature``, ``top_p`` and ``seed`` once
their type and range check out); unknown fields are ignored, as vLLM does (``best_of``
among them: vLLM 0.32's OpenAI requests no longer have it). ``n`` > 1 answers ``n``
choices, each its own engine request, and ``/v1/completions`` takes a batch of prompts,
as vLLM 0.32 does; so are logprobs (made-up figures in vLLM's shapes) and ``echo``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from kvgate.protocol import lax
from kvgate.protocol.http import TruncationRefused, model_card, truncated_ids, without_bom

_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` (vLLM's shape)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or _ERROR_TYPES.get(status, "BadRequestError")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def _summary(value: Any) -> str:
    """A validation error's ``input`` as vLLM shows it: containers by size, other values as text."""
    if isinstance(value, (list, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= 200 else text[:200] + "...[truncated]"


def validation_error(errors: list[dict[str, Any] | str]) -> ApiError:
    """vLLM's answer to a request its pydantic model refuses: ``type`` "Bad Request", ``param`` the first
    error's location, and the errors listed (at most 10), each as pydantic reports it."""
    lines = []
    for error in errors[:10]:
        if isinstance(error, dict):
            error = {**error, "input": _summary(error["input"])} if "input" in error else error
        text = str(error)
        lines.append(text if len(text) <= 1000 else text[:1000] + "...[truncated]")
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "\n".join(f"  {line}" for line in lines)
    if len(errors) > 10:
        message += f"\n  ...and {len(errors) - 10} more {label}"
    first = errors[0] if errors else None
    return ApiError(400, message, first["loc"] if isinstance(first, dict) else None, "Bad Request")


def invalid(loc: str, kind: str, msg: str, value: Any, **ctx: Any) -> ApiError:
    """One pydantic error at ``loc`` (``body.max_tokens``)."""
    error: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": value}
    if ctx:
        error["ctx"] = ctx
    return validation_error([error])


class DetailError(ApiError):
    """FastAPI's own answer, ``{"detail": ...}``, rather than an OpenAI error."""

    def body(self) -> dict[str, Any]:
        return {"detail": self.message}


def json_body(raw: bytes) -> Any:
    """A request body as vLLM's server reads it: empty is a missing body, bad JSON names where it broke,
    and JSON nested past what Python's parser recurses through is FastAPI's bare "error parsing the body"."""
    if not raw:
        raise invalid("body", "missing", "Field required", None)
    raw = without_bom(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # the standard library's words and position, as FastAPI reports them
            # It reads NaN, Infinity and -Infinity as numbers, which orjson refuses: so does vLLM.
            return json.loads(raw)
        except RecursionError:
            raise DetailError(400, "There was an error parsing the body") from None
        except ValueError as err:
            if isinstance(err, json.JSONDecodeError):
                raise invalid(f"body.{err.pos}", "json_invalid", "JSON decode error", {}, error=err.msg) from None
        raise invalid("body", "json_invalid", "JSON decode error", {}, error="Invalid JSON") from None


def _lax_error(name: str, value: Any, err: lax.LaxError) -> ApiError:
    if err.at is not None:  # an item of a list
        return invalid(f"body.{name}.{err.at}", err.kind, err.msg, err.value)
    return invalid(f"body.{name}", err.kind, err.msg, value)


@dataclass(frozen=True, slots=True)
class GenerateParams:
    kind: Literal["chat", "completion"]
    model: str | None
    messages: list[dict[str, Any]] | None  # chat
    tools: list[Any] | None  # chat, passed to the chat template
    add_generation_prompt: bool  # chat
    prompt: str | list[int] | None  # completion: text or token ids (the first of a batch)
    max_tokens: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    cache_salt: str | None
    # chat: continue_final_message, chat_template_kwargs and the request's own chat_template, as vLLM renders them
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    n: int = 1
    # completion: every prompt of a batch (``prompt`` is the first); a lone prompt: (prompt,)
    prompts: tuple[str | list[int], ...] = ()
    # Sample logprobs: None (none asked), else how many of the most likely tokens each position lists
    # (chat: top_logprobs when logprobs is true; completions: logprobs).
    logprobs: int | None = None
    # completions: the prompt before each choice's text (max_tokens 0: the prompt only); chat: the last
    # message's content before each choice's, when that message has the answer's role (``chat_echo``)
    echo: bool = False
    role: str = "assistant"  # chat: the answer's role (the last message's without a generation prompt)
    # How many of the most likely tokens each prompt position lists besides the prompt's own (None: no
    # prompt logprobs); an echo asks for them as vLLM does (chat: top_logprobs, completions: logprobs).
    prompt_logprobs: int | None = None
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk
    return_token_ids: bool = False  # vLLM's: the answer's token ids and its prompt's, beside the text
    # Token ids the request names (logit_bias keys, allowed_token_ids), by field: vLLM checks them
    # against the vocabulary (``check_vocabulary``).
    vocabulary_ids: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # truncate_prompt_tokens and truncation_side (``truncated``)
    truncate: int | None = None
    truncation_side: str | None = None


_MAX_CACHE_SALT_LENGTH = 128
# vLLM's VLLM_MAX_N_SEQUENCES and VLLM_MAX_COMPLETION_PROMPTS defaults.
MAX_N = 16384
MAX_COMPLETION_PROMPTS = 1024
MAX_LOGPROBS = 20  # vLLM's --max-logprobs default
MAX_STOP_STRINGS = 4  # vLLM's VLLM_MAX_STOP_STRINGS default
_RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema", "structural_tag"})
_SAMPLING_EPS = 1e-5  # a temperature below it is greedy sampling
_CACHE_SALT_FORBIDDEN = frozenset("@/\\\x00")


def _bad(message: str, param: str | None = None, value: Any = None) -> ApiError:
    """vLLM's ``VLLMValidationError`` (or a ``ValueError``, with no parameter): a 400 whose message names
    the parameter and the value refused, when it has them."""
    extras = [f"parameter={param}"] if param is not None else []
    if value is not None:
        extras.append(f"value={value}")
    return ApiError(400, f"{message} ({', '.join(extras)})" if extras else message, param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(body: dict[str, Any], name: str, read: Callable[[Any], Any]) -> Any:
    """A field as vLLM's request model reads it (pydantic's lax mode, ``protocol.lax``), written back
    into ``body`` coerced ("3" is 3 from here on); None when absent."""
    value = body.get(name)
    if value is None:
        return None
    try:
        body[name] = read(value)
    except lax.LaxError as err:
        raise _lax_error(name, value, err) from None
    return body[name]


def _int_list(value: Any) -> list[int]:
    return lax.list_of(lax.as_int, value)


def _str_list(value: Any) -> list[str]:
    return lax.list_of(lax.as_str, value)


def _number_map(value: Any) -> dict[str, float]:
    return {k: lax.as_float(v) for k, v in lax.as_dict(value).items()}


def _require_object(body: Any) -> None:
    if not isinstance(body, dict):
        raise invalid(
            "body", "model_attributes_type", "Input should be a valid dictionary or object to extract fields from", body
        )


def _common(body: Any, echo: bool = False) -> dict[str, Any]:
    _require_object(body)
    _refuse_nulls(body, _NOT_NULL)
    model = _optional(body, "model", lax.as_str)
    max_tokens = _optional(body, "max_tokens", lax.as_int)
    max_completion = _optional(body, "max_completion_tokens", lax.as_int)
    for name, value in (("max_tokens", max_tokens), ("max_completion_tokens", max_completion)):
        # An echoed completion may ask for no tokens at all: the prompt (and its logprobs) only.
        if value is not None and value < 1 and not (echo and value == 0 and name == "max_tokens"):
            raise _bad(f"{name} must be at least 1, got {value}.", name, value)
    n = _optional(body, "n", lax.as_int)
    n = 1 if n is None else n
    if n < 1:
        raise _bad(f"n must be at least 1, got {n}.")
    if n > MAX_N:
        raise _bad(
            f"n must be at most {MAX_N}, got {n}. To increase this limit, set the VLLM_MAX_N_SEQUENCES "
            "environment variable."
        )
    temperature = _optional(body, "temperature", lax.as_float)
    if temperature is not None and not math.isfinite(temperature):
        raise _bad(f"temperature must be a finite number, got {temperature}.", "temperature", temperature)
    if temperature is not None and temperature < 0:
        raise _bad(f"temperature must be non-negative, got {temperature}.", "temperature", temperature)
    if temperature is not None and temperature > 2.0:
        raise _bad(f"temperature must be in [0, 2], got {temperature}.", "temperature", temperature)
    if n > 1 and temperature is not None and temperature < _SAMPLING_EPS:
        raise _bad(f"n must be 1 when using greedy sampling, got {n}.")
    top_p = _optional(body, "top_p", lax.as_float)
    if top_p is not None and not 0 < top_p <= 1:
        raise _bad(f"top_p must be in (0, 1], got {top_p}.", "top_p", top_p)
    for name in ("seed", "priority", "truncate_prompt_tokens"):
        value = body.get(name)
        if isinstance(value, float) and value.is_integer() and abs(value) > lax.INT64_MAX:
            body[name] = int(value)  # orjson reads an integer past 64 bits as a float; FastAPI, as an int
    for name in ("seed", "priority"):  # both typed as 64-bit integers
        value = _optional(body, name, lax.as_int)
        if value is not None and not lax.INT64_MIN <= value <= lax.INT64_MAX:
            above = value > 0
            bound = lax.INT64_MAX if above else lax.INT64_MIN
            words = "less than or equal to" if above else "greater than or equal to"
            kind, key = ("less_than_equal", "le") if above else ("greater_than_equal", "ge")
            raise invalid(f"body.{name}", kind, f"Input should be {words} {bound}", value, **{key: bound})
    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_raw, str):
        stop = (stop_raw,)
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw) and len(stop_raw) <= MAX_STOP_STRINGS:
        stop = tuple(stop_raw)
    else:
        raise validation_error(_union_errors("body.stop", stop_raw))
    if any(not s for s in stop):
        raise _bad("stop cannot contain an empty string.")
    _optional(body, "user", lax.as_str)
    response_format = _optional(body, "response_format", lax.as_dict)
    if response_format is not None and response_format.get("type") not in _RESPONSE_FORMATS:
        expected = "'text', 'json_object' or 'json_schema'"
        raise invalid(
            "body.response_format.type",
            "literal_error",
            f"Input should be {expected}",
            response_format.get("type"),
            expected=expected,
        )
    if (
        response_format is not None
        and response_format["type"] == "json_schema"
        and not isinstance(response_format.get("json_schema"), dict)
    ):
        raise _bad(
            "When response_format type is 'json_schema', the 'json_schema' field must be provided.", "response_format"
        )
    stream = _optional(body, "stream", lax.as_bool) or False
    options = _optional(body, "stream_options", lax.as_dict)
    include_usage = continuous_usage = False
    if options:
        if not stream:
            raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
        include_usage = _optional(options, "include_usage", lax.as_bool) or False
        continuous_usage = include_usage and bool(_optional(options, "continuous_usage_stats", lax.as_bool))
    vocabulary_ids = _sampling(body, max_completion if max_completion is not None else max_tokens)
    truncate, truncation_side = _truncation(body)
    ignore_eos = _optional(body, "ignore_eos", lax.as_bool) or False
    prompt_logprobs = body.get("prompt_logprobs")
    if prompt_logprobs is not None:  # a number by now (``_numbers``)
        if stream and (prompt_logprobs > 0 or prompt_logprobs == -1):
            raise _bad("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
        if prompt_logprobs < 0 and prompt_logprobs != -1:
            raise _bad("`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs")
        prompt_logprobs = _optional(body, "prompt_logprobs", lax.as_int)
        _logprobs(prompt_logprobs, "prompt_logprobs", "prompt")
    return {
        "truncate": truncate,
        "truncation_side": truncation_side,
        "vocabulary_ids": vocabulary_ids,
        "return_token_ids": _optional(body, "return_token_ids", lax.as_bool) or False,
        "prompt_logprobs": prompt_logprobs,
        "cache_salt": _cache_salt(_optional(body, "cache_salt", lax.as_str)),
        "model": model,
        "max_tokens": max_completion if max_completion is not None else max_tokens,
        "stop": stop,
        "stream": stream,
        "include_usage": include_usage,
        "continuous_usage": continuous_usage,
        "ignore_eos": ignore_eos,
        "n": n,
    }


# The request fields vLLM 0.32's request models type and its SamplingParams use, beyond the ones read
# above, as pydantic reads them (null is the default).
_TYPED_FIELDS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    *((name, lax.as_float) for name in ("frequency_penalty", "presence_penalty", "repetition_penalty")),
    *((name, lax.as_float) for name in ("min_p", "length_penalty")),
    *((name, lax.as_int) for name in ("top_k", "min_tokens", "priority", "stream_interval")),
    ("routed_experts_prompt_start", lax.as_int),
    ("stop_token_ids", _int_list),
    ("allowed_token_ids", _int_list),
    ("bad_words", _str_list),
    ("logit_bias", _number_map),
    *((name, lax.as_bool) for name in ("skip_special_tokens", "spaces_between_special_tokens")),
    *((name, lax.as_bool) for name in ("include_stop_str_in_output", "use_beam_search", "add_special_tokens")),
    ("return_tokens_as_token_ids", lax.as_bool),
    *((name, lax.as_dict) for name in ("kv_transfer_params", "ec_transfer_params", "vllm_xargs", "structured_outputs")),
    *((name, lax.as_str) for name in ("request_id", "session_id")),
    ("logprob_token_ids", _int_list),
    *((name, lax.as_bool) for name in ("return_token_offsets", "return_mm_kwargs")),
)
# Chat's own typed fields (a completion request has none of them: there they are unknown, and ignored).
_CHAT_TYPED_FIELDS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    *((name, lax.as_dict) for name in ("mm_processor_kwargs", "media_io_kwargs")),
    *((name, lax.as_bool) for name in ("parallel_tool_calls", "include_reasoning", "return_prompt_text")),
)
# Fields vLLM 0.32's request models type without ``| None``: an explicit null is refused, as pydantic
# refuses it (``"min_tokens": null`` is not the default 0).
_NOT_NULL: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    *((name, lax.as_bool) for name in ("use_beam_search", "include_stop_str_in_output", "ignore_eos")),
    *((name, lax.as_bool) for name in ("skip_special_tokens", "spaces_between_special_tokens", "add_special_tokens")),
    *((name, lax.as_int) for name in ("min_tokens", "priority", "routed_experts_prompt_start")),
    ("length_penalty", lax.as_float),
    ("bad_words", lax.as_list),
    ("request_id", lax.as_str),
)
_CHAT_NOT_NULL: tuple[tuple[str, Callable[[Any], Any]], ...] = tuple(
    (name, lax.as_bool) for name in ("echo", "add_generation_prompt", "continue_final_message", "include_reasoning")
)
_COMPLETION_NOT_NULL: tuple[tuple[str, Callable[[Any], Any]], ...] = (("n", lax.as_int),)
_TRUNCATION_SIDES = ("left", "right")


def _refuse_nulls(body: dict[str, Any], fields: tuple[tuple[str, Callable[[Any], Any]], ...]) -> None:
    for name, read in fields:
        if name in body and body[name] is None:
            try:
                read(None)
            except lax.LaxError as err:
                raise _lax_error(name, None, err) from None


def _truncation(body: dict[str, Any]) -> tuple[int | None, str | None]:
    """``truncate_prompt_tokens`` (an integer in [-1, 2**63 - 1]) and ``truncation_side`` ('left' or
    'right'), as vLLM's request model reads them."""
    truncate = _optional(body, "truncate_prompt_tokens", lax.as_int)
    if truncate is not None and not -1 <= truncate <= lax.INT64_MAX:
        if truncate < -1:
            raise invalid(
                "body.truncate_prompt_tokens",
                "greater_than_equal",
                "Input should be greater than or equal to -1",
                truncate,
                ge=-1,
            )
        raise invalid(
            "body.truncate_prompt_tokens",
            "less_than_equal",
            f"Input should be less than or equal to {lax.INT64_MAX}",
            truncate,
            le=lax.INT64_MAX,
        )
    side = body.get("truncation_side")
    if side is not None and side not in _TRUNCATION_SIDES:
        expected = "'left' or 'right'"
        raise invalid("body.truncation_side", "literal_error", f"Input should be {expected}", side, expected=expected)
    return truncate, side


def truncated(ids: list[int], truncate: int | None, side: str | None, max_model_len: int) -> list[int]:
    """vLLM 0.32's prompt truncation (``protocol.http.truncated_ids``), its refusals as vLLM words them."""
    if truncate is None:
        return ids
    try:
        return truncated_ids(ids, truncate, side, max_model_len)
    except TruncationRefused as refused:
        raise _bad(refused.message, refused.param, truncate if refused.param else None) from None


def _check_message(i: int, message: Any) -> None:
    """A message as vLLM's request model reads it. pydantic tries every message type of the union, the
    developer message's first, and lists its errors field by field (content, role, name): the simulator
    answers the first of them. Content parts are read later, by the renderer (its words: the
    ``ValidatorIterator``'s)."""
    loc = f"body.messages.{i}.ChatCompletionDeveloperMessageParam"
    if not isinstance(message, dict):
        raise invalid(loc, "dict_type", "Input should be a valid dictionary", message)
    content, role, name = message.get("content"), message.get("role"), message.get("name")
    # Only an assistant's (and the legacy function result's) content may be null; absent is another matter.
    null_content = content is None and "content" in message and role not in ("assistant", "function")
    if null_content or (content is not None and not isinstance(content, (str, list))):
        raise invalid(f"{loc}.content", "string_type", "Input should be a valid string", content)
    if not isinstance(role, str):
        raise invalid(f"{loc}.role", "missing", "Field required", message)
    if name is not None and not isinstance(name, str):
        if role != "developer":
            expected = "'developer'"
            raise invalid(f"{loc}.role", "literal_error", f"Input should be {expected}", role, expected=expected)
        raise invalid(f"{loc}.name", "string_type", "Input should be a valid string", name)
    for j, part in enumerate(content if isinstance(content, list) else ()):
        if isinstance(part, dict) and "type" not in part:
            raise ApiError(
                400,
                f"1 validation error for ValidatorIterator\n{j}.ChatCompletionContentPartTextParam.type\n"
                f"  Field required [type=missing, input_value={part!r:.200}, input_type=dict]",
            )
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise invalid(f"{loc}.content", "string_type", "Input should be a valid string", content)


def _union_errors(loc: str, value: Any) -> list[dict[str, Any]]:
    """pydantic's errors for a ``str | list[str]`` field (``stop``): the string branch, then the list's."""
    string = {"type": "string_type", "loc": loc, "msg": "Input should be a valid string", "input": value}
    if not isinstance(value, list):
        return [string, {"type": "list_type", "loc": loc, "msg": "Input should be a valid list", "input": value}]
    if len(value) > MAX_STOP_STRINGS:
        too_long = f"List should have at most {MAX_STOP_STRINGS} items after validation, not {len(value)}"
        ctx = {"field_type": "List", "max_length": MAX_STOP_STRINGS, "actual_length": len(value)}
        return [string, {"type": "too_long", "loc": loc, "msg": too_long, "input": value, "ctx": ctx}]
    items = [
        {"type": "string_type", "loc": f"{loc}.{i}", "msg": "Input should be a valid string", "input": v}
        for i, v in enumerate(value)
        if not isinstance(v, str)
    ]
    return [string, *items]


def _sampling(body: dict[str, Any], max_tokens: int | None) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The types of vLLM 0.32's other sampling fields and the ranges ``SamplingParams._verify_args``
    checks (its messages); returns the token ids that must be in the vocabulary, by field
    (``check_vocabulary``: the tokenizer knows its size)."""
    for name, read in _TYPED_FIELDS:
        _optional(body, name, read)
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise _bad(f"{name} must be in [-2, 2], got {float(value)}.")
    repetition = body.get("repetition_penalty")
    if repetition is not None and not repetition > 0.0:
        raise _bad(f"repetition_penalty must be greater than zero, got {float(repetition)}.")
    top_k = body.get("top_k")
    if top_k is not None and top_k < -1:
        raise _bad(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
    min_p = body.get("min_p")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise _bad(f"min_p must be in [0, 1], got {float(min_p)}.")
    min_tokens = body.get("min_tokens") or 0
    if min_tokens < 0:
        raise _bad(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if max_tokens is not None and min_tokens > max_tokens:
        raise _bad(f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.")
    interval = body.get("stream_interval")
    if interval is not None and interval < 1:
        raise _bad(f"stream_interval must be at least 1, got {interval}.", "stream_interval")
    if any(not word for word in body.get("bad_words") or ()):
        raise _bad(f"bad_words cannot contain an empty string. Got bad_words={body['bad_words']}")
    _structured_outputs(body.get("structured_outputs"))
    ids: list[tuple[str, tuple[int, ...]]] = []
    bias = body.get("logit_bias")
    if bias:
        keys: list[int] = []
        unreadable: list[str] = []
        for key in bias:
            try:
                keys.append(int(key))
            except ValueError:
                unreadable.append(key)
        if unreadable:
            raise _bad(
                f"logit_bias contains key(s) that cannot be converted to integer token IDs: {unreadable!r}",
                "logit_bias",
                unreadable,
            )
        ids.append(("logit_bias", tuple(keys)))
    allowed = body.get("allowed_token_ids")
    if allowed is not None:
        if not allowed:
            raise _bad("allowed_token_ids is not None and empty!", "allowed_token_ids")
        ids.append(("allowed_token_ids", tuple(allowed)))
    return tuple(ids)


# vLLM 0.32's StructuredOutputsParams: its fields in order, with their defaults (and the two it sets).
_STRUCTURED_FIELDS: dict[str, Any] = {
    "json": None,
    "regex": None,
    "choice": None,
    "grammar": None,
    "json_object": None,
    "disable_any_whitespace": False,
    "disable_additional_properties": False,
    "whitespace_pattern": None,
    "structural_tag": None,
}
_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _structured_outputs(params: dict[str, Any] | None) -> None:
    """Exactly one kind of constraint, as ``StructuredOutputsParams`` insists (other keys are ignored)."""
    if params is None:
        return
    if sum(params.get(kind) is not None for kind in ("json", "regex", "choice")) > 1:  # the request model's check
        raise _bad("You can only use one kind of constraints for structured outputs ('json', 'regex' or 'choice').")
    fields = {**_STRUCTURED_FIELDS, **{k: v for k, v in params.items() if k in _STRUCTURED_FIELDS}}
    count = sum(fields[kind] is not None for kind in _STRUCTURED_KINDS)
    shown = {**fields, "_backend": None, "_backend_was_auto": False}
    if count > 1:
        raise _bad(f"You can only use one kind of structured outputs constraint but multiple are specified: {shown}")
    if count < 1:
        raise _bad(f"You must use one kind of structured outputs constraint but none are specified: {shown}")


def _tool_choice(choice: Any, tools: list[Any] | None) -> None:
    """vLLM 0.32's ``check_tool_usage``: a tool choice needs tools, and a named one must be one of them."""
    if choice is None or choice == "none":
        return
    if tools is None:
        raise _bad("When using `tool_choice`, `tools` must be set.", "tool_choice")
    # The simulator has no tool-call parser, as vLLM started without --enable-auto-tool-choice and
    # --tool-call-parser: it answers these as that engine does.
    if choice == "auto":
        raise _bad('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
    if choice == "required":
        raise _bad('tool_choice="required" requires --tool-call-parser to be set')
    if not isinstance(choice, dict):
        raise _bad(
            f'Invalid value for `tool_choice`: {choice!r:.60}! Only named tools, "none", "auto" or "required" '
            "are supported.",
            "tool_choice",
        )
    usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
    function = choice.get("function")
    if not isinstance(function, dict):
        message = f"Invalid value for `function`: `{function!r:.60}` in `tool_choice`! {usage}"
        raise _bad(message, "tool_choice.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        message = f"Invalid `name` in `function`: `{name!r:.60}` in `tool_choice`! {usage}"
        raise _bad(message, "tool_choice.function.name")
    named = (tool.get("function") if isinstance(tool, dict) else None for tool in tools)
    if not any(isinstance(f, dict) and f.get("name") == name for f in named):
        raise _bad("The tool specified in `tool_choice` does not match any of the specified `tools`", "tool_choice")


_REASONING_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max"})


def _cache_salt(salt: str | None) -> str | None:
    """vLLM's ``validate_cache_salt``: a non-empty string of at most 128 characters, none of ``@ / \\ NUL``."""
    if salt is None:
        return None
    if not salt:
        raise _bad("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    if len(salt) > _MAX_CACHE_SALT_LENGTH or not _CACHE_SALT_FORBIDDEN.isdisjoint(salt):
        raise _bad(
            "Parameter 'cache_salt' must be at most 128 characters and must not contain '@', '/', '\\\\', or NUL.",
            "cache_salt",
        )
    return salt


def _numbers(body: Any, names: tuple[str, ...]) -> None:
    """vLLM's check before its request model reads the body: these fields must be numbers (a boolean is
    one; 0.5 passes here and is pydantic's int_from_float later)."""
    if not isinstance(body, dict):
        return
    for name in names:
        value = body.get(name)
        if value is not None and not isinstance(value, (int, float)):
            raise _bad(f"`{name}` must be an integer.", name, value)


# Per-request overrides vLLM refuses unless started with --trust-request-mm-kwargs (the simulator never is).
_UNTRUSTED_KWARGS = (
    ("mm_processor_kwargs", "multimodal preprocessing"),
    ("media_io_kwargs", "multimodal media loading"),
)


def parse_chat(body: Any) -> GenerateParams:
    _numbers(body, ("prompt_logprobs", "top_logprobs"))
    common = _common(body)
    _refuse_nulls(body, _CHAT_NOT_NULL)
    for name, read in _CHAT_TYPED_FIELDS:
        _optional(body, name, read)
    for name, what in _UNTRUSTED_KWARGS:
        if body.get(name):  # vLLM's validate_request_mm_kwargs, without --trust-request-mm-kwargs
            raise _bad(
                f"Per-request {name} are disabled by default because they can change {what} resource usage. "
                "Start the server with --trust-request-mm-kwargs only when clients are trusted.",
                name,
            )
    if "messages" not in body:
        raise invalid("body.messages", "missing", "Field required", body)
    messages = body["messages"]
    if messages is None:
        raise _bad("'NoneType' object is not iterable")
    if not isinstance(messages, list):
        raise invalid("body.messages", "list_type", "Input should be a valid list", messages)
    if not messages:
        raise _bad("Cannot apply chat template to an empty conversation. Provide at least one message.")
    for i, message in enumerate(messages):
        _check_message(i, message)
    tools = _optional(body, "tools", lax.as_list)
    add_gen = _optional(body, "add_generation_prompt", lax.as_bool)
    cont = _optional(body, "continue_final_message", lax.as_bool) or False
    kwargs = _optional(body, "chat_template_kwargs", lax.as_dict)
    template = _optional(body, "chat_template", lax.as_str)
    add_generation_prompt = True if add_gen is None else add_gen
    if add_generation_prompt and cont:
        raise _bad("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    if tools is not None and not tools:
        raise _bad(
            "`tools` must not be an empty array. Either provide at least one tool or omit the field entirely.",
            "tools",
        )
    _tool_choice(body.get("tool_choice"), tools)
    effort = body.get("reasoning_effort")
    if effort is not None and not isinstance(effort, str):
        expected = "'none', 'minimal', 'low', 'medium', 'high', 'xhigh' or 'max'"
        loc = "body.reasoning_effort"
        raise invalid(loc, "literal_error", f"Input should be {expected}", effort, expected=expected)
    if effort is not None and effort not in _REASONING_EFFORTS:
        raise _bad(
            "'reasoning_effort' must be one of 'none', 'minimal', 'low', 'medium', 'high', 'xhigh' or 'max'",
            "reasoning_effort",
        )
    _optional(body, "documents", lambda v: [lax.as_dict(d) for d in lax.as_list(v)])
    wants = _optional(body, "logprobs", lax.as_bool) or False
    top = _optional(body, "top_logprobs", lax.as_int)
    if top is not None and top < 0 and top != -1:
        raise _bad("`top_logprobs` must be a positive value or -1.", "top_logprobs")
    if top is not None and (top == -1 or top > 0) and not wants:
        raise _bad("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    echo = _optional(body, "echo", lax.as_bool) or False
    if common["prompt_logprobs"] is None and echo:
        common["prompt_logprobs"] = top or 0
    return GenerateParams(
        logprobs=_logprobs(top or 0, "logprobs") if wants else None,
        echo=echo,
        # vLLM's get_chat_request_role: the configured response role, or the last message's.
        role="assistant" if add_generation_prompt or not messages else messages[-1]["role"],
        kind="chat",
        messages=messages,
        tools=tools or None,
        add_generation_prompt=add_generation_prompt,
        prompt=None,
        continue_final_message=cont,
        chat_template_kwargs=kwargs,
        chat_template=template,
        **common,
    )


class StreamedEchoError(ApiError):
    """vLLM 0.32's answer to a streamed chat echo: its echo delta is built from the last message's content
    as a list of parts, which the delta's model refuses, so the stream sends this error (after the role
    chunks) and ``[DONE]``. A whole answer echoes fine."""

    def __init__(self, params: GenerateParams) -> None:
        content = params.messages[-1].get("content") if params.messages else ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        super().__init__(
            400,
            "1 validation error for DeltaMessage\ncontent\n  Input should be a valid string [type=string_type, "
            f"input_value={parts!r}, input_type=list]\n"
            "    For further information visit https://errors.pydantic.dev/2.14/v/string_type",
        )


def chat_echo(params: GenerateParams) -> str:
    """What an echoed chat answer starts with: the last message's content when that message has the
    answer's role (text parts joined by newlines), else nothing (vLLM's chat ``echo``)."""
    if params.kind != "chat" or not params.echo or not params.messages:
        return ""
    last = params.messages[-1]
    if last.get("role") != params.role:
        return ""
    content = last.get("content") or ""
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)


def parse_completion(body: Any) -> GenerateParams:
    _numbers(body, ("prompt_logprobs", "logprobs"))
    echo = isinstance(body, dict) and _optional(body, "echo", lax.as_bool) or False
    common = _common(body, echo)
    _refuse_nulls(body, _COMPLETION_NOT_NULL)
    _prompt_embeds(body.get("prompt_embeds"))
    if body.get("suffix") is not None:
        raise ApiError(400, "suffix is only supported for models with FIM completion rendering", "suffix")
    if body.get("prompt") is None or body["prompt"] == "":
        raise _bad("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    prompts = _prompts(body["prompt"])
    logprobs = _optional(body, "logprobs", lax.as_int)
    if logprobs is not None and logprobs < 0 and logprobs != -1:
        raise _bad("`logprobs` must be a positive value or -1.", "logprobs", logprobs)
    if common["prompt_logprobs"] is None and echo:
        common["prompt_logprobs"] = logprobs
    return GenerateParams(
        logprobs=None if logprobs is None else _logprobs(logprobs, "logprobs"),
        echo=echo,
        kind="completion",
        messages=None,
        tools=None,
        add_generation_prompt=False,
        prompt=prompts[0],
        prompts=prompts,
        **common,
    )


def _prompt_embeds(embeds: Any) -> None:
    """``prompt_embeds`` (``bytes | list[bytes]``): an engine started without ``--enable-prompt-embeds``,
    as this one is, refuses any it can read, and pydantic whatever it cannot."""
    if embeds is None:
        return
    if not isinstance(embeds, (str, list)):
        loc = "body.prompt_embeds"
        raise validation_error(
            [
                {"type": "bytes_type", "loc": loc, "msg": "Input should be a valid bytes", "input": embeds},
                {"type": "list_type", "loc": loc, "msg": "Input should be a valid list", "input": embeds},
            ]
        )
    if isinstance(embeds, list) and not all(isinstance(item, str) for item in embeds):
        i = next(i for i, item in enumerate(embeds) if not isinstance(item, str))
        raise invalid(f"body.prompt_embeds.{i}", "bytes_type", "Input should be a valid bytes", embeds[i])
    raise _bad("You must set `--enable-prompt-embeds` to input `prompt_embeds`.", "prompt_embeds")


# A /tokenize request's GenerateParams generate nothing.
_NO_GENERATION: dict[str, Any] = {
    "max_tokens": None,
    "stop": (),
    "stream": False,
    "include_usage": False,
    "ignore_eos": False,
    "cache_salt": None,
}


@dataclass(frozen=True, slots=True)
class TokenizeParams:
    """vLLM's ``/tokenize`` request: a prompt, or a chat to render (``params``), and what to answer."""

    params: GenerateParams
    add_special_tokens: bool
    return_token_strs: bool


def parse_tokenize(body: Any) -> TokenizeParams:
    """vLLM 0.32's ``TokenizeCompletionRequest | TokenizeChatRequest``: a body with ``messages`` is a chat
    (rendered with its template, no special tokens added unless asked), else it needs a string ``prompt``
    (special tokens added unless asked not to); what neither reads is pydantic's two errors, one a branch."""
    _require_object(body)
    model = _optional(body, "model", lax.as_str)
    strs = _optional(body, "return_token_strs", lax.as_bool) or False
    if "messages" in body and isinstance(body["messages"], list):
        messages = body["messages"]
        for i, message in enumerate(messages):
            _check_message(i, message)
        special = _optional(body, "add_special_tokens", lax.as_bool)
        add_gen = _optional(body, "add_generation_prompt", lax.as_bool)
        params = GenerateParams(
            kind="chat",
            model=model,
            messages=messages,
            tools=_optional(body, "tools", lax.as_list) or None,
            add_generation_prompt=True if add_gen is None else add_gen,
            continue_final_message=_optional(body, "continue_final_message", lax.as_bool) or False,
            chat_template_kwargs=_optional(body, "chat_template_kwargs", lax.as_dict),
            chat_template=_optional(body, "chat_template", lax.as_str),
            prompt=None,
            **_NO_GENERATION,
        )
        return TokenizeParams(params, bool(special), strs)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        first = (
            {"type": "missing", "loc": "body.prompt", "msg": "Field required", "input": body}
            if "prompt" not in body
            else {"type": "string_type", "loc": "body.prompt", "msg": "Input should be a valid string", "input": prompt}
        )
        second = (
            {"type": "missing", "loc": "body.messages", "msg": "Field required", "input": body}
            if "messages" not in body
            else {
                "type": "list_type",
                "loc": "body.messages",
                "msg": "Input should be a valid list",
                "input": body["messages"],
            }
        )
        raise validation_error([first, second])
    special = _optional(body, "add_special_tokens", lax.as_bool)
    params = GenerateParams(
        kind="completion",
        model=model,
        messages=None,
        tools=None,
        add_generation_prompt=False,
        prompt=prompt,
        **_NO_GENERATION,
    )
    return TokenizeParams(params, True if special is None else special, strs)


def parse_detokenize(body: Any) -> tuple[str | None, list[int]]:
    """vLLM 0.32's ``DetokenizeRequest``: the model, and token ids (integers in [0, 2**63 - 1])."""
    _require_object(body)
    model = _optional(body, "model", lax.as_str)
    if "tokens" not in body:
        raise invalid("body.tokens", "missing", "Field required", body)
    try:
        values = lax.as_list(body["tokens"])
    except lax.LaxError as err:
        raise _lax_error("tokens", body["tokens"], err) from None
    tokens = _token_ids(values, "body.tokens")
    for i, token in enumerate(tokens):
        if token > lax.INT64_MAX:
            raise invalid(
                f"body.tokens.{i}",
                "less_than_equal",
                f"Input should be less than or equal to {lax.INT64_MAX}",
                token,
                le=lax.INT64_MAX,
            )
    return model, tokens


def _logprobs(top: int, param: str, what: str = "sample") -> int:
    """vLLM's ceiling on sample (or prompt) logprobs (--max-logprobs, 20 by default); -1 (the whole
    vocabulary) is checked against the vocabulary by ``check_vocabulary``."""
    if top > MAX_LOGPROBS:
        raise _bad(f"Requested {what} logprobs of {top}, which is greater than max allowed: {MAX_LOGPROBS}", param, top)
    return top


def check_vocabulary(params: GenerateParams, vocab_size: int) -> None:
    """What vLLM checks against the vocabulary: -1 logprobs ask for all of it (its size against the
    ceiling), and the token ids of ``logit_bias`` and ``allowed_token_ids`` must be in it."""
    if params.logprobs == -1:
        _logprobs(vocab_size, "logprobs")
    if params.prompt_logprobs == -1:
        _logprobs(vocab_size, "prompt_logprobs", "prompt")
    for name, ids in params.vocabulary_ids:
        outside = [i for i in ids if not 0 <= i < vocab_size]
        if not outside:
            continue
        if name == "logit_bias":
            raise _bad(
                f"token_id(s) {outside} in logit_bias contain out-of-vocab token ids. Vocabulary size: {vocab_size}",
                name,
                outside,
            )
        raise _bad("allowed_token_ids contains out-of-vocab token id!", name)


def _prompts(prompt: Any) -> tuple[str | list[int], ...]:
    """vLLM's ``prompt``: a string, token ids, or a batch (a list of either, at most 1,024); what its
    request model refuses, refused with pydantic's first error."""
    if isinstance(prompt, str):
        return (prompt,)
    if not isinstance(prompt, list):
        raise invalid("body.prompt", "list_type", "Input should be a valid list", prompt)
    if not prompt:
        raise _bad("You must pass at least one prompt")
    if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        if len(prompt) > MAX_COMPLETION_PROMPTS:
            raise _bad(
                f"prompt list length {len(prompt)} exceeds the maximum allowed count of {MAX_COMPLETION_PROMPTS}. "
                "To increase this limit, set the VLLM_MAX_COMPLETION_PROMPTS environment variable.",
                "prompt",
            )
        ids = [_token_ids(p, f"body.prompt.{i}") for i, p in enumerate(prompt) if isinstance(p, list)]
        return tuple(ids) if ids else tuple(prompt)
    return (_token_ids(prompt, "body.prompt"),)


def _token_ids(ids: list[Any], loc: str) -> list[int]:
    """A prompt of token ids: integers (as pydantic reads them), none negative."""
    out = []
    for i, value in enumerate(ids):
        try:
            token = lax.as_int(value)
        except lax.LaxError as err:
            raise invalid(f"{loc}.{i}", err.kind, err.msg, value) from None
        if token < 0:
            raise invalid(f"{loc}.{i}", "greater_than_equal", "Input should be greater than or equal to 0", value, ge=0)
        out.append(token)
    return out


# --- response shapes ------------------------------------------------------------------


VLLM_VERSION = "0.32.0"


def system_fingerprint(config: str) -> str:
    """vLLM's default (``--fingerprint-mode full``, one engine): its version and 8 hex digits of a
    hash of its configuration."""
    return f"vllm-{VLLM_VERSION}-{hashlib.sha256(config.encode()).hexdigest()[:8]}"


def response_id(prefix: str) -> str:
    """vLLM's ids: ``chatcmpl-`` / ``cmpl-`` and 16 hex digits (``vllm.utils.random_uuid``)."""
    return f"{prefix}-{uuid.uuid4().int & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    created_cache_tokens: int | None = 0,
    cached_tokens_per_tier: dict[str, int] | None = None,
) -> dict[str, Any]:
    """vLLM 0.32's usage (``--enable-prompt-tokens-details``), in whole blocks:
    ``cached_tokens`` the prefix hit (every tier), ``created_cache_tokens`` the full prompt
    blocks the prefill computed (chat only: completions report it as null). ``cached_tokens_per_tier``
    (an extra field, ignored by OpenAI clients) splits the hit into ``gpu`` / ``cpu`` / ``disk``."""
    details: dict[str, Any] = {
        "cached_tokens": cached_tokens,
        "created_cache_tokens": created_cache_tokens,
        "multimodal_tokens": None,
    }
    if cached_tokens_per_tier is not None:
        details["cached_tokens_per_tier"] = cached_tokens_per_tier
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": details,
        "completion_tokens_details": None,
    }


@dataclass(frozen=True, slots=True)
class Choice:
    """One finished choice of a non-streamed answer."""

    text: str
    finish_reason: str | None
    stop_reason: str | None
    logprobs: dict[str, Any] | None = None
    prompt_logprobs: list[Any] | None = None  # its prompt's (a completion's choice; chat: the answer's)
    token_ids: list[int] | None = None  # with return_token_ids: the tokens it generated
    prompt_token_ids: list[int] | None = None  # with return_token_ids: its prompt's


def response(
    kind: str,
    response_id: str,
    created: int,
    model: str,
    choices: list[Choice],
    usage_: dict[str, Any],
    fingerprint: str,
    role: str = "assistant",
) -> dict[str, Any]:
    """A whole answer as vLLM 0.32 dumps its response model (every field, unset ones null; an
    empty ``tool_calls`` left out); ``choices`` in index order (a batch's: prompt by prompt, ``n``
    each); chat messages have ``role``."""
    out: list[dict[str, Any]] = []
    for index, c in enumerate(choices):
        if kind == "chat":
            message = {
                "role": role,
                "content": c.text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            }
            out.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": c.logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "token_ids": c.token_ids,
                    "routed_experts": None,
                }
            )
        else:
            out.append(
                {
                    "index": index,
                    "text": c.text,
                    "logprobs": c.logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "token_ids": c.token_ids,
                    "prompt_logprobs": c.prompt_logprobs,
                    "prompt_token_ids": c.prompt_token_ids,
                    "routed_experts": None,
                }
            )
    obj = "chat.completion" if kind == "chat" else "text_completion"
    whole: dict[str, Any] = {"id": response_id, "object": obj, "created": created, "model": model, "choices": out}
    whole |= {"service_tier": None, "system_fingerprint": fingerprint, "usage": usage_}
    if kind == "chat":
        prompt_logprobs, prompt_ids = (
            (choices[0].prompt_logprobs, choices[0].prompt_token_ids) if choices else (None, None)
        )
        whole |= {"prompt_logprobs": prompt_logprobs, "prompt_token_ids": prompt_ids, "prompt_text": None}
    return whole | {"kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def with_running_usage(chunk: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A chunk with the usage so far after its choices (``continuous_usage_stats``), as vLLM 0.32 writes it."""
    running = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "completion_tokens_details": None,
    }
    out: dict[str, Any] = {}
    for key, value in chunk.items():
        out[key] = value
        if key == "choices":
            out["usage"] = running
    return out


def chunk(
    kind: str,
    response_id: str,
    created: int,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    stop_reason: str | None = None,
    *,
    role: str | None = None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
    fingerprint: str | None = None,
    token_ids: list[int] | None = None,
    prompt_token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """One streamed delta of choice ``index`` as vLLM 0.32 writes it (its fields set explicitly,
    nothing unset): a ``role`` opens a chat stream (with the stream's prompt fields), a chat delta's
    tokens are traced (``token_ids``, null) and its
    last names the stop reason; a completions chunk has every field. ``token_ids`` (the step's) and
    ``prompt_token_ids`` are given with ``return_token_ids``. ``fingerprint`` stamps a choice's last
    chunk when no usage chunk follows."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if role is not None:
            delta["role"] = role
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        if role is None:
            choice["token_ids"] = token_ids
        obj = "chat.completion.chunk"
    else:
        choice = {
            "index": index,
            "text": text or "",
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
            "prompt_token_ids": prompt_token_ids,
            "token_ids": token_ids,
        }
        obj = "text_completion"
    out = {"id": response_id, "object": obj, "created": created, "model": model, "choices": [choice]}
    if role is not None:
        out |= {"prompt_token_ids": prompt_token_ids, "prompt_text": None}
    if fingerprint is not None and finish_reason is not None:
        out["system_fingerprint"] = fingerprint
    return out


def usage_chunk(
    kind: str, response_id: str, created: int, model: str, usage_: dict[str, Any], fingerprint: str
) -> dict[str, Any]:
    """A stream's last chunk: its usage with the null fields left out (vLLM dumps it ``exclude_none``)."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    usage_ = _without_nulls(usage_)
    return {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_,
        "system_fingerprint": fingerprint,
    }


def _without_nulls(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_nulls(v) if isinstance(v, dict) else v for k, v in obj.items() if v is not None}


def models_list(model: str, root: str, max_model_len: int, created: int | None = None) -> dict[str, Any]:
    created = int(time.time()) if created is None else created
    return {"object": "list", "data": [model_card(model, root, None, max_model_len, created)]}


COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI / vLLM default for /v1/completions


def resolve_max_tokens(params: GenerateParams, prompt_len: int, max_model_len: int) -> int:
    """The output budget of a request, as vLLM 0.32 sets it: a ``max_tokens`` above the context window
    and a prompt that fills it are 400s; otherwise the budget is what the window leaves, at most the
    request's (a request for more tokens than fit is cut to fit, not refused)."""
    if params.max_tokens is not None and params.max_tokens > max_model_len:
        name = "max_tokens"
        raise _bad(
            f"{name}={params.max_tokens} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            name,
            params.max_tokens,
        )
    if prompt_len > max_model_len:
        # vLLM encodes at most one token past the window, so it reports "at least" that many.
        count = min(prompt_len, max_model_len + 1)
        qualifier = "at least " if count == max_model_len + 1 else ""
        raise _bad(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
            f"{qualifier}{count} input tokens, which exceeds this limit even without any output tokens. "
            "Please reduce the length of the input prompt.",
            "input_tokens",
            count,
        )
    if prompt_len == max_model_len:
        raise _bad(
            f"The decoder prompt (length {prompt_len}) plus the number of requested output tokens (at least 1) "
            f"is longer than the maximum model length of {max_model_len}. Make sure that `max_model_len` is no "
            "smaller than the number of text tokens (prompt + requested output tokens)."
        )
    room = max_model_len - prompt_len
    if params.max_tokens is None:
        return room if params.kind == "chat" else min(COMPLETION_DEFAULT_MAX_TOKENS, room)
    return min(params.max_tokens, room)


# --- logprobs, in vLLM's two shapes ------------------------------------------------------


def chat_logprobs(steps: list[tuple[str, float, list[tuple[str, float]]]]) -> dict[str, Any]:
    """``{"content": [...]}`` from (token, logprob, top tokens) per position."""
    return {
        "content": [
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode("utf-8", errors="replace")),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", errors="replace"))} for t, lp in top
                ],
            }
            for token, logprob, top in steps
        ]
    }


def completion_logprobs(
    steps: list[tuple[str, float | None, list[tuple[str, float]] | None]], offset: int
) -> dict[str, Any]:
    """``{"text_offset", "token_logprobs", "tokens", "top_logprobs"}``; an echoed prompt's first
    token has no logprob (None), as in vLLM. ``offset``: where this text starts in the choice's."""
    offsets: list[int] = []
    for token, _, _ in steps:
        offsets.append(offset)
        offset += len(token)
    return {
        "text_offset": offsets,
        "token_logprobs": [lp for _, lp, _ in steps],
        "tokens": [token for token, _, _ in steps],
        "top_logprobs": [None if top is None else dict(top) for _, _, top in steps],
    }
