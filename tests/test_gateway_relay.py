"""Reading usage from a relayed SSE tail, and engine load from a worker's /metrics text."""

from __future__ import annotations

from kvgate.gateway.fleet import parse_engine_load
from kvgate.gateway.relay import Exchange, usage_from_sse


def sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


def test_usage_from_the_final_chunk() -> None:
    tail = sse('{"choices":[{"delta":{"content":"a"}}],"usage":null}',
               '{"choices":[],"usage":{"prompt_tokens":130,"completion_tokens":2,'
               '"prompt_tokens_details":{"cached_tokens":128}}}',
               "[DONE]")
    exchange = Exchange(0.0)
    exchange.read_usage(usage_from_sse(tail))
    assert exchange.cached_tokens == 128


def test_usage_absent_null_or_cut() -> None:
    assert usage_from_sse(sse('{"choices":[],"usage":null}', "[DONE]")) is None
    assert usage_from_sse(sse("[DONE]")) is None
    # The tail may start mid-event: the broken first line is skipped, not fatal.
    assert usage_from_sse(b'ns":[],"usage":{"prompt_tokens":1}}\n\n' + sse("[DONE]")) is None
    continuous = sse('{"usage":{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":1}}}',
                     '{"usage":{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":4}}}')
    assert usage_from_sse(continuous)["prompt_tokens_details"]["cached_tokens"] == 4


def test_exchange_ignores_malformed_usage() -> None:
    exchange = Exchange(0.0)
    exchange.read_usage({"prompt_tokens": "many", "prompt_tokens_details": None})
    assert exchange.cached_tokens is None


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0
"""


def test_engine_load_per_dp_rank() -> None:
    assert parse_engine_load(VLLM_METRICS, dp_size=2) == {0: (3, 2, 0.25), 1: (1, 0, 0.5)}
    # Ranks the worker does not have are ignored.
    assert parse_engine_load(VLLM_METRICS, dp_size=1) == {0: (3, 2, 0.25)}


def test_engine_load_older_vllm_names_and_gaps() -> None:
    older = ("vllm:num_requests_running 1\nvllm:num_requests_waiting 4\nvllm:gpu_cache_usage_perc 0.75\n")
    assert parse_engine_load(older, 1) == {0: (1, 4, 0.75)}
    assert parse_engine_load("vllm:num_requests_running 1\n", 1) == {}
    assert parse_engine_load("", 1) == {}
