"""gateway.tokenization against the shipped models/kvgate-tiny tokenizer (offline, real transformers)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import shutil
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.gateway.tokenization import ChatEncoding, Preprocessor, TokenizerError
from kvgate.protocol.hashing import sequence_hashes

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "kvgate-tiny"
BLOCK = 64


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    preprocessor = Preprocessor.load(str(TINY))
    yield preprocessor
    preprocessor.close()


def tiny_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / "model"
    shutil.copytree(TINY, target)
    return target


def edit_json(path: pathlib.Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# -- loading ---------------------------------------------------------------------------------------------


def test_loads_the_shipped_directory(pre: Preprocessor) -> None:
    assert pre.context_length == 32768
    assert pre.max_token_id == 8191
    assert pre.content_format == "openai"
    assert pre.tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert pre.tokenizer.eos_token == "<|im_end|>"


def test_shipped_files_match_the_build_script(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("build_tiny_tokenizer", ROOT / "models" / "build_tiny_tokenizer.py")
    build = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, build)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(build)
    assert json.loads((TINY / "tokenizer_config.json").read_text()) == build.tokenizer_config()
    assert json.loads((TINY / "config.json").read_text()) == build.model_config(8192)
    assert (TINY / "tokenizer.json").stat().st_size < 1_000_000


def test_context_length_override_and_fallback(tmp_path: pathlib.Path) -> None:
    with Preprocessor.load(str(TINY), context_length=4096) as overridden:
        assert overridden.context_length == 4096
    model = tiny_copy(tmp_path)
    (model / "config.json").unlink()
    edit_json(model / "tokenizer_config.json", model_max_length=2048)
    with Preprocessor.load(str(model)) as fallback:
        assert fallback.context_length == 2048


@pytest.mark.parametrize("bad", ["/nonexistent/kvgate/model", "./no-such-model-dir", "a/b/c"])
def test_missing_directory_is_a_tokenizer_error(bad: str) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        Preprocessor.load(bad)


def test_unusable_paths_and_ids_are_tokenizer_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TokenizerError, match="cannot load"):
        Preprocessor.load(str(tmp_path))  # exists, but holds no tokenizer
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(TokenizerError, match="not a directory"):
        Preprocessor.load(str(file))
    with pytest.raises(TokenizerError, match="hub id"):
        Preprocessor.load("kvgate-test/not-a-real-model")  # offline and not cached


def test_bad_or_missing_chat_template_fails_at_load(tmp_path: pathlib.Path) -> None:
    model = tiny_copy(tmp_path)
    edit_json(model / "tokenizer_config.json", chat_template="{% for message in messages %}{{ message.content }")
    with pytest.raises(TokenizerError, match="chat template"):
        Preprocessor.load(str(model))
    edit_json(model / "tokenizer_config.json", chat_template=None)
    with pytest.raises(TokenizerError, match="no chat template"):
        Preprocessor.load(str(model))
    with pytest.raises(TokenizerError, match="file not found"):
        Preprocessor.load(str(TINY), chat_template=str(tmp_path / "missing.jinja"))


# -- rendering -------------------------------------------------------------------------------------------

TWO_TURNS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is a KV cache?"},
    {"role": "assistant", "content": "Saved attention keys and values."},
    {"role": "user", "content": "Why route by it?"},
]
TWO_TURNS_CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is a KV cache?<|im_end|>\n"
    "<|im_start|>assistant\nSaved attention keys and values.<|im_end|>\n"
    "<|im_start|>user\nWhy route by it?<|im_end|>\n"
)


def test_renders_chatml_exactly(pre: Preprocessor) -> None:
    assert pre.render_chat(TWO_TURNS, add_generation_prompt=False) == TWO_TURNS_CHATML
    assert pre.render_chat(TWO_TURNS) == TWO_TURNS_CHATML + "<|im_start|>assistant\n"


def test_render_matches_transformers_apply_chat_template(pre: Preprocessor) -> None:
    # What vLLM calls for a chat request, straight through transformers.
    expected = pre.tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert pre.render_chat(TWO_TURNS) == expected
    assert pre.encode_chat(TWO_TURNS) == pre.tokenizer.encode(expected, add_special_tokens=False)


def test_list_of_text_parts_renders_like_the_string(pre: Preprocessor) -> None:
    parts = [{"type": "text", "text": "What is "}, "a KV ", {"type": "text", "text": "cache?"}]
    as_parts = [TWO_TURNS[0], {"role": "user", "content": parts}]
    assert pre.render_chat(as_parts) == pre.render_chat(TWO_TURNS[:2])


def test_string_format_template_joins_parts_with_newlines() -> None:
    # A template that never loops over content gets vLLM's "string" format: text parts joined by "\n".
    template = "{% for message in messages %}[{{ message['role'] }}]{{ message['content'] }}\n{% endfor %}"
    with Preprocessor.load(str(TINY), chat_template=template) as plain:
        assert plain.content_format == "string"
        rendered = plain.render_chat([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}])
        assert rendered == "[user]a\nb\n"


def test_tools_and_tool_calls_render_in_qwen_format(pre: Preprocessor) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    rendered = pre.render_chat(messages, tools=tools)
    assert rendered.startswith("<|im_start|>system\n# Tools\n")
    assert '\n{"type": "function", "function": {"name": "get_weather", "description": null, ' in rendered
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
    ) in rendered
    assert rendered.endswith(
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    # Arguments given as a dict render like the JSON string (vLLM parses the string before rendering).
    dict_call = {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    dict_args = [messages[0], {**messages[1], "tool_calls": [dict_call]}, messages[2]]
    assert pre.render_chat(dict_args, tools=tools) == rendered


def test_chat_template_kwargs_and_continue_final_message(pre: Preprocessor) -> None:
    without = pre.render_chat(TWO_TURNS, chat_template_kwargs={"add_generation_prompt": False})
    assert without == TWO_TURNS_CHATML
    prefill = [*TWO_TURNS, {"role": "assistant", "content": "Because the"}]
    continued = pre.render_chat(prefill, add_generation_prompt=False, continue_final_message=True)
    assert continued == TWO_TURNS_CHATML + "<|im_start|>assistant\nBecause the"
    with pytest.raises(TokenizerError, match="cannot both"):
        pre.render_chat(prefill, continue_final_message=True)
    with pytest.raises(TokenizerError, match="may not set"):
        pre.render_chat(TWO_TURNS, chat_template_kwargs={"tokenize": True})


REQUEST_TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{{ greeting | default('') }}"


def test_a_requests_own_chat_template_is_refused_unless_trusted(pre: Preprocessor) -> None:
    # vLLM refuses a request's template (top-level or in chat_template_kwargs) without
    # --trust-request-chat-template, with this message; the gateway must not route on a render vLLM refuses.
    for options in ({"chat_template": REQUEST_TEMPLATE}, {"chat_template_kwargs": {"chat_template": REQUEST_TEMPLATE}}):
        with pytest.raises(TokenizerError, match="--trust-request-chat-template is not set"):
            pre.render_chat(TWO_TURNS, **options)
    trusted = Preprocessor.load(str(TINY), trust_request_chat_template=True)
    try:
        rendered = trusted.render_chat(TWO_TURNS[1:2], chat_template=REQUEST_TEMPLATE)
        assert rendered == "[user] What is a KV cache?\n"
        # The kwargs' template wins over the top-level one, and the other kwargs reach it (as vLLM).
        rendered = trusted.render_chat(
            TWO_TURNS[1:2],
            chat_template="ignored",
            chat_template_kwargs={"chat_template": REQUEST_TEMPLATE, "greeting": "hi"},
        )
        assert rendered == "[user] What is a KV cache?\nhi"
        assert trusted.render_chat(TWO_TURNS) == pre.render_chat(TWO_TURNS)  # no template: the model's
        with pytest.raises(TokenizerError, match="chat template failed"):
            trusted.render_chat(TWO_TURNS, chat_template="{% if %}")
    finally:
        trusted.close()


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty array"),
        ("hello", "non-empty array"),
        ([["user", "hi"]], "must be an object"),
        ([{"content": "hi"}], "role"),
        ([{"role": 7, "content": "hi"}], "role"),
        ([{"role": "user", "content": 42}], "content"),
        ([{"role": "user", "content": {"type": "text", "text": "hi"}}], "content"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "text must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text only"),
        ([{"role": "user", "content": [3]}], "must be an object"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]}], "function"),
        (
            # A RecursionError inside json.loads, a 500 before: now a clear 400.
            [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[" * 100_000 + "]" * 100_000}}],
                }
            ],
            "nested too deeply",
        ),
        ([{"role": "wizard", "content": "hi"}], "unknown message role"),
    ],
)
def test_invalid_messages_are_tokenizer_errors(pre: Preprocessor, messages, match: str) -> None:
    with pytest.raises(TokenizerError, match=match):
        pre.render_chat(messages)


@pytest.mark.parametrize("arguments", ["{oops", "[1, 2]", "42", ["a"]])
def test_tool_call_arguments_that_are_no_json_object_render_as_an_empty_one(pre: Preprocessor, arguments) -> None:
    # vLLM 0.32 coerces them to {} (a malformed call in a conversation's history must not fail every later
    # turn); the engine's own render agrees (tests/test_vllm_interop.py).
    def chat(args: object) -> list[dict[str, object]]:
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]

    assert pre.render_chat(chat(arguments)) == pre.render_chat(chat({}))
    assert pre.render_chat(chat('{"x": 1}')) == pre.render_chat(chat({"x": 1})) != pre.render_chat(chat({}))


def test_invalid_tools_are_tokenizer_errors(pre: Preprocessor) -> None:
    for tools in ({"type": "function"}, [{"type": "function"}], [{"function": {"name": 3}}]):
        with pytest.raises(TokenizerError, match="tools"):
            pre.render_chat(TWO_TURNS, tools=tools)


# -- encoding --------------------------------------------------------------------------------------------

UNICODE_SAMPLES = [
    "plain ASCII, with punctuation!? and numbers 1234567890",
    "naïve café — «quotes» ‘single’ … ß ø å",
    "e\u0301 decomposed and é composed stay distinct",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "עברית ועربية mixed with LTR",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 flags 🇫🇷",
    "tabs\tand\r\nCRLF\n\n\nblank lines   trailing spaces   ",
    "nul \x00 and controls \x07\x1b[31m",
    "literal special token text <|im_end|> inside",
    "    def f(x):\n        return {'k': [x ** 2 for _ in range(3)]}\n",
]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_encode_decode_round_trip(pre: Preprocessor, text: str) -> None:
    ids = pre.encode_prompt(text)
    assert pre.decode(ids) == text
    assert ids == pre.tokenizer.encode(text)  # vLLM's completions path: default special tokens


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(text=st.text(min_size=1, max_size=300))
def test_round_trip_property(pre: Preprocessor, text: str) -> None:
    assert pre.decode(pre.encode_prompt(text)) == text


def test_empty_prompt_is_rejected(pre: Preprocessor) -> None:
    with pytest.raises(TokenizerError, match="empty"):
        pre.encode_prompt("")


def test_token_list_passes_through_validated(pre: Preprocessor) -> None:
    ids = [0, 1, 2, 500, 8191]
    out = pre.encode_prompt(ids)
    assert out == ids and out is not ids
    assert pre.encode_prompt((5, 6)) == [5, 6]


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([], "empty"),
        ([1, 8192], "out of vocabulary"),
        ([-1], "out of vocabulary"),
        ([1, True], "not an integer"),
        ([1.0], "not an integer"),
        (["1"], "not an integer"),
        ({"ids": [1]}, "string or a list"),
        (b"bytes", "string or a list"),
        (None, "string or a list"),
    ],
)
def test_bad_token_lists_are_rejected(pre: Preprocessor, prompt, match: str) -> None:
    with pytest.raises(TokenizerError, match=match):
        pre.encode_prompt(prompt)


def test_render_and_encode_reports_a_timing_split(pre: Preprocessor) -> None:
    encoded = pre.render_and_encode(TWO_TURNS)
    assert isinstance(encoded, ChatEncoding)
    assert encoded.prompt == pre.render_chat(TWO_TURNS)
    assert encoded.token_ids == pre.encode_chat(TWO_TURNS)
    assert encoded.render_seconds > 0 and encoded.tokenize_seconds > 0
    assert not encoded.offloaded


# -- async -----------------------------------------------------------------------------------------------


def long_plain_text(tag: str) -> str:
    """Over the offload threshold, no added tokens inside (so one segment), unique to `tag`'s test."""
    return tag + " ".join(sample for sample in UNICODE_SAMPLES if "<|" not in sample) * 40


