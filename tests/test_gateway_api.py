"""Request validation: what the gateway reads from OpenAI bodies, and the 400s it answers."""

from __future__ import annotations

import json

import orjson
import pytest
from aiohttp import web

from kvgate.gateway.api import Truncation, parse_chat, parse_completion
from kvgate.gateway.errors import ApiError, from_http_exception, model_not_found


def body(**fields) -> bytes:
    return orjson.dumps(fields)


def test_chat_fields_routing_needs() -> None:
    parsed = parse_chat(
        body(
            model="m",
            stream=True,
            max_completion_tokens=7,
            max_tokens=9,
            messages=[
                {"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "tool_calls": [{"id": "1"}]},
                {"role": "assistant", "content": None},
            ],
            tools=[{"type": "function", "function": {"name": "f"}}],
            chat_template_kwargs={"enable_thinking": False},
            logit_bias={"1": 2},
        )
    )
    assert parsed.model == "m" and parsed.stream is True
    assert parsed.max_tokens == 7  # max_completion_tokens wins, as in vLLM
    assert len(parsed.messages) == 4
    assert set(parsed.template_args) == {"tools", "chat_template_kwargs"}


def test_model_is_optional_as_in_vllm() -> None:
    assert parse_completion(body(prompt="x")).model is None


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("text", ["text"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_forms(prompt, expected) -> None:
    assert parse_completion(body(prompt=prompt)).prompts == expected


def test_no_tokens_only_for_an_echoed_prompt_as_in_vllm() -> None:
    assert parse_completion(body(prompt="x", echo=True, max_tokens=0)).max_tokens == 0
    for fields in ({"max_tokens": 0}, {"max_tokens": 0, "echo": False}, {"max_tokens": -1, "echo": True}):
        with pytest.raises(ApiError) as err:
            parse_completion(body(prompt="x", **fields))
        assert err.value.status == 400 and err.value.param == "max_tokens"
    with pytest.raises(ApiError) as err:
        parse_completion(body(prompt="x", echo="maybe"))
    assert err.value.param == "echo"


def test_fields_are_read_as_vllms_request_model_reads_them() -> None:
    # pydantic's lax mode (protocol.lax): what the engine takes, the gateway takes, with the same meaning.
    parsed = parse_chat(
        body(
            messages=[{"role": "user", "content": "x"}],
            stream="yes",
            max_tokens="3",
            n=True,
            temperature="0.5",
            add_generation_prompt="no",
            continue_final_message=1,
        )
    )
    assert (parsed.stream, parsed.max_tokens, parsed.n) == (True, 3, 1)
    assert parsed.template_args == {"add_generation_prompt": False, "continue_final_message": True}
    assert parse_completion(body(prompt="x", max_tokens=4.0, stream=0)).max_tokens == 4
    for fields, param in (({"max_tokens": 2.5}, "max_tokens"), ({"stream": "maybe"}, "stream"), ({"n": "two"}, "n")):
        with pytest.raises(ApiError) as err:
            parse_completion(body(prompt="x", **fields))
        assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name"),
        ({"messages": [{"role": "user", "content": "x"}], "chat_template": ["x"]}, "chat_template"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "stream_options": []}, "stream_options"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": {}}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": "maybe"}, "add_generation_prompt"),
    ],
)
def test_chat_rejections_name_the_field(fields, param) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat(body(**fields))
    assert err.value.status == 400 and err.value.param == param


def test_cache_salt_is_read_for_routing() -> None:
    messages = [{"role": "user", "content": "x"}]
    assert parse_chat(body(messages=messages, cache_salt="tenant-A")).cache_salt == "tenant-A"
    assert parse_chat(body(messages=messages)).cache_salt is None
    assert parse_chat(body(messages=messages, cache_salt=None)).cache_salt is None
    assert parse_completion(body(prompt="x", cache_salt="é" * 128)).cache_salt == "é" * 128


# vLLM 0.32's validate_cache_salt: a non-empty string, at most 128 characters, none of @ / \ NUL.
@pytest.mark.parametrize("salt", ["", 5, True, ["a"], {"a": 1}, "x" * 129, "a@b", "a/b", "a\\b", "a\x00b"])
def test_bad_cache_salts_are_refused_as_vllm_refuses_them(salt) -> None:
    for parse, fields in (
        (parse_chat, {"messages": [{"role": "user", "content": "x"}]}),
        (parse_completion, {"prompt": "x"}),
    ):
        with pytest.raises(ApiError) as err:
            parse(body(cache_salt=salt, **fields))
        assert err.value.status == 400 and err.value.param == "cache_salt"
        assert "cache_salt" in err.value.message


