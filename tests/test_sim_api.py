"""The simulated worker's HTTP API, over real sockets: the OpenAI SDK and raw aiohttp."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import openai
import pytest

from kvgate.dev.launch import free_port
from kvgate.worker.sim.__main__ import parser
from kvgate.worker.sim.config import AnswerConfig, EngineConfig, SimConfig
from tests.helpers import REPO, TINY_MODEL, Proc, python_module, wait_http

MAX_MODEL_LEN = 2048
CONFIG = SimConfig(
    model_dir=TINY_MODEL,
    port=0,
    engine=EngineConfig(
        block_size=64,
        num_gpu_blocks=256,
        max_num_seqs=16,
        max_num_batched_tokens=1024,
        max_model_len=MAX_MODEL_LEN,
        speedup_ratio=1000.0,
    ),
    answer=AnswerConfig(min_tokens=20, max_tokens=40),
)


def start_sim(config: SimConfig, log_dir: Path) -> tuple[Proc, str]:
    config = replace(config, port=free_port())
    proc = python_module("kvgate.worker.sim", *config.cli_args(), log_path=log_dir / f"sim-{config.port}.log")
    base = f"http://127.0.0.1:{config.port}"
    try:
        wait_http(base + "/health", timeout=60, proc=proc)
    except BaseException:
        proc.stop()
        raise
    return proc, base


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Iterator[str]:
    proc, base = start_sim(CONFIG, tmp_path_factory.mktemp("sim_api"))
    try:
        yield base
    finally:
        proc.stop()
    assert "Traceback" not in proc.log_path.read_text()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_MODEL))


@pytest.fixture
def client(sim) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim + "/v1", api_key="unused", max_retries=0)


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# --- OpenAI SDK ----------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_completion_with_usage(client, tok):
    messages = [{"role": "user", "content": "Tell me about prefix caching."}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    r = client.chat.completions.create(model="kvgate-tiny", messages=messages, max_tokens=8)
    assert r.object == "chat.completion" and r.model == "kvgate-tiny"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    again = client.chat.completions.create(model="kvgate-tiny", messages=messages, max_tokens=8)
    assert again.choices[0].message.content == choice.message.content  # deterministic per prompt


@pytest.mark.slow
def test_chat_prompt_is_rendered_with_the_models_chat_template(client, tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    r = client.chat.completions.create(model="kvgate-tiny", messages=messages, max_tokens=1)
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))


@pytest.mark.slow
def test_chat_answer_ends_on_eos_without_max_tokens(client):
    r = client.chat.completions.create(model="kvgate-tiny", messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].finish_reason == "stop"
    # EOS counts as a generated token but adds no text (CONFIG: 20..40 words, then EOS).
    assert 21 <= r.usage.completion_tokens <= 41
    assert len(r.choices[0].message.content.split()) == r.usage.completion_tokens - 1


@pytest.mark.slow
def test_ignore_eos_and_max_completion_tokens(client):
    r = client.chat.completions.create(
        model="kvgate-tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=60,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 60


@pytest.mark.slow
def test_chat_streaming_with_include_usage(client):
    messages = [{"role": "user", "content": "Stream please"}]
    stream = client.chat.completions.create(
        model="kvgate-tiny", messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 10
    assert usage_chunk.usage.prompt_tokens_details.cached_tokens == 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    full = client.chat.completions.create(model="kvgate-tiny", messages=messages, max_tokens=10)
    assert text == full.choices[0].message.content


@pytest.mark.slow
def test_completion_text_and_token_id_prompts(client):
    r = client.completions.create(model="kvgate-tiny", prompt="def main():", max_tokens=5)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 5
    ids = list(range(100, 300))
    by_ids = client.completions.create(model="kvgate-tiny", prompt=ids, max_tokens=3)
    assert by_ids.usage.prompt_tokens == 200
    # the second time, the 3 full blocks of 64 are cached
    again = client.completions.create(model="kvgate-tiny", prompt=ids, max_tokens=3)
    assert again.usage.prompt_tokens_details.cached_tokens == 192
    assert again.choices[0].text == by_ids.choices[0].text


@pytest.mark.slow
def test_completion_default_max_tokens_is_16(client):
    r = client.completions.create(model="kvgate-tiny", prompt=list(range(500, 510)), extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


@pytest.mark.slow
def test_completion_streaming(client):
    stream = client.completions.create(
        model="kvgate-tiny", prompt="streaming", max_tokens=7, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = client.completions.create(model="kvgate-tiny", prompt="streaming", max_tokens=7)
    assert text == full.choices[0].text


@pytest.mark.slow
def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model="kvgate-tiny", prompt="stop here", max_tokens=12).choices[0].text
    words = full.split()
    stop = " " + words[3]  # the fourth word, with its leading space
    r = client.completions.create(model="kvgate-tiny", prompt="stop here", max_tokens=12, stop=[stop, "zzzz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.usage.completion_tokens == 4  # the token that completed the stop string counts
    streamed = client.completions.create(model="kvgate-tiny", prompt="stop here", max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


@pytest.mark.slow
def test_follow_up_turn_hits_the_cached_answer(client):
    first = [{"role": "user", "content": "Start a long conversation about caches."}]
    r1 = client.chat.completions.create(
        model="kvgate-tiny", messages=first, max_tokens=130, extra_body={"ignore_eos": True}
    )
    second = first + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "Go on."},
    ]
    r2 = client.chat.completions.create(model="kvgate-tiny", messages=second, max_tokens=1)
    # Blocks filled by the generated answer are reused, not just the first prompt's.
    assert r2.usage.prompt_tokens_details.cached_tokens > r1.usage.prompt_tokens
    assert r2.usage.prompt_tokens_details.cached_tokens == 64 * ((r1.usage.total_tokens - 1) // 64)


@pytest.mark.slow
def test_a_cache_salt_shares_cached_blocks_only_within_the_salt(client):
    prompt = "Salted prompts are cached per tenant. " * 20

    def cached(salt: str | None) -> int:
        extra = {} if salt is None else {"cache_salt": salt}
        r = client.completions.create(model="kvgate-tiny", prompt=prompt, max_tokens=1, extra_body=extra)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-A") == 0
    assert cached(None) == 0
    assert cached("tenant-B") == 0
    assert cached("tenant-A") > 0 and cached(None) > 0


@pytest.mark.slow
def test_headers_are_accepted_and_ignored(client):
    r = client.chat.completions.create(
        model="kvgate-tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        extra_headers={"X-Request-Id": "abc", "X-Whatever": "1"},
    )
    assert r.usage.completion_tokens == 2


# --- n > 1 and batches of prompts, as vLLM 0.32 serves them ------------------------------------

CHAT_N = [{"role": "user", "content": "Three takes, please."}]


@pytest.mark.slow
def test_n_choices_each_sampled_once_the_first_as_n_1(client, sim):
    full = {"ignore_eos": True}  # every choice runs to max_tokens
    one = client.chat.completions.create(model="kvgate-tiny", messages=CHAT_N, max_tokens=12, extra_body=full)
    page = _page(sim)
    three = client.chat.completions.create(model="kvgate-tiny", messages=CHAT_N, n=3, max_tokens=12, extra_body=full)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    assert texts[0] == one.choices[0].message.content  # choice 0 samples what n=1 samples
    assert len(set(texts)) == 3  # each choice its own answer
    assert [c.finish_reason for c in three.choices] == ["length"] * 3
    # The prompt counted once, every choice's tokens counted.
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * 12
    # vLLM's metrics: three engine requests finished, one request of n=3.
    after = _page(sim)
    finished = sum(metric(after, "vllm:request_success_total", finished_reason=r) for r in ("stop", "length"))
    before = sum(metric(page, "vllm:request_success_total", finished_reason=r) for r in ("stop", "length"))
    assert finished - before == 3
    assert metric(after, "vllm:request_params_n_count") - metric(page, "vllm:request_params_n_count") == 1
    assert metric(after, "vllm:request_params_n_sum") - metric(page, "vllm:request_params_n_sum") == 3


@pytest.mark.slow
def test_n_choices_stream_each_opened_then_interleaved_by_index(client):
    whole = client.chat.completions.create(model="kvgate-tiny", messages=CHAT_N, n=3, max_tokens=12)
    stream = client.chat.completions.create(
        model="kvgate-tiny", messages=CHAT_N, n=3, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    # vLLM opens every choice (role, empty content) with the first engine output, before any text.
    opened = chunks[:3]
    assert [c.choices[0].index for c in opened] == [0, 1, 2]
    assert all(c.choices[0].delta.role == "assistant" and c.choices[0].delta.content == "" for c in opened)
    assert len({c.id for c in chunks}) == 1
    texts = ["", "", ""]
    finishes = [0, 0, 0]
    for c in chunks[3:-1]:
        (choice,) = c.choices  # one choice per event
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] += choice.finish_reason is not None
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [1, 1, 1]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)


@pytest.mark.slow
def test_n_is_checked_as_vllm_checks_it_and_best_of_is_ignored(client):
    for n, extra, message in (
        (0, {}, "n must be at least 1, got 0."),
        (2, {"temperature": 0}, "n must be 1 when using greedy sampling, got 2."),
        (16385, {}, "n must be at most 16384, got 16385."),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="kvgate-tiny", messages=CHAT_N, n=n, max_tokens=2, **extra)
        assert message in err.value.message, (n, err.value.message)
    # vLLM 0.32's requests have no best_of: an unknown field, ignored.
    answer = client.completions.create(model="kvgate-tiny", prompt="hello", max_tokens=3, extra_body={"best_of": 3})
    assert len(answer.choices) == 1


@pytest.mark.slow
def test_a_batch_of_prompts_answers_each_prompt_n_times_in_order(client, sim, tok):
    prompts = ["The first prompt of the batch", "and a second, different one"]
    singles = [client.completions.create(model="kvgate-tiny", prompt=p, max_tokens=6) for p in prompts]
    batch = client.completions.create(model="kvgate-tiny", prompt=prompts, n=2, max_tokens=6)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == singles[0].choices[0].text  # prompt 0, choice 0
    assert batch.choices[2].text == singles[1].choices[0].text  # prompt 1, choice 0
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    # Token-id prompts batch alike.
    ids = [tok.encode(p) for p in prompts]
    by_ids = client.completions.create(model="kvgate-tiny", prompt=ids, max_tokens=6)
    assert [c.text for c in by_ids.choices] == [s.choices[0].text for s in singles]
    # Streamed: one choice per event, index = prompt * n + choice, each finished once.
    stream = client.completions.create(
        model="kvgate-tiny",
        prompt=prompts,
        n=2,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = ["", "", "", ""]
    finished = [0, 0, 0, 0]
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.text
        finished[choice.index] += choice.finish_reason is not None
    assert texts == [c.text for c in batch.choices] and finished == [1, 1, 1, 1]
    assert chunks[-1].usage.prompt_tokens == batch.usage.prompt_tokens


@pytest.mark.slow
async def test_bad_batches_are_400s(sim):
    async with aiohttp.ClientSession() as http:
        for prompt, expected in (
            (["a", [1, 2]], "'loc': 'body.prompt.0', 'msg': 'Input should be a valid integer"),
            ([[1, 2], []], "The decoder prompt cannot be empty"),
            (["x"] * 1025, "prompt list length 1025 exceeds the maximum allowed count of 1024"),
            ([], "You must pass at least one prompt"),
        ):
            async with http.post(sim + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}) as r:
                body = await r.json()
                assert r.status == 400 and expected in body["error"]["message"], (prompt, body)


# --- frames as the real vLLM 0.32 writes them ------------------------------------------------

GOLDEN_HTTP = REPO / "tests" / "fixtures" / "vllm-0.32" / "http"


def shape(obj: object) -> object:
    """Keys in order and the JSON types of the values, recursively: what a frame-for-frame check compares
    (the simulator's own extra, ``cached_tokens_per_tier``, left out)."""
    if isinstance(obj, dict):
        return [(k, shape(v)) for k, v in obj.items() if k != "cached_tokens_per_tier"]
    if isinstance(obj, list):
        return [shape(v) for v in obj]
    return type(obj).__name__


def sse_frames(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]


@pytest.mark.slow
async def test_chat_frames_have_the_real_engines_fields_whole_and_streamed(sim):
    recorded = json.loads((GOLDEN_HTTP / "chat_nonstream_repeat_cached.json").read_text())
    real_stream = sse_frames((GOLDEN_HTTP / "sse_stream_first.sse").read_text())
    async with aiohttp.ClientSession() as http:
        async with http.post(sim + "/v1/chat/completions", json=recorded["request"]["json"]) as r:
            whole = await r.json()
        # The recorded stream: the same messages, five tokens, usage asked for.
        streamed = {**recorded["request"]["json"], "max_tokens": 5, "stream": True}
        streamed |= {"stream_options": {"include_usage": True}}
        async with http.post(sim + "/v1/chat/completions", json=streamed) as r:
            frames = sse_frames(await r.text())
    assert shape(whole) == shape(recorded["response"])
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{16}", whole["id"])
    assert re.fullmatch(r"vllm-0\.32\.0-[0-9a-f]{8}", whole["system_fingerprint"])
    assert [shape(f) for f in frames] == [shape(f) for f in real_stream]
    assert frames[-1]["system_fingerprint"] == whole["system_fingerprint"]


# --- logprobs and echo, in vLLM's shapes ------------------------------------------------------


@pytest.mark.slow
def test_chat_logprobs_list_each_token_then_its_top_alternatives_streamed_or_not(client):
    ask = {"model": "kvgate-tiny", "messages": CHAT_N, "max_tokens": 6, "logprobs": True, "top_logprobs": 3}
    whole = client.chat.completions.create(**ask, extra_body={"ignore_eos": True})
    content = whole.choices[0].logprobs.content
    assert len(content) == 6 and "".join(e.token for e in content) == whole.choices[0].message.content
    for e in content:
        assert e.logprob < 0 and e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 3 and (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    again = client.chat.completions.create(**ask, extra_body={"ignore_eos": True})
    assert again.choices[0].logprobs == whole.choices[0].logprobs  # a request asked twice, the same figures
    streamed = [
        e
        for c in client.chat.completions.create(**ask, stream=True, extra_body={"ignore_eos": True})
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert streamed == content
    plain = client.chat.completions.create(model="kvgate-tiny", messages=CHAT_N, max_tokens=2)
    assert plain.choices[0].logprobs is None  # not asked, not sent


@pytest.mark.slow
def test_completion_logprobs_and_echo(client, tok):
    prompt = "Echo this prompt back"
    out = client.completions.create(model="kvgate-tiny", prompt=prompt, max_tokens=5, logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) == 2 and top[t] == p for t, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    echoed = client.completions.create(model="kvgate-tiny", prompt=prompt, max_tokens=5, echo=True, logprobs=1)
    assert echoed.choices[0].text == prompt + out.choices[0].text
    prompt_ids = tok.encode(prompt)
    elp = echoed.choices[0].logprobs
    assert len(elp.tokens) == len(prompt_ids) + len(lp.tokens)
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None  # the prompt's first token has none
    # echo with max_tokens 0: the prompt and its logprobs only (lm-eval's loglikelihood requests).
    scored = client.completions.create(model="kvgate-tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == prompt and len(scored.choices[0].logprobs.tokens) == len(prompt_ids)
    # Streamed, the offsets run on from chunk to chunk: the same list as the whole answer's, though a stop
    # string (one that never matches) holds text back from chunk to chunk.
    chunks = client.completions.create(
        model="kvgate-tiny", prompt=prompt, max_tokens=5, logprobs=2, stream=True, stop=["never-in-an-answer"]
    )
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset
    streamed = list(client.completions.create(model="kvgate-tiny", prompt=prompt, max_tokens=5, echo=True, stream=True))
    assert streamed[0].choices[0].text.startswith(prompt)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.choices[0].text


@pytest.mark.slow
def test_chat_echo_starts_with_the_last_message_when_it_has_the_answers_role(client):
    # vLLM's chat echo: the last message's content before each choice's, when that message has the
    # answer's role: the assistant's, or the last message's own without a generation prompt.
    user_last = [{"role": "user", "content": "Say something"}]
    draft = [*user_last, {"role": "assistant", "content": "Here is"}]
    parts = [
        *user_last,
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    ask = {"model": "kvgate-tiny", "max_tokens": 4, "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(messages=user_last, **ask)
    same = client.chat.completions.create(
        messages=user_last, **{**ask, "extra_body": {"ignore_eos": True, "echo": True}}
    )
    assert same.choices[0].message.content == plain.choices[0].message.content  # the user's turn: not echoed
    cont = {"ignore_eos": True, "echo": True, "add_generation_prompt": False, "continue_final_message": True}
    whole = client.chat.completions.create(messages=draft, n=2, **{**ask, "extra_body": cont})
    raw = client.chat.completions.create(messages=draft, n=2, **{**ask, "extra_body": {**cont, "echo": False}})
    assert [c.message.role for c in whole.choices] == ["assistant", "assistant"]
    for echoed, bare in zip(whole.choices, raw.choices, strict=True):
        assert echoed.message.content == "Here is" + bare.message.content and bare.message.content
    assert whole.usage == raw.usage  # the echo is not counted
    joined = client.chat.completions.create(messages=parts, **{**ask, "extra_body": cont})
    assert joined.choices[0].message.content.startswith("a\nb")
    # Streamed, vLLM 0.32 fails: it builds the echo delta from the message's content as a list of parts,
    # which its delta refuses, so the stream carries that error after the role chunks, then [DONE]
    # (recorded: tests/fixtures/vllm-0.32/http/conformance.json, chat_echo_stream).
    seen = []
    with pytest.raises(openai.APIError, match="1 validation error for DeltaMessage"):
        for c in client.chat.completions.create(messages=draft, n=2, stream=True, **{**ask, "extra_body": cont}):
            seen.append((c.choices[0].index, c.choices[0].delta.role, c.choices[0].delta.content))
    assert seen == [(0, "assistant", ""), (1, "assistant", "")]
    # Without a generation prompt the answer takes the last message's role, and echoes it.
    ended_by_user = client.chat.completions.create(
        messages=user_last, **{**ask, "extra_body": {"ignore_eos": True, "echo": True, "add_generation_prompt": False}}
    )
    assert ended_by_user.choices[0].message.role == "user"
    assert ended_by_user.choices[0].message.content.startswith("Say something")


@pytest.mark.slow
async def test_prompt_logprobs_as_vllm_returns_them(sim, tok):
    prompt = "Score every token of this prompt"
    ids = tok.encode(prompt)
    async with aiohttp.ClientSession() as http:

        async def post(path: str, body: dict) -> dict:
            async with http.post(sim + path, json={"max_tokens": 2, **body}) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        scored = await post("/v1/completions", {"prompt": prompt, "prompt_logprobs": 2})
        plain = await post("/v1/completions", {"prompt": prompt})
        echoed = await post("/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 1})
        chat = {"messages": [{"role": "user", "content": prompt}]}
        chat_scored = await post("/v1/chat/completions", {**chat, "prompt_logprobs": 0})
        chat_plain = await post("/v1/chat/completions", chat)
        # An echo asks for them (chat: top_logprobs, 0 by default), but a stream never carries them.
        draft = [*chat["messages"], {"role": "assistant", "content": "Sure"}]
        cont = {"add_generation_prompt": False, "continue_final_message": True, "echo": True}
        chat_echoed = await post("/v1/chat/completions", {"messages": draft, **cont})
        async with http.post(
            sim + "/v1/completions", json={"prompt": prompt, "prompt_logprobs": 0, "stream": True}
        ) as r:
            assert r.status == 200 and "prompt_logprobs" not in await r.text()
    lists = scored["choices"][0]["prompt_logprobs"]
    assert len(lists) == len(ids) and lists[0] is None
    for token_id, entries in zip(ids[1:], lists[1:], strict=True):
        # The prompt's own token first (ranked), then the 2 most likely; ids as JSON keys.
        first, *rest = entries.items()
        assert first[0] == str(token_id) and first[1]["decoded_token"] == tok.decode([token_id])
        assert 1 <= len(entries) <= 3 and {e["rank"] for e in entries.values()} <= {1, 2}
        assert all(e["logprob"] < 0 for e in entries.values())
    assert plain["choices"][0]["prompt_logprobs"] is None and chat_plain["prompt_logprobs"] is None
    # The echoed prompt's logprobs are the same figures.
    echo_lists, shown = echoed["choices"][0]["prompt_logprobs"], echoed["choices"][0]["logprobs"]["token_logprobs"]
    assert [e[str(t)]["logprob"] for t, e in zip(ids[1:], echo_lists[1:])] == shown[1 : len(ids)]
    assert [e[str(t)]["logprob"] for t, e in zip(ids[1:], lists[1:])] == shown[1 : len(ids)]
    # Chat: at the top of the answer, one entry per position with 0 asked.
    rendered = chat_scored["prompt_logprobs"]
    assert len(rendered) == chat_scored["usage"]["prompt_tokens"] and rendered[0] is None
    assert all(len(e) == 1 and next(iter(e.values()))["rank"] == 1 for e in rendered[1:])
    assert len(chat_echoed["prompt_logprobs"]) == chat_echoed["usage"]["prompt_tokens"]


@pytest.mark.slow
async def test_return_token_ids_gives_the_answers_and_prompts_ids_whole_and_streamed(sim):
    prompt = "Give me the ids"
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 5, "ignore_eos": True}
    completion = {"prompt": prompt, "max_tokens": 5, "ignore_eos": True}
    async with aiohttp.ClientSession() as http:

        async def post(path: str, body: dict) -> dict:
            async with http.post(sim + path, json=body) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        async def stream(path: str, body: dict) -> list[dict]:
            async with http.post(sim + path, json={**body, "stream": True}) as r:
                return sse_frames(await r.text())

        whole = await post("/v1/chat/completions", {**chat, "return_token_ids": True})
        plain = await post("/v1/chat/completions", chat)
        frames = await stream("/v1/chat/completions", {**chat, "return_token_ids": True})
        text_whole = await post("/v1/completions", {**completion, "return_token_ids": True})
        text_frames = await stream("/v1/completions", {**completion, "return_token_ids": True})
        echoed = await post("/v1/completions", {**completion, "return_token_ids": True, "echo": True})
        echo_frames = await stream("/v1/completions", {**completion, "echo": True})
    choice = whole["choices"][0]
    assert len(choice["token_ids"]) == whole["usage"]["completion_tokens"] == 5
    assert len(whole["prompt_token_ids"]) == whole["usage"]["prompt_tokens"]
    assert plain["choices"][0]["token_ids"] is None and plain["prompt_token_ids"] is None
    # Streamed: the prompt's ids on the role chunk, each delta's ids on its chunk.
    assert frames[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert [t for f in frames[1:] if f["choices"] for t in f["choices"][0]["token_ids"]] == choice["token_ids"]
    # Completions: per choice; streamed, the prompt's ids on a choice's first chunk only.
    text_choice = text_whole["choices"][0]
    assert len(text_choice["prompt_token_ids"]) == text_whole["usage"]["prompt_tokens"]
    assert [f["choices"][0]["prompt_token_ids"] for f in text_frames] == [text_choice["prompt_token_ids"]] + [None] * 4
    assert [t for f in text_frames for t in f["choices"][0]["token_ids"]] == text_choice["token_ids"]
    # An echo with ids echoes the ids, not the text; an echoed stream sends the prompt's ids anyway (vLLM's).
    assert echoed["choices"][0]["text"] == text_choice["text"]
    assert echo_frames[0]["choices"][0]["text"].startswith(prompt)
    assert echo_frames[0]["choices"][0]["prompt_token_ids"] == text_choice["prompt_token_ids"]
    assert echo_frames[0]["choices"][0]["token_ids"] is None


@pytest.mark.slow
async def test_logprobs_tools_stops_and_formats_are_checked_as_vllm_checks_them(sim):
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    cases = [
        ("/v1/chat/completions", {**chat, "top_logprobs": 2}, "`logprobs` must be set to true"),
        ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": -2}, "must be a positive value or -1"),
        ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}, "greater than max allowed: 20"),
        ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": -1}, "greater than max allowed: 20"),
        ("/v1/chat/completions", {**chat, "tool_choice": "required"}, "`tools` must be set"),
        ("/v1/chat/completions", {**chat, "tools": []}, "`tools` must not be an empty array"),
        ("/v1/completions", {"prompt": "x", "logprobs": 50}, "Requested sample logprobs of 50"),
        (
            "/v1/completions",
            {"prompt": "x", "max_tokens": 0},
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        ),
        (
            "/v1/completions",
            {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
            "List should have at most 4 items after validation, not 5",
        ),
        ("/v1/chat/completions", {**chat, "user": 5}, "'loc': 'body.user', 'msg': 'Input should be a valid string'"),
        (
            "/v1/chat/completions",
            {**chat, "response_format": {"type": "bogus"}},
            "Input should be 'text', 'json_object' or 'json_schema'",
        ),
        ("/v1/chat/completions", {**chat, "prompt_logprobs": 1, "stream": True}, "not available when `stream=True`"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": -2}, "`prompt_logprobs` must be a positive value or -1"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, "Requested prompt logprobs of 21"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": -1}, "greater than max allowed: 20"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": "2"}, "`prompt_logprobs` must be an integer"),
    ]
    async with aiohttp.ClientSession() as http:
        for path, body, expected in cases:
            async with http.post(sim + path, json=body) as r:
                answer = await r.json()
                assert r.status == 400 and expected in answer["error"]["message"], (body, answer)


def _page(sim: str) -> str:
    import urllib.request

    with urllib.request.urlopen(sim + "/metrics") as r:
        return r.read().decode()


@pytest.mark.slow
def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])


# --- raw HTTP ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_models_health_and_metrics(sim):
    async with aiohttp.ClientSession() as http:
        async with http.get(sim + "/health") as r:
            assert r.status == 200
        async with http.get(sim + "/v1/models") as r:
            body = await r.json()
            assert body["object"] == "list" and body["data"][0]["id"] == "kvgate-tiny"
            assert body["data"][0]["max_model_len"] == MAX_MODEL_LEN
        async with http.post(sim + "/v1/completions", json={"prompt": list(range(10, 150)), "max_tokens": 2}) as r:
            assert r.status == 200
        async with http.get(sim + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    labels = {"model_name": "kvgate-tiny"}
    assert metric(text, "vllm:num_requests_running", **labels) == 0
    assert metric(text, "vllm:num_requests_waiting", **labels) == 0
    assert metric(text, "vllm:kv_cache_usage_perc", **labels) == 0
    assert metric(text, "vllm:prefix_cache_queries_total", **labels) >= 140
    assert metric(text, "vllm:prefix_cache_hits_total", **labels) >= 0


async def raw_post(sim: str, path: str, data: bytes | str | None = None, json=None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} if data is not None else None
    async with aiohttp.ClientSession() as http:
        async with http.post(sim + path, data=data, json=json, headers=headers) as r:
            assert r.content_type == "application/json"
            return r.status, await r.json()


LONG = list(range(1, MAX_MODEL_LEN + 1))  # fills the window: no room for one output token
# The first message type pydantic tries for a malformed message (vLLM names it in the error's place).
DEVELOPER = "body.messages.0.ChatCompletionDeveloperMessageParam"
# (path, body, status, param): vLLM 0.32's answers (tests/test_conformance.py holds the recorded ones);
# a param "body..." is its request model's (pydantic's) refusal, type "Bad Request".
BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, "body.1"),
    ("/v1/chat/completions", b"", 400, "body"),
    ("/v1/chat/completions", b"[1, 2]", 400, "body"),
    ("/v1/chat/completions", {"model": "kvgate-tiny"}, 400, "body.messages"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "body.messages"),
    ("/v1/chat/completions", {"messages": []}, 400, None),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, f"{DEVELOPER}.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, f"{DEVELOPER}.content"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, None),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"},
        400,
        "body.max_tokens",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "maybe"}, 400, "body.stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": 5}, 400, "body.stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * MAX_MODEL_LEN}]}, 400, "input_tokens"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": 42}, 400, "body.prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, None),
    ("/v1/completions", {"prompt": ["a", [1, 2]]}, 400, "body.prompt.0"),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, None),
    ("/v1/completions", {"prompt": [1, "x"]}, 400, "body.prompt.1"),
    ("/v1/completions", {"prompt": [10**9]}, 400, None),
    ("/v1/completions", {"prompt": LONG}, 400, None),
    ("/v1/completions", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "cache_salt": ""}, 400, "cache_salt"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "allowed_token_ids": [-1]},
        400,
        "allowed_token_ids",
    ),
    ("/v1/completions", {"prompt": "x", "cache_salt": 7}, 400, "body.cache_salt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "cache_salt": "a/b"}, 400, "cache_salt"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "cache_salt": "s" * 129},
        400,
        "cache_salt",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("path", "payload", "status", "param"), BAD_REQUESTS)