async def test_async_paths_return_identical_ids(pre: Preprocessor) -> None:
    long_text = long_plain_text("async paths")
    assert len(long_text) > pre.config.offload_threshold_chars
    for messages, offloaded in ((TWO_TURNS, False), ([{"role": "user", "content": long_text}], True)):
        encoded = await pre.render_and_encode_async(messages)
        assert encoded.offloaded is offloaded
        assert encoded.token_ids == pre.encode_chat(messages)
        assert await pre.encode_chat_async(messages) == encoded.token_ids
    assert await pre.encode_prompt_async(long_text) == pre.encode_prompt(long_text)
    assert await pre.encode_prompt_async([3, 4]) == [3, 4]
    with pytest.raises(TokenizerError, match="out of vocabulary"):
        await pre.encode_prompt_async([10**6])


# -- the prefix property the router relies on ------------------------------------------------------------

REPLIES = [
    "A KV cache stores the attention keys and values of every token already processed.",
    "Routing by it sends a conversation back to the worker that already holds its prefix, so prefill is skipped.",
    "Yes: with 64-token blocks, only the last partial block of a turn has to be recomputed — 快速 👍.",
    "def hit_rate(hits, total):\n    return hits / total if total else 0.0",
]
QUESTIONS = ["Explain KV caches.", "And routing?", "How much is saved?", "Show me code.", "Thanks!"]


