"""Relaying a worker's answer to the client, byte for byte, while measuring it.

``relay`` copies an opened upstream response to the client: an SSE stream chunk by
chunk as the bytes arrive (never parsed on the hot path; an event cut across two reads
is held until its end arrives, so the client only ever gets whole events), any other
body in one piece. After the first events a stream is piped: each piece is written to
the client from the worker connection's ``data_received`` (``UpstreamResponse.pipe``), no
task switch per token; a client that falls behind pauses reading from the worker until it
drains. A worker failing mid-stream ends the stream as vLLM ends one that
fails: an error event, ``data: {"error": {...}}`` naming the worker by id (never its
address), then ``data: [DONE]``. Along the way it records first/last byte times and inter-chunk gaps
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
from aiohttp import HttpVersion11, web

from kvgate.gateway.errors import WORKER_HEADER
from kvgate.gateway.upstream import UpstreamFailure, UpstreamResponse, response_headers

# The usage chunk and `data: [DONE]` are small; the last few reads always hold them whole.
_TAIL_CHUNKS = 4
# The blank line that ends an SSE event, in each of the line endings the format allows.
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


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
    prompt_tokens: int | None = None
    upstream_error: str | None = None

    def read_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens")
        if type(prompt) is int:
            self.prompt_tokens = prompt
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
    if upstream.streamed:
        return await _relay_stream(request, upstream, worker, headers, exchange, on_first_byte, on_gap)
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
    worker: str,
    headers: Any,
    exchange: Exchange,
    on_first_byte: Callable[[], object],
    on_gap: Callable[[float], None],
) -> web.StreamResponse:
    exchange.streamed = True
    response = web.StreamResponse(status=upstream.status, headers=headers)
    # With no length, aiohttp frames the body in chunks for an HTTP/1.1 client, so that every event is
    # sent at once; an HTTP/1.0 client (no chunked framing there) gets the events as they are and the
    # connection's close as the end, as vLLM's server answers it.
    chunked = request.version >= HttpVersion11
    try:
        await response.prepare(request)
    except ConnectionError:
        raise ClientGone() from None
    stream = _Stream(upstream, on_gap, chunked)
    try:
        # The first events go through aiohttp's writer, which sends the response head with them;
        # the rest is piped: written from the worker connection's data_received, with no task
        # switch per chunk (``_Stream.sink``).
        first = b""
        while not first:
            chunk = await upstream.next_chunk()
            if chunk is None:
                break
            arrived_first = stream.previous is None
            first = stream.events(chunk)
            if arrived_first:
                exchange.first_byte = stream.previous
                on_first_byte()
        if first:
            await _write(response, first)
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ClientGone()
            stream.transport = transport
            await upstream.pipe(stream.sink, request.writer.drain)
            if stream.gone:
                raise ClientGone()
        exchange.complete = True
        if stream.pending:
            # A stream that ends without a blank line: the client gets exactly what the worker sent.
            stream.tail.append(stream.pending)
            await _write(response, stream.pending)
    except UpstreamFailure as err:
        # Headers are out: what is left is vLLM's way of failing a stream, an error event
        # then [DONE] (the OpenAI SDK raises APIError on the event).
        exchange.upstream_error = f"worker {worker} failed mid-stream: {err.detail}"
        error = {
            "error": {
                "message": f"{err.public(worker)} mid-stream",
                "type": "upstream_error",
                "param": None,
                "code": 504 if err.kind == "timeout" else 502,
            }
        }
        await _write(response, b"data: " + orjson.dumps(error) + b"\n\ndata: [DONE]\n\n")
    except ConnectionError:
        raise ClientGone() from None  # the client left while the pipe waited for it to drain
    exchange.last_byte = stream.previous
    if exchange.complete:
        exchange.read_usage(usage_from_sse(b"".join(stream.tail)))
    try:
        await response.write_eof()
    except ConnectionError:
        raise ClientGone() from None
    return response


# Past this much unsent to a slow client, reading from the worker pauses until the client drains.
_CLIENT_HIGH_WATER = 256 * 1024


class _Stream:
    """One streamed answer's relay state: whole SSE events out, the last few kept for ``usage``,
    inter-chunk gaps timed."""

    __slots__ = ("chunked", "gone", "on_gap", "pending", "previous", "tail", "transport", "upstream")

    def __init__(self, upstream: UpstreamResponse, on_gap: Callable[[float], None], chunked: bool = True) -> None:
        self.upstream = upstream
        self.chunked = chunked
        self.on_gap = on_gap
        self.tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
        self.previous: float | None = None
        # The start of an event whose end has not arrived yet (almost always empty: workers
        # write whole events). Sent with its end, or dropped if the worker fails before it.
        self.pending = b""
        self.transport: Any = None
        self.gone = False

    def events(self, chunk: bytes) -> bytes:
        """What of ``chunk`` (after what is pending) ends whole events, to send now."""
        now = time.perf_counter()
        if self.previous is not None:
            self.on_gap(now - self.previous)
        self.previous = now
        if self.pending:
            chunk, self.pending = self.pending + chunk, b""
        if not chunk.endswith(_EVENT_ENDS):
            cut = max(chunk.rfind(end) + len(end) if end in chunk else 0 for end in _EVENT_ENDS)
            chunk, self.pending = chunk[:cut], chunk[cut:]
            if not chunk:
                return b""
        self.tail.append(chunk)
        return chunk

    def sink(self, chunk: bytes) -> None:
        """Called from the worker connection's data_received: never raises."""
        if self.gone:
            return
        data = self.events(chunk)
        if not data:
            return
        transport = self.transport
        if transport.is_closing():
            self.gone = True
            self.upstream.abort()
            return
        # HTTP/1.1 chunked framing, as aiohttp's writer frames the first events.
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if transport.get_write_buffer_size() > _CLIENT_HIGH_WATER:
            self.upstream.hold()


async def _write(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionError:
        raise ClientGone() from None


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