@pytest.mark.parametrize("prompt", ["", [], [-1], [1, "a"], [[1], []], [["a"]], 5, None])
def test_bad_prompts(prompt) -> None:
    if prompt == "":
        # An empty string is a valid JSON type; the tokenizer rejects it as empty later.
        assert parse_completion(body(prompt=prompt)).prompts == [""]
        return
    with pytest.raises(ApiError) as err:
        parse_completion(body(prompt=prompt))
    assert err.value.param == "prompt"


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b'"s"', b"\xff\xfe"])
def test_not_a_json_object(raw: bytes) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat(raw)
    assert err.value.status == 400


def test_error_body_is_openai_shaped() -> None:
    err = model_not_found("x")
    payload = json.loads(err.body())
    assert payload == {
        "error": {
            "message": "The model `x` does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    response = err.response("w3")
    assert response.status == 404 and response.headers["x-kvgate-worker"] == "w3"
    too_large = from_http_exception(web.HTTPRequestEntityTooLarge(max_size=10, actual_size=20))
    assert too_large.status == 413 and too_large.code == "request_too_large"


def nested(depth: int) -> dict:
    value: dict = {"type": "string"}
    for _ in range(depth - 1):
        value = {"type": "object", "properties": {"x": value}}
    return value


def test_deeply_nested_bodies_are_a_400_not_a_crash() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": nested(300)}}
    with pytest.raises(ApiError) as err:
        parse_chat(json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}).encode())
    assert err.value.status == 400 and "nested" in err.value.message
    # Deeper than JSON parsers go: still a 400.
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(ApiError) as err:
        parse_chat(raw)
    assert err.value.status == 400
    # Real schemas stay well inside the limit.
    ok = {"type": "function", "function": {"name": "f", "parameters": nested(10)}}
    assert parse_chat(body(messages=[{"role": "user", "content": "hi"}], tools=[ok])).template_args["tools"] == [ok]


def test_truncation_is_read_and_applied_as_vllm_applies_it() -> None:
    parsed = parse_chat(body(messages=[{"role": "user", "content": "x"}], truncate_prompt_tokens="3"))
    assert parsed.truncation == Truncation(3, None)
    ids = list(range(10))
    assert parsed.truncation.apply(ids, 100) == [7, 8, 9]  # the last tokens, as vLLM's generate models keep
    assert Truncation(3, "right").apply(ids, 100) == [0, 1, 2]
    assert Truncation(-1, None).apply(ids, 6) == [5, 6, 7, 8, 9]  # the window less one token for the answer
    assert Truncation(20, None).apply(ids, 100) is ids
    for keep, param in ((0, None), (101, "truncate_prompt_tokens")):
        with pytest.raises(ApiError) as err:
            Truncation(keep, None).apply(ids, 100)
        assert err.value.status == 400 and err.value.param == param
    assert parse_completion(body(prompt="x")).truncation is None
    for fields, param in (
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 1.5}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 2, "truncation_side": "middle"}, "truncation_side"),
    ):
        with pytest.raises(ApiError) as err:
            parse_completion(body(prompt="x", **fields))
        assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize("value", [0, 1.5, "json", [], True])
def test_structured_outputs_that_is_not_an_object_is_the_clients_400(value) -> None:
    # vLLM 0.32 answers these with a 500 ('int' object has no attribute 'get'), which the gateway would
    # take for a failing worker and retry elsewhere: refused before routing, as the client's mistake.
    with pytest.raises(ApiError) as err:
        parse_chat(body(messages=[{"role": "user", "content": "x"}], structured_outputs=value))
    assert err.value.status == 400 and err.value.param == "structured_outputs"
    assert parse_chat(body(messages=[{"role": "user", "content": "x"}], structured_outputs={"json": {}})).model is None


def test_the_body_is_read_as_vllms_python_json_reads_it() -> None:
    # NaN and Infinity are numbers to Python's json (vLLM reads them; orjson alone refused them), a UTF-8
    # byte order mark is skipped, and a lone surrogate escape is refused as a tokenizer refuses the text.
    hi = b'{"messages": [{"role": "user", "content": "hi"}]'
    assert parse_chat(hi + b', "logit_bias": {"5": NaN}, "presence_penalty": -Infinity}').messages
    assert parse_chat(b"\xef\xbb\xbf" + hi + b"}").messages
    with pytest.raises(ApiError) as err:
        parse_chat(b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}')
    assert err.value.status == 400 and "TextEncodeInput" in err.value.message
    for broken in (hi, hi + b", NaN}", b"[" * 5000 + b"]" * 5000):
        with pytest.raises(ApiError) as err:
            parse_chat(broken)
        assert err.value.status == 400 and "not valid JSON" in err.value.message