def conversation_turns(replies: list[str]) -> list[list[dict[str, str]]]:
    """The message list a client sends at each turn of a growing conversation."""
    messages = [{"role": "system", "content": "Answer in detail."}, {"role": "user", "content": QUESTIONS[0]}]
    turns = [list(messages)]
    for index, reply in enumerate(replies):
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": QUESTIONS[(index + 1) % 5]}]
        turns.append(list(messages))
    return turns


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_each_turn_is_a_token_prefix_of_the_next(pre: Preprocessor) -> None:
    token_turns = [pre.encode_chat(turn) for turn in conversation_turns(REPLIES * 3)]
    assert len(token_turns[-1]) > 4 * BLOCK
    for current, following in zip(token_turns, token_turns[1:]):
        assert following[: len(current)] == current
        hashes = sequence_hashes(current, BLOCK)
        assert sequence_hashes(following, BLOCK)[: len(hashes)] == hashes


# A reply that opens with whitespace holding a newline merges with the "\n" after "assistant" (the split
# regex's \s*[\r\n]+ run), so only the last token of the previous turn can differ.
_NEWLINE_LEAD = re.compile(r"\s*[\r\n]")


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(
    history=st.lists(st.text(min_size=1, max_size=120), min_size=1, max_size=3),
    reply=st.one_of(
        st.text(max_size=120),
        st.builds(
            str.__add__, st.sampled_from(["\n", "\n\n", " \n", "\r\n", "\t\r", "\u2028\n"]), st.text(max_size=60)
        ),
    ),
    padding=st.integers(min_value=0, max_value=200),
)
def test_prefix_property_breaks_only_at_the_last_token(
    pre: Preprocessor, history: list[str], reply: str, padding: int
) -> None:
    turns = conversation_turns([*history, reply])
    # Stretch the system prompt so turn boundaries land at every offset within a block.
    for turn in turns:
        turn[0] = {"role": "system", "content": "x " * padding}
    previous, current = pre.encode_chat(turns[-2]), pre.encode_chat(turns[-1])
    shared = common_prefix(previous, current)
    if _NEWLINE_LEAD.match(reply):
        assert shared >= len(previous) - 1
    else:
        assert shared == len(previous)
    # Every full block before the last token of the previous turn is reused.
    reusable = (len(previous) - 1) // BLOCK
    assert sequence_hashes(current, BLOCK)[:reusable] == sequence_hashes(previous, BLOCK)[:reusable]


