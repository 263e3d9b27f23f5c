"""Reading usage from a relayed SSE tail."""

from __future__ import annotations

from kvgate.gateway.relay import Exchange, usage_from_sse


def sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


def test_usage_from_the_final_chunk() -> None:
    tail = sse(
        '{"choices":[{"delta":{"content":"a"}}],"usage":null}',
        '{"choices":[],"usage":{"prompt_tokens":130,"completion_tokens":2,'
        '"prompt_tokens_details":{"cached_tokens":128}}}',
        "[DONE]",
    )
    exchange = Exchange(0.0)
    exchange.read_usage(usage_from_sse(tail))
    assert exchange.cached_tokens == 128


def test_usage_absent_null_or_cut() -> None:
    assert usage_from_sse(sse('{"choices":[],"usage":null}', "[DONE]")) is None
    assert usage_from_sse(sse("[DONE]")) is None
    # The tail may start mid-event: the broken first line is skipped, not fatal.
    assert usage_from_sse(b'ns":[],"usage":{"prompt_tokens":1}}\n\n' + sse("[DONE]")) is None
    continuous = sse(
        '{"usage":{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":1}}}',
        '{"usage":{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":4}}}',
    )
    assert usage_from_sse(continuous)["prompt_tokens_details"]["cached_tokens"] == 4


def test_exchange_ignores_malformed_usage() -> None:
    exchange = Exchange(0.0)
    exchange.read_usage({"prompt_tokens": "many", "prompt_tokens_details": None})
    assert exchange.cached_tokens is None
