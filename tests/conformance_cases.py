"""Requests a real vLLM 0.32 answered once, recorded, and the simulator (and the gateway in front of it) must
answer alike: ``tests/fixtures/vllm-0.32/http/conformance.json``, written by ``python -m
tests.record_vllm_http`` against a real engine serving the tiny Llama (``make vllm``).

Each case is one HTTP request: well-formed ones of every shape clients send (whole and streamed, ``n`` > 1,
logprobs, stop strings, echo, token-id prompts, batches) and the mistakes a bad-input probe tries (wrong
types, out-of-range values, too-long prompts, unknown models and paths, broken JSON, wrong content types).
What is compared is what a client can rely on: the status, the content type, the JSON shape of an answer
or of every frame of a stream, the frames' fixed fields, and an error's type, code and parameter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MODEL = "kvgate-tiny"
SHORT = [{"role": "user", "content": "Name three colours of the rainbow."}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
# Long enough to pass 4,096 tokens (the recorded engine's max model length) with the tiny tokenizer.
LONE = "a\ud800b"  # a lone surrogate, escaped in JSON as \\ud800
BROKEN_CALL = {
    "role": "assistant",
    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}],
}
FUNCTION_NULL = {"role": "function", "name": "f", "content": None}
TOO_LONG = " ".join(f"word{i}" for i in range(5000))


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: Any = None  # JSON to send; None with ``raw`` unset: no body
    method: str = "POST"
    raw: bytes | None = None  # bytes sent as they are (``body`` ignored)
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    # A value of a union-typed field (messages, prompt, response_format): pydantic lists an error for every
    # branch of the union, and the simulator reports only the first of them (the count differs).
    union: bool = False
    # The token counts and ids must match too (a prompt the engine truncates, /tokenize, /detokenize).
    counts: bool = False

    def data(self) -> bytes | None:
        if self.raw is not None:
            return self.raw
        if self.body is None:
            return None
        return json.dumps(self.body).encode()


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": SHORT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not _DROP}


def completion(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": "The colours of the rainbow are", "max_tokens": 4}
    body.update(temperature=0, ignore_eos=True)
    body.update(fields)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()  # a field a case leaves out of the default body
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

CASES: list[Case] = [
    # --- answers --------------------------------------------------------------------------------------
    Case("chat", CHAT, chat()),
    Case("chat_stream", CHAT, chat(stream=True)),
    Case("chat_stream_usage", CHAT, chat(stream=True, stream_options={"include_usage": True})),
    Case(
        "chat_stream_continuous_usage",
        CHAT,
        chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}),
    ),
    Case("chat_n2", CHAT, chat(n=2, temperature=1.0, seed=7)),
    Case("chat_n2_stream", CHAT, chat(n=2, temperature=1.0, seed=7, stream=True)),
    Case("chat_logprobs", CHAT, chat(logprobs=True, top_logprobs=2)),
    Case("chat_logprobs_stream", CHAT, chat(logprobs=True, top_logprobs=2, stream=True)),
    Case("chat_max_completion_tokens", CHAT, chat(max_tokens=_DROP, max_completion_tokens=3)),
    Case("chat_no_model", CHAT, chat(model=_DROP)),
    Case("chat_parts", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])),
    Case("chat_system", CHAT, chat(messages=[{"role": "system", "content": "Be brief."}, *SHORT])),
    Case("chat_unknown_field", CHAT, chat(not_a_field=1)),
    Case("chat_stop", CHAT, chat(stop=["zzz-never"], max_tokens=3)),
    Case("chat_eos_not_ignored", CHAT, chat(ignore_eos=_DROP, max_tokens=2)),
    Case("chat_return_token_ids", CHAT, chat(return_token_ids=True)),
    Case("chat_cache_salt", CHAT, chat(cache_salt="tenant-A")),
    Case(
        "chat_continue_final",
        CHAT,
        chat(
            messages=[*SHORT, {"role": "assistant", "content": "Red,"}],
            add_generation_prompt=False,
            continue_final_message=True,
        ),
    ),
    Case("chat_max_tokens_0", CHAT, chat(max_tokens=0)),
    Case("chat_json_charset", CHAT, chat(), content_type="application/json; charset=utf-8"),
    Case("completion", COMPLETIONS, completion()),
    Case("completion_stream", COMPLETIONS, completion(stream=True)),
    Case("completion_stream_usage", COMPLETIONS, completion(stream=True, stream_options={"include_usage": True})),
    Case("completion_ids", COMPLETIONS, completion(prompt=[1, 2, 3, 4])),
    Case("completion_batch", COMPLETIONS, completion(prompt=["One", "Two"])),
    Case("completion_batch_stream", COMPLETIONS, completion(prompt=["One", "Two"], stream=True)),
    Case("completion_logprobs", COMPLETIONS, completion(logprobs=2)),
    Case("completion_echo", COMPLETIONS, completion(echo=True)),
    Case("completion_echo_scored", COMPLETIONS, completion(echo=True, max_tokens=0, logprobs=0)),
    # pydantic's lax mode: numbers as strings, integral floats, 0 / 1 and "yes" / "no" as booleans
    Case("chat_max_tokens_numeric_string", CHAT, chat(max_tokens="3")),
    Case("chat_max_tokens_integral_float", CHAT, chat(max_tokens=3.0)),
    Case("chat_n_true", CHAT, chat(n=True)),
    Case("chat_stream_one", CHAT, chat(stream=1)),
    Case("chat_logprobs_yes", CHAT, chat(logprobs="yes", max_tokens=2)),
    Case("chat_temperature_string", CHAT, chat(temperature="0")),
    Case(
        "chat_tool_choice_required",
        CHAT,
        chat(
            tools=TOOLS,
            tool_choice="required",
            max_tokens=8,
        ),
    ),
    Case("models", "/v1/models", method="GET", content_type=None),
    # --- client mistakes --------------------------------------------------------------------------------
    Case("chat_unknown_model", CHAT, chat(model="no-such-model")),
    Case("chat_no_messages", CHAT, chat(messages=_DROP)),
    Case("chat_empty_messages", CHAT, chat(messages=[])),
    Case("chat_messages_not_list", CHAT, chat(messages="hello")),
    Case("chat_message_no_role", CHAT, chat(messages=[{"content": "hi"}]), union=True),
    Case("chat_message_bad_role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}])),
    Case("chat_content_number", CHAT, chat(messages=[{"role": "user", "content": 5}]), union=True),
    Case("chat_max_tokens_negative", CHAT, chat(max_tokens=-1)),
    Case("chat_max_tokens_string", CHAT, chat(max_tokens="four")),
    Case("chat_max_tokens_float", CHAT, chat(max_tokens=2.5)),
    Case("chat_max_tokens_huge", CHAT, chat(max_tokens=10**9)),
    Case("chat_prompt_too_long", CHAT, chat(messages=[{"role": "user", "content": TOO_LONG}])),
    Case("chat_temperature_negative", CHAT, chat(temperature=-1)),
    Case("chat_top_p_2", CHAT, chat(top_p=2)),
    Case("chat_presence_penalty_3", CHAT, chat(presence_penalty=3)),
    Case("chat_n0", CHAT, chat(n=0)),
    Case("chat_n_string", CHAT, chat(n="two")),
    Case("chat_top_logprobs_30", CHAT, chat(logprobs=True, top_logprobs=30)),
    Case("chat_top_logprobs_without_logprobs", CHAT, chat(top_logprobs=2)),
    Case("chat_stream_options_without_stream", CHAT, chat(stream_options={"include_usage": True})),
    Case("chat_stream_string", CHAT, chat(stream="yes")),
    Case("chat_stop_number", CHAT, chat(stop=5)),
    Case("chat_logit_bias_out_of_vocab", CHAT, chat(logit_bias={"99999999": 5})),
    Case("chat_response_format_bad", CHAT, chat(response_format={"type": "xml"}), union=True),
    Case(
        "chat_tool_choice_auto",
        CHAT,
        chat(
            tools=TOOLS,
            tool_choice="auto",
        ),
    ),
    Case("chat_continue_and_generation_prompt", CHAT, chat(add_generation_prompt=True, continue_final_message=True)),
    Case("chat_cache_salt_empty", CHAT, chat(cache_salt="")),
    Case("chat_seed_string", CHAT, chat(seed="x")),
    Case("chat_body_array", CHAT, raw=b"[1, 2]"),
    Case("chat_body_string", CHAT, raw=b'"hello"'),
    Case("chat_body_broken_json", CHAT, raw=b'{"model": "kvgate-tiny", "messages": ['),
    Case("chat_body_empty", CHAT, raw=b""),
    Case("chat_text_plain", CHAT, chat(), content_type="text/plain"),
    Case("chat_form", CHAT, chat(), content_type="application/x-www-form-urlencoded"),
    Case("chat_get", CHAT, method="GET", content_type=None),
    Case("chat_no_content_type", CHAT, chat(), content_type=None),
    Case("chat_json_suffix_type", CHAT, chat(), content_type="application/merge-patch+json"),
    Case("chat_json_upper_case", CHAT, chat(), content_type="Application/JSON"),
    Case("chat_model_number", CHAT, chat(model=5)),
    Case("chat_messages_null", CHAT, chat(messages=None)),
    Case("chat_stop_numbers", CHAT, chat(stop=[1, 2])),
    Case("chat_tool_choice_auto_without_tools", CHAT, chat(tool_choice="auto")),
    Case("completion_prompt_number", COMPLETIONS, completion(prompt=5), union=True),
    Case("completion_prompt_nested_empty", COMPLETIONS, completion(prompt=[[]])),
    Case("completion_no_prompt", COMPLETIONS, completion(prompt=_DROP)),
    Case("completion_empty_prompt", COMPLETIONS, completion(prompt="")),
    Case("completion_empty_list", COMPLETIONS, completion(prompt=[])),
    Case("completion_negative_id", COMPLETIONS, completion(prompt=[1, -2]), union=True),
    Case("completion_id_out_of_vocab", COMPLETIONS, completion(prompt=[1, 99999999])),
    Case("completion_mixed_list", COMPLETIONS, completion(prompt=["a", 1]), union=True),
    Case("completion_prompt_too_long", COMPLETIONS, completion(prompt=TOO_LONG)),
    Case("completion_logprobs_30", COMPLETIONS, completion(logprobs=30)),
    Case("completion_unknown_model", COMPLETIONS, completion(model="no-such-model")),
    Case("unknown_path", "/v1/no-such-path", chat()),
    # --- a second round: more of what clients and probes send ---------------------------------------
    Case("chat_n2_greedy", CHAT, chat(n=2)),
    Case("chat_n_huge", CHAT, chat(n=100000)),
    Case("chat_stop_five", CHAT, chat(stop=["a1", "b2", "c3", "d4", "e5"])),
    Case("chat_stop_empty_string", CHAT, chat(stop=[""])),
    Case("chat_user_number", CHAT, chat(user=5)),
    Case("chat_seed_huge", CHAT, chat(seed=2**70)),
    Case("chat_tools_empty", CHAT, chat(tools=[])),
    Case(
        "chat_tool_choice_none",
        CHAT,
        chat(
            tools=TOOLS,
            tool_choice="none",
        ),
    ),
    Case(
        "chat_tool_choice_named_unknown",
        CHAT,
        chat(
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
    ),
    Case(
        "chat_echo",
        CHAT,
        chat(messages=[*SHORT, {"role": "assistant", "content": "Red"}], add_generation_prompt=False, echo=True),
    ),
    Case(
        "chat_echo_stream",
        CHAT,
        chat(
            messages=[*SHORT, {"role": "assistant", "content": "Red"}],
            add_generation_prompt=False,
            echo=True,
            stream=True,
        ),
    ),
    Case("chat_prompt_logprobs_string", CHAT, chat(prompt_logprobs="2")),
    Case("chat_prompt_logprobs", CHAT, chat(prompt_logprobs=1)),
    Case("chat_min_tokens_over_max", CHAT, chat(min_tokens=10, max_tokens=2)),
    Case("chat_top_k_float", CHAT, chat(top_k=1.5)),
    Case("chat_logit_bias_text_key", CHAT, chat(logit_bias={"a": 1})),
    Case("chat_stop_token_ids_strings", CHAT, chat(stop_token_ids=["a"])),
    Case("chat_messages_not_objects", CHAT, chat(messages=["hi"]), union=True),
    Case(
        "chat_content_parts_bad", CHAT, chat(messages=[{"role": "user", "content": [{"text": "no type"}]}]), union=True
    ),
    Case("chat_name_number", CHAT, chat(messages=[{"role": "user", "content": "hi", "name": 5}]), union=True),
    Case(
        "chat_assistant_null_content",
        CHAT,
        chat(messages=[*SHORT, {"role": "assistant", "content": None}, {"role": "user", "content": "Go on."}]),
    ),
    Case("chat_model_null", CHAT, chat(model=None)),
    Case("chat_max_tokens_null", CHAT, chat(max_tokens=None)),
    Case(
        "chat_max_tokens_over_room",
        CHAT,
        chat(
            # ~3,900 prompt tokens: the answer is cut to the ~180 the window leaves
            messages=[{"role": "user", "content": " ".join(f"w{i}" for i in range(1000))}],
            max_tokens=4096,
        ),
    ),
    Case("chat_response_format_json_schema_missing", CHAT, chat(response_format={"type": "json_schema"})),
    Case("completion_logprobs_negative", COMPLETIONS, completion(logprobs=-2)),
    Case("completion_suffix", COMPLETIONS, completion(suffix="end")),
    Case("completion_best_of", COMPLETIONS, completion(best_of=2)),
    Case("completion_prompt_batch_too_many", COMPLETIONS, completion(prompt=["x"] * 1025)),
    Case("completion_echo_stream", COMPLETIONS, completion(echo=True, stream=True)),
    Case(
        "completion_ids_stream_usage",
        COMPLETIONS,
        completion(prompt=[5, 6, 7], stream=True, stream_options={"include_usage": True}),
    ),
    Case("completion_max_tokens_0", COMPLETIONS, completion(max_tokens=0)),
    Case("completion_no_max_tokens", COMPLETIONS, completion(max_tokens=_DROP)),
    # Found by differential fuzzing (python -m tests.fuzz_vllm_http, 2026-12-08).
    Case("chat_truncate_5", CHAT, chat(truncate_prompt_tokens=5), counts=True),
    Case("chat_truncate_0", CHAT, chat(truncate_prompt_tokens=0)),
    Case("chat_truncate_below_minus_1", CHAT, chat(truncate_prompt_tokens=-7)),
    Case("chat_truncate_past_int64", CHAT, chat(truncate_prompt_tokens=2**63)),
    Case("chat_truncate_past_window", CHAT, chat(truncate_prompt_tokens=5000)),
    Case(
        "chat_too_long_truncated_to_window",
        CHAT,
        chat(messages=[{"role": "user", "content": TOO_LONG}], truncate_prompt_tokens=-1),
        counts=True,
    ),
    Case(
        "completion_too_long_truncated_right",
        COMPLETIONS,
        completion(prompt=TOO_LONG, truncate_prompt_tokens=100, truncation_side="right"),
        counts=True,
    ),
    Case("completion_truncate_ids_left", COMPLETIONS, completion(prompt=[5, 6, 7, 8, 9], truncate_prompt_tokens=2)),
    Case("completion_truncation_side_middle", COMPLETIONS, completion(truncate_prompt_tokens=2, truncation_side="x")),
    Case("chat_min_tokens_null", CHAT, chat(min_tokens=None)),
    Case("chat_include_stop_str_in_output_null", CHAT, chat(include_stop_str_in_output=None)),
    Case("chat_ignore_eos_null", CHAT, chat(ignore_eos=None)),
    Case("completion_n_null", COMPLETIONS, completion(n=None)),
    Case("completion_echo_null", COMPLETIONS, completion(echo=None)),
    Case("chat_mm_processor_kwargs_number", CHAT, chat(mm_processor_kwargs=0.5)),
    Case("chat_parallel_tool_calls_object", CHAT, chat(parallel_tool_calls={})),
    Case("chat_reasoning_effort_object", CHAT, chat(reasoning_effort={})),
    Case("completion_prompt_embeds_number", COMPLETIONS, completion(prompt_embeds=-0.5)),
    Case("completion_prompt_embeds_string", COMPLETIONS, completion(prompt_embeds="a")),
    Case("chat_json_nested_past_the_parser", CHAT, raw=b"[" * 5000 + b"]" * 5000),
    Case("chat_body_after_a_byte_order_mark", CHAT, raw=b"\xef\xbb\xbf" + json.dumps(chat()).encode()),
    Case("completion_prompt_logprobs_true", COMPLETIONS, completion(prompt_logprobs=True)),
    Case("chat_user_content_null", CHAT, chat(messages=[{"role": "user", "content": None}]), union=True),
    Case("chat_function_content_null", CHAT, chat(messages=[*SHORT, FUNCTION_NULL])),
    Case("chat_model_empty", CHAT, chat(model="")),
    Case("chat_priority_past_int64", CHAT, chat(priority=2**63)),
    Case("chat_structured_outputs_no_constraint", CHAT, chat(structured_outputs={"type": "text"})),
    Case("chat_structured_outputs_two_constraints", CHAT, chat(structured_outputs={"regex": "a", "choice": ["a"]})),
    Case("chat_structured_outputs_choice", CHAT, chat(structured_outputs={"choice": ["red", "blue"]})),
    Case("chat_logit_bias_nan", CHAT, raw=json.dumps(chat(logit_bias={"5": float("nan")})).encode()),
    Case("chat_temperature_nan", CHAT, raw=json.dumps(chat(temperature=float("nan"))).encode()),
    Case("chat_presence_penalty_infinity", CHAT, raw=json.dumps(chat(presence_penalty=float("inf"))).encode()),
    Case("completion_top_p_nan", COMPLETIONS, raw=json.dumps(completion(top_p=float("nan"))).encode()),
    Case("chat_lone_surrogate", CHAT, raw=json.dumps(chat(messages=[{"role": "user", "content": LONE}])).encode()),
    Case("completion_prompt_ids_lax", COMPLETIONS, completion(prompt=[True, 5.0, 7]), counts=True),
    Case("completion_logprobs_string", COMPLETIONS, completion(logprobs="2")),
    Case("completion_logprobs_float", COMPLETIONS, completion(logprobs=1.5)),
    Case("chat_top_logprobs_string", CHAT, chat(logprobs=True, top_logprobs="2")),
    Case("chat_prompt_logprobs_float", CHAT, chat(prompt_logprobs=0.5)),
    Case("chat_tool_call_arguments_not_json", CHAT, chat(messages=[*SHORT, BROKEN_CALL, *SHORT])),
    Case("chat_mm_processor_kwargs_untrusted", CHAT, chat(mm_processor_kwargs={"a": 1})),
    Case("chat_media_io_kwargs_untrusted", CHAT, chat(media_io_kwargs={"image": {"a": 1}})),
    Case("chat_mm_processor_kwargs_empty", CHAT, chat(mm_processor_kwargs={})),
    # /tokenize and /detokenize: the gateway forwards them to a worker.
    Case("tokenize_prompt", "/tokenize", {"model": MODEL, "prompt": "The colours of the rainbow are"}, counts=True),
    Case("tokenize_prompt_strs", "/tokenize", {"prompt": "Hello there", "return_token_strs": True}, counts=True),
    Case(
        "tokenize_prompt_no_special", "/tokenize", {"prompt": "Hello there", "add_special_tokens": False}, counts=True
    ),
    Case("tokenize_chat", "/tokenize", {"model": MODEL, "messages": SHORT}, counts=True),
    Case("tokenize_chat_strs", "/tokenize", {"messages": SHORT, "return_token_strs": True}, counts=True),
    Case(
        "tokenize_chat_no_generation_prompt",
        "/tokenize",
        {"messages": SHORT, "add_generation_prompt": False},
        counts=True,
    ),
    Case("tokenize_chat_special", "/tokenize", {"messages": SHORT, "add_special_tokens": True}, counts=True),
    Case("tokenize_neither", "/tokenize", {"model": MODEL}, union=True),
    Case("tokenize_prompt_number", "/tokenize", {"prompt": 5}, union=True),
    Case("tokenize_unknown_model", "/tokenize", {"model": "nope", "prompt": "x"}),
    Case("tokenize_empty_prompt", "/tokenize", {"prompt": ""}, counts=True),
    Case("tokenize_not_json", "/tokenize", raw=b"{", content_type="application/json"),
    Case("detokenize", "/detokenize", {"model": MODEL, "tokens": [5, 6, 7, 8]}, counts=True),
    Case("detokenize_empty", "/detokenize", {"tokens": []}, counts=True),
    Case("detokenize_negative", "/detokenize", {"tokens": [5, -1]}),
    Case("detokenize_out_of_vocab", "/detokenize", {"tokens": [5, 10**9]}, counts=True),
    Case("detokenize_strings", "/detokenize", {"tokens": ["a"]}),
    Case("detokenize_missing", "/detokenize", {"model": MODEL}),
    Case("detokenize_unknown_model", "/detokenize", {"model": "nope", "tokens": [5]}),
    Case("models_post", "/v1/models", method="POST", content_type=None),
    Case("health", "/health", method="GET", content_type=None),
]