def test_leading_newline_reply_costs_at_most_the_last_block(pre: Preprocessor) -> None:
    turns = conversation_turns(["\n\nA reply that starts with a blank line."])
    previous, current = pre.encode_chat(turns[0]), pre.encode_chat(turns[1])
    assert common_prefix(previous, current) == len(previous) - 1
    assert pre.decode(previous[-1:]) == "\n" and pre.decode(current[len(previous) - 1 : len(previous)]) == "\n\n\n"


# -- segment cache ---------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant", "tool")
# Whitespace and newlines placed right next to where <|im_start|> / <|im_end|> go.
EDGES = st.sampled_from(["", " ", "\n", "\n\n", " \n", "\r\n", "\t", "\u2028", "\u00a0", "  "])
CONTENT = st.builds(lambda lead, body, tail: lead + body + tail, EDGES, st.text(max_size=80), EDGES)


@pytest.fixture(scope="module")
def segments_pre() -> Preprocessor:
    preprocessor = Preprocessor.load(str(TINY), prefix_cache=False)
    yield preprocessor
    preprocessor.close()


def test_the_prefix_cache_replaces_the_segment_cache_where_it_is_exact(pre: Preprocessor) -> None:
    assert pre.incremental_info().enabled
    assert not pre.segment_cache_info().enabled and "prefix" in pre.segment_cache_info().reason