async def test_bad_input_gets_an_openai_error(sim, path, payload, status, param):
    if isinstance(payload, bytes):
        got, body = await raw_post(sim, path, data=payload)
    else:
        got, body = await raw_post(sim, path, json=payload)
    assert got == status
    err = body["error"]
    assert err["code"] == status and err["param"] == param
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    pydantic = param is not None and param.startswith("body")
    assert err["type"] == ("NotFoundError" if status == 404 else "Bad Request" if pydantic else "BadRequestError")


@pytest.mark.slow
async def test_engine_keeps_serving_after_bad_input(sim):
    for path, payload, _, _ in BAD_REQUESTS:
        if isinstance(payload, bytes):
            await raw_post(sim, path, data=payload)
        else:
            await raw_post(sim, path, json=payload)
    status, body = await raw_post(sim, "/v1/completions", json={"prompt": "still alive", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


async def test_a_body_not_sent_as_json_is_refused_as_vllm_refuses_it(sim):
    # vLLM 0.32 takes a generation request only with Content-Type application/json (validate_json_request):
    # no type, or any other one, is its 400 "Unsupported Media Type" (recorded: conformance.json).
    payload = json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).encode()
    cases = [
        ("text/plain", 400),
        ("application/x-www-form-urlencoded", 400),
        ("application/octet-stream", 400),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
        ("application/merge-patch+json", 400),
        (None, 400),
    ]
    async with aiohttp.ClientSession() as http:
        for content_type, status in cases:
            headers = {} if content_type is None else {"Content-Type": content_type}
            skip = ["Content-Type"] if content_type is None else []
            async with http.post(
                sim + "/v1/chat/completions", data=payload, headers=headers, skip_auto_headers=skip
            ) as r:
                body = await r.json()
                assert r.status == status, (content_type, body)
                if status == 400:
                    assert body["error"]["type"] == "Bad Request" and body["error"]["code"] == 400
                    assert "Unsupported Media Type: Only 'application/json' is allowed" in body["error"]["message"]


@pytest.mark.slow
async def test_unknown_route_and_method_are_fastapis_json_answers(sim):
    async with aiohttp.ClientSession() as http:
        async with http.get(sim + "/v2/nothing") as r:
            assert r.status == 404 and await r.json() == {"detail": "Not Found"}
        async with http.get(sim + "/v1/chat/completions") as r:
            assert r.status == 405 and await r.json() == {"detail": "Method Not Allowed"}


async def _metrics(http: aiohttp.ClientSession, sim: str) -> str:
    async with http.get(sim + "/metrics") as r:
        return await r.text()


def _aborted(text: str) -> float:
    if 'finished_reason="abort"' not in text:
        return 0.0
    return metric(text, "vllm:request_success_total", finished_reason="abort")


async def _wait_for_abort(http: aiohttp.ClientSession, sim: str, before: float) -> str:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        text = await _metrics(http, sim)
        if _aborted(text) > before:
            return text
        assert asyncio.get_running_loop().time() < deadline, text
        await asyncio.sleep(0.02)


LONG_ANSWER = {"prompt": list(range(2000, 2010)), "max_tokens": 2000, "ignore_eos": True}


@pytest.mark.slow
async def test_client_disconnect_mid_stream_aborts_and_frees_blocks(sim):
    async with aiohttp.ClientSession() as http:
        before = _aborted(await _metrics(http, sim))
        async with http.post(sim + "/v1/completions", json={**LONG_ANSWER, "stream": True}) as r:
            for _ in range(3):
                assert (await r.content.readline()).startswith(b"data: ")
                await r.content.readline()
            r.connection.transport.abort()  # hang up mid-stream
        text = await _wait_for_abort(http, sim, before)
    assert metric(text, "vllm:num_requests_running") == 0
    assert metric(text, "vllm:kv_cache_usage_perc") == 0


@pytest.mark.slow
async def test_client_disconnect_while_waiting_for_a_whole_answer_aborts(sim):
    async with aiohttp.ClientSession() as http:
        before = _aborted(await _metrics(http, sim))
        for _ in range(20):  # until the hang-up lands while the request is still running
            async with aiohttp.ClientSession() as caller:
                job = asyncio.ensure_future(caller.post(sim + "/v1/completions", json=LONG_ANSWER))
                while not job.done() and metric(await _metrics(http, sim), "vllm:num_requests_running") == 0:
                    pass
                if job.done():
                    (await job).release()
                    continue
                job.cancel()  # the client gives up: its connection closes
                break
        else:
            pytest.fail("every request finished before the client could hang up")
        text = await _wait_for_abort(http, sim, before)
    assert metric(text, "vllm:num_requests_running") == 0
    assert metric(text, "vllm:kv_cache_usage_perc") == 0


@pytest.mark.slow
async def test_reset_prefix_cache_forgets_cached_prompts(sim):
    prompt = {"prompt": list(range(3000, 3200)), "max_tokens": 1}
    await raw_post(sim, "/v1/completions", json=prompt)
    _, warm = await raw_post(sim, "/v1/completions", json=prompt)
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 192
    async with aiohttp.ClientSession() as http:
        async with http.post(sim + "/reset_prefix_cache") as r:
            assert r.status == 200
    _, cold = await raw_post(sim, "/v1/completions", json=prompt)
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


# --- CLI ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_help_documents_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "kvgate.worker.sim", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0
    flags = [opt for action in parser()._actions for opt in action.option_strings if opt.startswith("--")]
    assert {
        "--kv-events-endpoint",
        "--kv-events-replay-endpoint",
        "--event-encoding",
        "--speedup-ratio",
        "--num-gpu-blocks",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--block-size",
        "--seed",
    } <= set(flags)
    for action in parser()._actions:
        assert action.help, action.option_strings
    for flag in flags:
        assert flag in out.stdout


@pytest.mark.slow
def test_impossible_config_exits_with_a_clear_message():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvgate.worker.sim",
            "--model-dir",
            str(TINY_MODEL),
            "--block-size",
            "16",
            "--num-gpu-blocks",
            "4",
            "--max-model-len",
            "100",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 2 and "max_model_len 100 exceeds the KV cache capacity" in out.stderr


def test_cli_args_round_trip_the_config():
    config = replace(CONFIG, served_model_name="x", port=1234)
    from kvgate.worker.sim.__main__ import config_from_args

    assert config_from_args(parser().parse_args(config.cli_args())) == config


def test_a_chat_streams_first_byte_comes_with_the_first_token_as_in_vllm(tmp_path):
    """vLLM 0.32 yields a chat stream's role chunk inside its loop over engine outputs, so
    the first byte of the stream times the first token (prefill included), as a gateway
    measuring time to first byte relies on."""
    slow = replace(CONFIG, engine=replace(CONFIG.engine, speedup_ratio=0.25))
    proc, base = start_sim(slow, tmp_path)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        prompt = " ".join(f"word{i}" for i in range(250))  # ~1k tokens: prefill ~ (16.5 + 15) ms / 0.25
        started = time.perf_counter()
        stream = client.chat.completions.create(
            model="kvgate-tiny", messages=[{"role": "user", "content": prompt}], max_tokens=2, stream=True
        )
        first = next(iter(stream))
        waited = time.perf_counter() - started
        rest = list(stream)
        assert first.choices[0].delta.role == "assistant"
        assert waited >= 0.1, waited  # one prefill step at a quarter speed, not the request's arrival
        assert any(c.choices and c.choices[0].delta.content for c in rest)
    finally:
        proc.stop()


# --- rendering options, as vLLM and the gateway render them -------------------------------------------


def test_the_sim_renders_template_options_as_the_gateway_does():
    """continue_final_message, chat_template_kwargs and a trusted request template reach the worker's render,
    which gives the gateway's ids; an untrusted request template is vLLM's 400 at both."""
    from kvgate.gateway.tokenization import Preprocessor, TokenizerError
    from kvgate.worker.sim.prompt import PromptRenderer
    from kvgate.worker.sim.protocol import ApiError, parse_chat

    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{{ tail | default('') }}"
    turns = [{"role": "user", "content": "Why page the KV cache?"}, {"role": "assistant", "content": "Because"}]
    cases = [
        {"add_generation_prompt": False, "continue_final_message": True},
        {"chat_template_kwargs": {"add_generation_prompt": False}},
        {"chat_template": template, "chat_template_kwargs": {"tail": "!"}},
        {"chat_template_kwargs": {"chat_template": template}},
    ]
    renderer = PromptRenderer.from_dir(TINY_MODEL)
    with (
        Preprocessor.load(str(TINY_MODEL)) as untrusted,
        Preprocessor.load(str(TINY_MODEL), trust_request_chat_template=True) as trusted,
    ):
        for options in cases:
            params = parse_chat({"messages": turns, **options})
            has_template = "chat_template" in options or "chat_template" in options.get("chat_template_kwargs", {})
            renderer.trust_request_chat_template = False
            if has_template:
                with pytest.raises(ApiError, match="--trust-request-chat-template is not set") as refused:
                    renderer.token_ids(params)
                assert refused.value.status == 400
                with pytest.raises(TokenizerError, match="--trust-request-chat-template is not set"):
                    untrusted.encode_chat(turns, **options)
                renderer.trust_request_chat_template = True
            expected = trusted.encode_chat(turns, **options)
            assert renderer.token_ids(params) == expected, options
            assert expected != untrusted.encode_chat(turns[:1]), options  # the options changed the render
    with pytest.raises(ApiError, match="Cannot set both"):
        parse_chat({"messages": turns, "continue_final_message": True})


# --- vLLM 0.32's sampling checks ---------------------------------------------------------------------

# Each is a 400 at vLLM 0.32 (SamplingParams._verify_args, the request models' types and validators);
# the simulator must refuse it too rather than answer 200. (fields, param, what the message says)
VLLM_SAMPLING_REFUSALS = [
    ({"presence_penalty": 5}, None, "presence_penalty must be in [-2, 2], got 5.0."),
    ({"frequency_penalty": -2.5}, None, "frequency_penalty must be in [-2, 2], got -2.5."),
    ({"repetition_penalty": 0}, None, "repetition_penalty must be greater than zero, got 0.0."),
    ({"temperature": 2.5}, "temperature", "temperature must be in [0, 2], got 2.5."),
    ({"top_k": -5}, None, "top_k must be 0 (disable), or at least 1, got -5."),
    ({"top_k": 1.5}, "body.top_k", "Input should be a valid integer, got a number with a fractional part"),
    ({"min_p": 2}, None, "min_p must be in [0, 1], got 2.0."),
    ({"min_tokens": -1}, None, "min_tokens must be greater than or equal to 0, got -1."),
    ({"min_tokens": 10, "max_tokens": 2}, None, "min_tokens must be less than or equal to max_tokens=2, got 10."),
    ({"priority": "high"}, "body.priority", "unable to parse string as an integer"),
    # pydantic's own bound (recorded: chat_truncate_below_minus_1 in the conformance cases)
    ({"truncate_prompt_tokens": -5}, "body.truncate_prompt_tokens", "greater than or equal to -1"),
    ({"stop_token_ids": ["a"]}, "body.stop_token_ids.0", "Input should be a valid integer"),
    ({"bad_words": [""]}, None, "bad_words cannot contain an empty string"),
    ({"logit_bias": {"a": 1}}, "logit_bias", "cannot be converted to integer token IDs: ['a']"),
    ({"logit_bias": [1, 2]}, "body.logit_bias", "Input should be a valid dictionary"),
    ({"allowed_token_ids": []}, "allowed_token_ids", "allowed_token_ids is not None and empty!"),
    ({"skip_special_tokens": "x"}, "body.skip_special_tokens", "Input should be a valid boolean"),
    ({"kv_transfer_params": "x"}, "body.kv_transfer_params", "Input should be a valid dictionary"),
    ({"documents": "x"}, "body.documents", "Input should be a valid list"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort", "must be one of"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "the 'json_schema' field must be provided"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "Stream options can only be defined when"),
    (
        {"tool_choice": "bogus", "tools": [{"type": "function", "function": {"name": "f"}}]},
        "tool_choice",
        "Invalid value",
    ),
    (
        {"tool_choice": {"type": "function", "function": {"name": "g"}}, "tools": [{"function": {"name": "f"}}]},
        "tool_choice",
        "does not match any of the specified `tools`",
    ),
    ({"tool_choice": {"type": "function"}, "tools": [{"function": {"name": "f"}}]}, "tool_choice.function", "Invalid"),
]


@pytest.mark.parametrize(("fields", "param", "message"), VLLM_SAMPLING_REFUSALS)
def test_the_sim_refuses_what_vllm_refuses(fields, param, message) -> None:
    from kvgate.worker.sim.protocol import ApiError, parse_chat, parse_completion

    turns = [{"role": "user", "content": "x"}]
    with pytest.raises(ApiError) as refused:
        parse_chat({"messages": turns, **fields})
    assert refused.value.status == 400 and refused.value.param == param
    assert message in refused.value.message
    if not {"documents", "reasoning_effort", "tool_choice"} & fields.keys():  # chat-only fields
        with pytest.raises(ApiError):
            parse_completion({"prompt": "x", **fields})


def test_the_sim_takes_what_vllm_takes() -> None:
    """The edges of those ranges, and the fields vLLM 0.32 accepts with them."""
    from kvgate.worker.sim.protocol import parse_chat

    tool = {"type": "function", "function": {"name": "f"}}
    accepted = [
        {"presence_penalty": -2, "frequency_penalty": 2.0, "repetition_penalty": 1.1, "temperature": 2},
        {"top_k": -1, "min_p": 0, "min_tokens": 4, "max_tokens": 4, "priority": -3, "truncate_prompt_tokens": -1},
        {"logit_bias": {"5": -100, "7": 2.5}, "allowed_token_ids": [1, 2], "stop_token_ids": [3], "bad_words": ["x"]},
        {"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "f"}}},
        {"tools": [tool], "tool_choice": "none", "reasoning_effort": "high", "documents": [{"title": "t"}]},
        {"stream_options": {}, "kv_transfer_params": None, "response_format": {"type": "json_object"}},
    ]
    for fields in accepted:
        params = parse_chat({"messages": [{"role": "user", "content": "x"}], **fields})
        assert params.kind == "chat", fields
    ids = parse_chat({"messages": [{"role": "user", "content": "x"}], **accepted[2]}).vocabulary_ids
    assert ids == (("logit_bias", (5, 7)), ("allowed_token_ids", (1, 2)))
