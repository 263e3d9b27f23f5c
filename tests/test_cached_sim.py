"""kvgate.dev.cached_sim: the simulated worker with prompts encoded through the gateway's prefix cache gives
the ids of a whole encode (which kvgate.worker.sim and vLLM use), and really encodes only what is new."""

from __future__ import annotations

import random

import aiohttp
import pytest

from kvgate.dev.cached_sim import load_preprocessor, renderer_over
from kvgate.dev.launch import free_port
from kvgate.worker.sim.prompt import PromptRenderer
from kvgate.worker.sim.protocol import parse_chat
from tests.helpers import TINY_MODEL, python_module, wait_http
from tests.test_tokenization_incremental import model_dir

WORDS = ["alpha", "beta's", "  gamma", "\n\n", "12345", "δέλτα", "東京", " -- ", "x" * 40, "émoji 🙂", "\t", "end."]


def conversation(rng: random.Random, turns: int) -> list[list[dict[str, str]]]:
    """Each turn's messages: the previous turn's, an assistant answer and a new user message."""
    messages = [{"role": "system", "content": " ".join(rng.choices(WORDS, k=200))}]
    out = []
    for _ in range(turns):
        messages = [*messages, {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 60)))}]
        out.append(messages)
        messages = [*messages, {"role": "assistant", "content": "".join(rng.choices(WORDS, k=rng.randint(1, 30)))}]
    return out


@pytest.mark.parametrize("name", ["kvgate-tiny", "deepseek_v3", "llama3", "gemma3"])
def test_cached_ids_equal_whole_encodes_and_reuse_the_previous_turn(name):
    directory = TINY_MODEL if name == "kvgate-tiny" else model_dir(name)
    pre = load_preprocessor(directory)
    cached, whole = renderer_over(pre), PromptRenderer.from_dir(directory)
    rng = random.Random(7)
    for _ in range(4):
        for messages in conversation(rng, 5):
            params = parse_chat({"messages": messages, "max_tokens": 4})
            assert cached.token_ids(params) == whole.token_ids(params)
    info = pre.incremental_info()
    if name == "gemma3":  # BPE over whole segments: no prefix cache (the segment cache encodes instead)
        assert not info.enabled and pre.segment_cache_info().hits > 0
        return
    assert info.enabled, info.reason
    # Every turn after a conversation's first extends a cached prompt: 4 conversations x 4 later turns.
    assert info.incremental >= 16, info
    assert info.reused_tokens > info.encoded_chars / 10, info


async def test_the_cached_worker_serves_what_the_whole_encoding_worker_serves(tmp_path):
    """Both workers, as processes, report the same prompt_tokens for every turn of a conversation."""
    procs, bases = [], []
    try:
        for module in ("kvgate.dev.cached_sim", "kvgate.worker.sim"):
            port = free_port()
            args = ["--model-dir", TINY_MODEL, "--port", port, "--speedup-ratio", 1000, "--max-model-len", 4096]
            procs.append(python_module(module, *args, log_path=tmp_path / f"{module}.log"))
            bases.append(f"http://127.0.0.1:{port}")
        for proc, base in zip(procs, bases, strict=True):
            wait_http(base + "/health", timeout=60, proc=proc)
        rng = random.Random(3)
        async with aiohttp.ClientSession() as http:
            for messages in conversation(rng, 4):
                counts = []
                for base in bases:
                    body = {"messages": messages, "max_tokens": 2}
                    async with http.post(base + "/v1/chat/completions", json=body) as resp:
                        assert resp.status == 200, await resp.text()
                        counts.append((await resp.json())["usage"]["prompt_tokens"])
                assert counts[0] == counts[1]
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.log_path.read_text()