def reference_ids(pre: Preprocessor, prompt: str) -> list[int]:
    """transformers' own encode of the whole prompt: never touches the segment cache."""
    return pre.tokenizer(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(turns=st.lists(st.tuples(st.sampled_from(ROLES), CONTENT), min_size=1, max_size=6))
def test_segment_cached_ids_equal_whole_string_ids(segments_pre: Preprocessor, turns: list[tuple[str, str]]) -> None:
    pre = segments_pre
    assert pre.segment_cache_info().enabled
    messages: list[dict[str, str]] = []
    for role, content in turns:
        messages.append({"role": role, "content": content})
        for generation in (True, False):
            encoded = pre.render_and_encode(messages, add_generation_prompt=generation)
            assert encoded.token_ids == reference_ids(pre, encoded.prompt)
    # A conversation that opens and closes on added tokens, with none of the template around them.
    raw = "".join(f"<|im_start|>{content}<|im_end|><|endoftext|>" for _, content in turns)
    assert pre.encode_prompt(raw, add_special_tokens=False) == reference_ids(pre, raw)


def test_second_turn_encodes_only_its_new_segments() -> None:
    with Preprocessor.load(str(TINY), prefix_cache=False) as fresh:
        first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
        fresh.encode_chat(first)
        after_first = fresh.segment_cache_info()
        # "system\n…", "\n", "user\n…", "assistant\n" (the generation prompt).
        assert after_first.encoded_chars == len("system\nBe brief.") + 1 + len("user\nHi there") + len("assistant\n")
        reply, question = "Hello! 👋\n", " And then?"
        second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": question}]
        encoded = fresh.render_and_encode(second)
        assert encoded.token_ids == reference_ids(fresh, encoded.prompt)
        after_second = fresh.segment_cache_info()
        assert after_second.encoded_chars - after_first.encoded_chars == len("assistant\n" + reply) + len(
            "user\n" + question
        )
        assert after_second.misses - after_first.misses == 2
        assert after_second.hits - after_first.hits == 4  # system, "\n", first user, generation prompt
        # The same request again encodes nothing.
        assert fresh.encode_chat(second) == encoded.token_ids
        assert fresh.segment_cache_info().encoded_chars == after_second.encoded_chars


async def test_offload_threshold_applies_to_the_uncached_text() -> None:
    with Preprocessor.load(str(TINY)) as fresh:
        messages = [{"role": "user", "content": long_plain_text("offload threshold")}]
        first = await fresh.render_and_encode_async(messages)
        assert first.offloaded and first.token_ids == reference_ids(fresh, first.prompt)
        messages += [{"role": "assistant", "content": "Short."}, {"role": "user", "content": "Again?"}]
        second = await fresh.render_and_encode_async(messages)
        assert len(second.prompt) > fresh.config.offload_threshold_chars
        assert not second.offloaded and second.token_ids == reference_ids(fresh, second.prompt)


def test_tokenizer_with_an_lstrip_token_falls_back_and_stays_exact(tmp_path: pathlib.Path) -> None:
    from tokenizers import AddedToken, Tokenizer

    model = tiny_copy(tmp_path)
    backend = Tokenizer.from_file(str(model / "tokenizer.json"))
    backend.add_special_tokens([AddedToken("<|tool|>", lstrip=True)])
    backend.save(str(model / "tokenizer.json"))
    with Preprocessor.load(str(model)) as stripped:
        info = stripped.segment_cache_info()
        assert not info.enabled and "lstrip" in info.reason
        messages = [{"role": "user", "content": "call it   <|tool|> now"}, {"role": "assistant", "content": "ok \n"}]
        for _ in range(2):
            encoded = stripped.render_and_encode(messages)
            assert encoded.token_ids == reference_ids(stripped, encoded.prompt)
        # lstrip really eats the spaces: splitting at the token and encoding the pieces would not be exact.
        tool = stripped.tokenizer.convert_tokens_to_ids("<|tool|>")
        assert stripped.encode_prompt("a   <|tool|>", add_special_tokens=False) == [
            *stripped.encode_prompt("a", add_special_tokens=False),
            tool,
        ]
        assert stripped.segment_cache_info().encoded_chars == 0


def test_segment_cache_can_be_turned_off() -> None:
    with Preprocessor.load(str(TINY), segment_cache_bytes=0) as off:
        assert not off.segment_cache_info().enabled
        assert off.encode_chat(TWO_TURNS) == reference_ids(off, off.render_chat(TWO_TURNS))
    with pytest.raises(TokenizerError, match="segment_cache_bytes"):
        Preprocessor.load(str(TINY), segment_cache_bytes=-1)


def test_segment_cache_is_bounded_and_evicts_least_recently_used() -> None:
    budget = 20_000
    with Preprocessor.load(str(TINY), segment_cache_bytes=budget, prefix_cache=False) as small:
        early = [{"role": "user", "content": "the first question, evicted later"}]
        small.encode_chat(early)
        for index in range(200):
            messages = [{"role": "user", "content": f"question {index}: " + "lorem ipsum " * (index % 7)}]
            assert small.encode_chat(messages) == reference_ids(small, small.render_chat(messages))
            info = small.segment_cache_info()
            assert 0 < info.bytes <= budget
        assert info.entries < 200
        before = small.segment_cache_info().encoded_chars
        assert small.encode_chat(early) == reference_ids(small, small.render_chat(early))
        assert small.segment_cache_info().encoded_chars - before == len("user\n" + early[0]["content"])
        # A segment larger than the whole budget is encoded, not cached.
        huge = [{"role": "user", "content": "x y " * 10_000}]
        assert small.encode_chat(huge) == reference_ids(small, small.render_chat(huge))
        assert small.segment_cache_info().bytes <= budget


def test_segment_cache_speed() -> None:
    """Benchmark (prints, asserts only exactness): tokenize time per request over an 8-turn conversation."""
    first = " ".join(REPLIES * 20)
    turns = conversation_turns([f"{reply} ({index})" for index, reply in enumerate(REPLIES * 2)][:7])
    turns = [[{"role": "system", "content": first}, *turn[1:]] for turn in turns]
    with (
        Preprocessor.load(str(TINY), segment_cache_bytes=0) as whole,
        Preprocessor.load(str(TINY), prefix_cache=False) as cached,
    ):
        assert 1800 <= len(whole.encode_chat(turns[0])) <= 2600
        figures = {}
        for name, pre_ in (("whole", whole), ("segments", cached)):
            encodings = [pre_.render_and_encode(turn) for turn in turns]
            figures[name] = [e.tokenize_seconds for e in encodings]
            figures[name + "_ids"] = [e.token_ids for e in encodings]
        assert figures["whole_ids"] == figures["segments_ids"]
    before, after = sum(figures["whole"]) / len(turns), sum(figures["segments"]) / len(turns)
    later_before = sum(figures["whole"][1:]) / (len(turns) - 1)
    later_after = sum(figures["segments"][1:]) / (len(turns) - 1)
    print(
        f"\n8-turn conversation, {len(figures['whole_ids'][-1])} tokens at the last turn: tokenize per request "
        f"whole {before * 1e3:.2f} ms, segment cache {after * 1e3:.2f} ms ({before / after:.1f}x); "
        f"turns 2-8 whole {later_before * 1e3:.2f} ms, cached {later_after * 1e3:.3f} ms "
        f"({later_before / later_after:.0f}x)"
    )


def test_load_time_self_test_alone_catches_a_mismatch(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenizers import AddedToken, Tokenizer

    from kvgate.gateway import tokenization

    model = tiny_copy(tmp_path)
    backend = Tokenizer.from_file(str(model / "tokenizer.json"))
    backend.add_special_tokens([AddedToken("<|sep|>", rstrip=True)])
    backend.save(str(model / "tokenizer.json"))
    # With the attribute check skipped, the sample renders still show that rstrip breaks segment-wise encoding.
    monkeypatch.setattr(tokenization, "_unsplittable_reason", lambda backend: "")
    with Preprocessor.load(str(model)) as checked:
        info = checked.segment_cache_info()
        assert not info.enabled and info.reason.startswith("self-test")
        text = "<|im_start|>user\na <|sep|>  \n b<|im_end|>\n"
        assert checked.encode_prompt(text, add_special_tokens=False) == reference_ids(checked, text)
