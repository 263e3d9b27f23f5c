"""Relaying a worker's answer to the client, byte for byte, while measuring it.

``relay`` copies an opened upstream response to the client: an SSE stream chunk by
chunk as the bytes arrive (never re-framed, never parsed on the hot path), any other
body in one piece. Along the way it records first/last byte times and inter-chunk gaps
and, once the answer is complete, reads ``usage`` (prompt and cached tokens) from the
body or from the tail of the stream, so the bytes the client gets are exactly the
worker's. It never decides where a request goes and never retries: once a byte is
relayed the answer belongs to that worker.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from kvgate.gateway.errors import WORKER_HEADER
from kvgate.gateway.upstream import UpstreamFailure, UpstreamResponse, response_headers

# The usage chunk and `data: [DONE]` are small; the last few reads always hold them whole.
_TAIL_CHUNKS = 4


class ClientGone(Exception):
    """The client disconnected while the answer was being relayed."""


@dataclass(slots=True)
class Exchange:
    """What one relayed answer looked like, for metrics."""

    started: float
    streamed: bool = False
    first_byte: float | None = None
    last_byte: float | None = None
    complete: bool = False
    cached_tokens: int | None = None
    upstream_error: str | None = None

    def read_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if type(cached) is int:
            self.cached_tokens = cached


async def relay(
    request: web.Request,
    upstream: UpstreamResponse,
    worker: str,
    exchange: Exchange,
    on_first_byte: Callable[[], object],
    on_gap: Callable[[float], None],
) -> web.StreamResponse:
    headers = response_headers(upstream.headers)
    headers[WORKER_HEADER] = worker
    if upstream.content_type == "text/event-stream":
        return await _relay_stream(request, upstream, headers, exchange, on_first_byte, on_gap)
    return await _relay_body(upstream, headers, exchange, on_first_byte)


async def _relay_body(
    upstream: UpstreamResponse, headers: Any, exchange: Exchange, on_first_byte: Callable[[], object]
) -> web.Response:
    body = await upstream.read()
    now = time.perf_counter()
    exchange.first_byte = exchange.last_byte = now
    exchange.complete = True
    on_first_byte()
    if upstream.status == 200 and upstream.content_type == "application/json":
        try:
            exchange.read_usage(orjson.loads(body).get("usage"))
        except (orjson.JSONDecodeError, AttributeError):
            pass
    return web.Response(status=upstream.status, body=body, headers=headers)


async def _relay_stream(
    request: web.Request,
    upstream: UpstreamResponse,
    headers: Any,
    exchange: Exchange,
    on_first_byte: Callable[[], object],
    on_gap: Callable[[float], None],
) -> web.StreamResponse:
    exchange.streamed = True
    response = web.StreamResponse(status=upstream.status, headers=headers)
    # The worker's stream may be long-lived; the client must see every chunk at once.
    response.enable_chunked_encoding()
    try:
        await response.prepare(request)
    except ConnectionError:
        raise ClientGone() from None
    tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
    previous: float | None = None
    perf = time.perf_counter
    try:
        async for chunk in upstream.iter_chunks():
            now = perf()
            if previous is None:
                exchange.first_byte = now
                on_first_byte()
            else:
                on_gap(now - previous)
            previous = now
            tail.append(chunk)
            try:
                await response.write(chunk)
            except ConnectionError:
                raise ClientGone() from None
        exchange.complete = True
    except UpstreamFailure as err:
        # Headers are out: the only honest way left to fail is an SSE error event.
        exchange.upstream_error = f"worker {worker_of(headers)} failed mid-stream: {err.detail}"
        error = {
            "error": {
                "message": exchange.upstream_error,
                "type": "upstream_error",
                "param": None,
                "code": 504 if err.kind == "timeout" else 502,
            }
        }
        try:
            await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
        except ConnectionError:
            raise ClientGone() from None
    exchange.last_byte = previous
    if exchange.complete:
        exchange.read_usage(usage_from_sse(b"".join(tail)))
    try:
        await response.write_eof()
    except ConnectionError:
        raise ClientGone() from None
    return response


def worker_of(headers: Any) -> str:
    return headers.get(WORKER_HEADER, "?")


def usage_from_sse(tail: bytes) -> Any:
    """The ``usage`` object of the last SSE event that has one (None if absent)."""
    at = tail.rfind(b'"usage"')
    while at >= 0:
        start = tail.rfind(b"data:", 0, at)
        end = tail.find(b"\n", at)
        if start < 0:
            return None
        line = tail[start + 5 : end if end >= 0 else len(tail)]
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            at = tail.rfind(b'"usage"', 0, start)
            continue
        usage = event.get("usage") if isinstance(event, dict) else None
        if usage is not None:
            return usage
        at = tail.rfind(b'"usage"', 0, start)
    return None
