"""Bad input at the gateway's port, in-process: every refusal is OpenAI-style JSON with the right
status, no worker address or library version leaks, slow or surplus connections are cut off,
and a big conversation neither stalls the event loop nor gets through past ``max_messages``.

The gateway runs on its real server (``server.GatewayRunner``) on a free loopback port in
front of a scripted worker served from the same event loop; raw-socket tests send the
exact bytes a misbehaving client would.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aiohttp.http_parser
import openai
import orjson
import pytest
from aiohttp import web

from kvgate.dev.launch import free_port
from kvgate.gateway.app import CHAT, GATEWAY_KEY, build_app
from kvgate.gateway.config import GatewayConfig
from kvgate.gateway.server import GatewayRunner, GatewayServer, ServerLimits
from tests.helpers import TINY_MODEL, until

MESSAGES = [{"role": "user", "content": "hi"}]
EVENT = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'


FLOOD_EVENTS = 4000


def flood_event(i: int) -> bytes:
    return b'data: {"i":%d,"pad":"%s"}\n\n' % (i, b"x" * 1000)


@dataclass
class ScriptedWorker:
    """A worker whose chat answer is chosen per test: ok, 500, silent, or dying mid-stream."""

    mode: str = "ok"
    port: int = field(default_factory=free_port)
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self.empty)
        app.router.add_get("/metrics", self.empty)
        app.router.add_post(CHAT, self.chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    async def empty(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if self.mode == "500":
            return web.Response(status=500, text="engine error")
        if self.mode == "silent":
            await asyncio.sleep(5)
        if self.mode == "flood":
            # 4 MB of events, written as fast as the gateway reads them.
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(FLOOD_EVENTS):
                await response.write(flood_event(i))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        if self.mode in ("die", "die-mid-event"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(EVENT)
            if self.mode == "die-mid-event":
                await response.write(EVENT[:30])
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            return response
        return web.json_response(
            {"id": "c", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1}},
            headers={"Server": "uvicorn"},
        )


@dataclass
class Stack:
    worker: ScriptedWorker
    port: int
    app: web.Application
    runner: GatewayRunner

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, status: str, worker: str = "none") -> float:
        registry = self.app[GATEWAY_KEY].metrics.registry
        found = registry.get_sample_value("kvgate_requests_total", {"route": CHAT, "status": status, "worker": worker})
        return found or 0.0


async def start_stack(**options: Any) -> Stack:
    worker = ScriptedWorker()
    await worker.start()
    port = free_port()
    config = GatewayConfig(
        port=port,
        model=str(TINY_MODEL),
        workers=[{"id": "w0", "url": worker.url}],
        health_interval=0.2,
        load_interval=10.0,
        **options,
    )
    app = build_app(config)
    runner = GatewayRunner(app, ServerLimits.from_config(config), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    gateway = app[GATEWAY_KEY]
    await until(lambda: gateway.fleet.up.get("w0"), "the scripted worker to be up")
    return Stack(worker, port, app, runner)


@pytest.fixture
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    options = getattr(request, "param", {})
    built = await start_stack(**options)
    try:
        yield built
    finally:
        await built.runner.cleanup()
        await built.worker.stop()


async def post(
    url: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(
            url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
        ) as response:
            return response.status, dict(response.headers), await response.read()


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the gateway closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def split(answer: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, orjson.loads(body)


# -- 1. Content-Encoding --------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
async def test_a_body_that_is_not_what_content_encoding_says_is_a_400(stack: Stack, encoding: str) -> None:
    status, headers, body = await post(
        stack.url + CHAT, {"messages": MESSAGES}, {"Content-Encoding": encoding, "Accept-Encoding": "identity"}
    )
    assert status == 400, body
    error = orjson.loads(body)["error"]
    assert error["code"] == "invalid_body" and encoding in error["message"]
    assert headers["x-kvgate-worker"] == "none"
    assert stack.metric("400") == 1 and stack.metric("500") == 0
    assert not stack.worker.bodies


async def test_a_broken_body_closes_its_connection_so_a_pooled_client_goes_on(stack: Stack) -> None:
    # The rest of a body that cannot be decoded is not a request: the 400 says Connection: close, so
    # a client pooling connections (the OpenAI SDK, aiohttp) opens a new one for its next request
    # instead of writing it into a connection the gateway is closing.
    plain = orjson.dumps({"messages": MESSAGES, "max_tokens": 4})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for encoding in ("br", "gzip", None):
            headers = {"Content-Type": "application/json"}
            if encoding:
                headers["Content-Encoding"] = encoding
            async with session.post(stack.url + CHAT, data=plain, headers=headers) as response:
                await response.read()
                if encoding:
                    assert response.status == 400 and response.headers["Connection"] == "close"
                else:
                    assert response.status == 200
    assert stack.worker.bodies == [plain]


# -- Content-Type ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/merge-patch+json",
    ],
)
async def test_a_body_not_sent_as_json_is_vllms_400_and_the_connection_goes_on(
    stack: Stack, content_type: str | None
) -> None:
    # vLLM 0.32 takes a generation request only with Content-Type application/json (none at all, or a
    # +json type, is its 400 too; curl -d without -H 'Content-Type: application/json' sends a form type),
    # so the gateway refuses the rest as vLLM would, before routing; the body was read, so a pooled
    # connection serves the next request.
    plain = orjson.dumps({"messages": MESSAGES, "max_tokens": 4})
    headers = {} if content_type is None else {"Content-Type": content_type}
    skip = ["Content-Type"] if content_type is None else []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        async with session.post(stack.url + CHAT, data=plain, headers=headers, skip_auto_headers=skip) as response:
            assert response.status == 400
            error = (await response.json())["error"]
            assert error["type"] == "invalid_request_error"
            assert "Content-Type: application/json" in error["message"]
            assert (repr(content_type) if content_type else "no Content-Type") in error["message"]
            assert response.headers["x-kvgate-worker"] == "none"
        async with session.post(stack.url + CHAT, json={"messages": MESSAGES, "max_tokens": 4}) as response:
            assert response.status == 200
    assert stack.metric("400") == 1
    assert len(stack.worker.bodies) == 1


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
async def test_a_json_body_is_read_with_a_json_content_type_in_any_case(stack: Stack, content_type: str) -> None:
    plain = orjson.dumps({"messages": MESSAGES, "max_tokens": 4})
    async with aiohttp.ClientSession() as session:
        async with session.post(stack.url + CHAT, data=plain, headers={"Content-Type": content_type}) as response:
            assert response.status == 200, await response.read()
    assert stack.worker.bodies == [plain]
    assert stack.worker.headers[0].get("Content-Type") == content_type


async def test_a_client_reading_slowly_gets_every_event_in_order(stack: Stack) -> None:
    # A client with a 4 KB receive buffer that stops reading for a while: the gateway's write
    # buffer fills, it stops reading from the worker until the client drains, and nothing is lost.
    stack.worker.mode = "flood"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", stack.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = orjson.dumps({"messages": MESSAGES, "stream": True})
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (CHAT.encode(), len(body), body)
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
    await asyncio.sleep(1.0)  # not reading: a few hundred KB fit in the kernel's buffers, not 4 MB
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    decoded = bytearray()
    while raw:
        size, _, raw = raw.partition(b"\r\n")
        n = int(size, 16)
        decoded += raw[:n]
        raw = raw[n + 2 :]
        if n == 0:
            break
    expected = b"".join(flood_event(i) for i in range(FLOOD_EVENTS)) + b"data: [DONE]\n\n"
    assert bytes(decoded) == expected


async def test_an_http_1_0_client_gets_a_stream_unchunked_and_ended_by_the_close(stack: Stack) -> None:
    # HTTP/1.0 has no chunked framing (aiohttp refuses to write it, which was a 500): the events go out as
    # they are, many thousands of them piped, and the gateway closes the connection after [DONE].
    stack.worker.mode = "flood"
    body = orjson.dumps({"messages": MESSAGES, "stream": True})
    request = b"POST %s HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    answer = await exchange(stack.port, request % (CHAT.encode(), len(body), body), timeout=30)
    head, _, events = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower(), head
    assert events == b"".join(flood_event(i) for i in range(FLOOD_EVENTS)) + b"data: [DONE]\n\n"
    assert stack.metric("200", "w0") == 1 and stack.metric("500") == 0


async def test_a_gzip_body_is_forwarded_decoded(stack: Stack) -> None:
    plain = orjson.dumps({"messages": MESSAGES, "max_tokens": 4})
    status, _, body = await post(stack.url + CHAT, gzip.compress(plain), {"Content-Encoding": "gzip"})
    assert status == 200, body
    assert stack.worker.bodies == [plain]
    assert "content-encoding" not in {k.lower() for k in stack.worker.headers[0]}


async def test_a_request_template_is_vllms_400_unless_trusted(stack: Stack) -> None:
    body = {"messages": MESSAGES, "max_tokens": 4, "chat_template": "{{ messages[0].content }}"}
    status, _, answer = await post(stack.url + CHAT, body)
    assert status == 400, answer
    error = orjson.loads(answer)["error"]
    assert error["type"] == "invalid_request_error" and "--trust-request-chat-template is not set" in error["message"]
    status, _, answer = await post(stack.url + CHAT, {**body, "chat_template": 7})
    assert status == 400 and orjson.loads(answer)["error"]["param"] == "chat_template"
    assert not stack.worker.bodies and stack.metric("500") == 0


@pytest.mark.parametrize("stack", [{"trust_request_chat_template": True}], indirect=True)
async def test_a_trusted_request_template_is_rendered_and_forwarded(stack: Stack) -> None:
    body = {"messages": MESSAGES, "max_tokens": 4, "chat_template": "{{ messages[0].content }}"}
    status, _, answer = await post(stack.url + CHAT, body)
    assert status == 200, answer
    assert [orjson.loads(b) for b in stack.worker.bodies] == [body]
    status, _, answer = await post(stack.url + CHAT, {**body, "chat_template": "{% if %}"})
    assert status == 400 and "chat template failed" in orjson.loads(answer)["error"]["message"]


# -- 2. Leaks: worker addresses, library versions, protocol errors ---------------------------------


def assert_no_address(stack: Stack, text: bytes) -> None:
    assert b"127.0.0.1" not in text and str(stack.worker.port).encode() not in text, text


@pytest.mark.parametrize("stack", [{"read_timeout": 0.5}], indirect=True)
async def test_failure_messages_name_the_worker_id_never_its_address(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kvgate")
    stack.worker.mode = "500"
    status, headers, body = await post(stack.url + CHAT, {"messages": MESSAGES})
    assert status == 502 and headers["x-kvgate-worker"] == "w0"
    assert b"worker w0 answered 500" in body
    assert_no_address(stack, body)

    stack.worker.mode = "silent"
    status, _, body = await post(stack.url + CHAT, {"messages": MESSAGES})
    assert status == 504 and b"worker w0" in body
    assert_no_address(stack, body)

    stack.worker.mode = "die"
    status, _, body = await post(stack.url + CHAT, {"messages": MESSAGES, "stream": True})
    assert status == 200
    events = body.split(b"\n\n")
    assert events[0] + b"\n\n" == EVENT
    error = orjson.loads(events[1].removeprefix(b"data: "))["error"]
    assert error["code"] == 502 and error["message"] == "worker w0 dropped the connection mid-stream"
    assert events[2:] == [b"data: [DONE]", b""]
    assert_no_address(stack, body)
    # The operator still gets the address, in the log.
    assert f"127.0.0.1:{stack.worker.port}" in caplog.text


async def test_the_server_header_names_no_library(stack: Stack) -> None:
    status, headers, _ = await post(stack.url + CHAT, {"messages": MESSAGES})
    assert status == 200 and headers["Server"] == "kvgate"  # the worker's own Server header is not relayed
    async with aiohttp.ClientSession() as session:
        for path in ("/health", "/nowhere"):
            async with session.get(stack.url + path) as response:
                assert response.headers["Server"] == "kvgate"
    _, raw_headers, _ = split(await exchange(stack.port, b"BAD\r\n\r\n"))
    assert raw_headers["server"] == "kvgate"


# aiohttp knows zstd but this build has no library to decode it (else "abc" is just not zstd data).
ZSTD_UNDECODABLE = getattr(aiohttp.http_parser, "HAS_ZSTD", True) is False

PROTOCOL_ERRORS = {
    "header line too long": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431),
    "too many headers": (
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n",
        431,
    ),
    "Content-Length with Transfer-Encoding": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "bad request line": (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "a Content-Encoding this build cannot decode": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: zstd\r\nContent-Length: 3\r\n\r\nabc",
        415 if ZSTD_UNDECODABLE else 400,  # with a zstd library, "abc" is a body that is not zstd data
    ),
    "bad HTTP version": (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400),
}


@pytest.mark.parametrize("case", list(PROTOCOL_ERRORS))
async def test_protocol_errors_answer_json_and_log_one_line(
    stack: Stack, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    data, expected = PROTOCOL_ERRORS[case]
    status, headers, body = split(await exchange(stack.port, data))
    assert status == expected
    assert headers["content-type"].startswith("application/json")
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert b"aaaa" not in orjson.dumps(error)  # the client's bytes are not echoed back
    assert all(r.levelno <= logging.INFO and r.exc_info is None for r in caplog.records), [
        (r.levelname, r.getMessage()) for r in caplog.records if r.levelno > logging.INFO or r.exc_info
    ]


# -- 3. Connection limits --------------------------------------------------------------------------


@pytest.mark.parametrize("stack", [{"header_timeout": 0.5}], indirect=True)
async def test_a_half_sent_request_is_closed_after_the_header_timeout(stack: Stack) -> None:
    started = time.monotonic()
    answer = await exchange(stack.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    assert time.monotonic() - started < 3
    status, _, body = split(answer)
    assert status == 408 and body["error"]["code"] == "request_timeout"

    # Trickled a byte at a time, the head gets no more time than sent at once.
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)

    async def trickle() -> None:
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"1" * 100:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    started = time.monotonic()
    trickling = asyncio.create_task(trickle())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    finally:
        trickling.cancel()
        writer.close()
    assert head.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 2


@pytest.mark.parametrize("stack", [{"body_timeout": 0.5}], indirect=True)
async def test_a_body_that_stops_arriving_gets_a_408(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    started = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 2.5
    assert stack.metric("408") == 1


@pytest.mark.parametrize("stack", [{"max_connections": 3}], indirect=True)
async def test_connections_beyond_the_cap_are_refused_while_the_others_are_served(stack: Stack) -> None:
    held = [await asyncio.open_connection("127.0.0.1", stack.port) for _ in range(3)]
    started = time.monotonic()
    status, _, body = split(await exchange(stack.port, b"", timeout=2))
    assert status == 503 and body["error"]["code"] == "too_many_connections"
    assert time.monotonic() - started < 1
    # The connections already open are still served.
    reader, writer = held[0]
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 3)).startswith(b"HTTP/1.1 200")
    # One goes away: a new connection is accepted again.
    held[1][1].close()
    server = stack.runner.server
    assert isinstance(server, GatewayServer)
    await until(lambda: server.open_connections < 3, "the closed connection to be uncounted")
    answer = await exchange(stack.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    for _, writer in held:
        writer.close()


# -- 4. 500s are counted ---------------------------------------------------------------------------


async def test_an_unexpected_error_is_a_counted_500(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = stack.app[GATEWAY_KEY]

    async def broken(*args: object, **kwargs: object) -> list[int]:
        raise RuntimeError("bug")

    monkeypatch.setattr(gateway.preprocessor, "encode_chat_head_async", broken)
    status, headers, body = await post(stack.url + CHAT, {"messages": MESSAGES})
    assert status == 500 and orjson.loads(body)["error"]["code"] == "internal_error"
    assert headers["x-kvgate-worker"] == "none"
    assert stack.metric("500") == 1


# -- 5. A worker dying mid-stream, seen by the OpenAI SDK --------------------------------------------


async def test_the_sdk_raises_an_api_error_when_the_worker_dies_mid_event(stack: Stack) -> None:
    stack.worker.mode = "die-mid-event"
    client = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    stream = await client.chat.completions.create(model="kvgate-tiny", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    received = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["x"]  # the whole event; the half one is never sent
    assert "worker w0 dropped the connection mid-stream" in raised.value.message
    await client.close()


async def test_tokenize_goes_to_a_worker_and_one_that_is_gone_is_a_json_502_and_marked_down(stack: Stack) -> None:
    status, headers, body = await post(stack.url + "/tokenize", {"prompt": "hi"})
    assert status == 404 and headers["x-kvgate-worker"] == "w0"  # the scripted worker has no /tokenize: its answer
    assert stack.worker.bodies == []  # (its chat handler saw nothing)
    await stack.worker.stop()
    status, headers, body = await post(stack.url + "/detokenize", {"tokens": [1]})
    assert status == 502 and orjson.loads(body)["error"]["code"] == "bad_gateway", body
    assert b"127.0.0.1" not in body and headers["x-kvgate-worker"] == "w0"
    gateway = stack.app[GATEWAY_KEY]
    assert not gateway.fleet.up.get("w0")
    status, _, body = await post(stack.url + "/tokenize", {"prompt": "hi"})
    assert status == 503 and orjson.loads(body)["error"]["code"] == "no_worker_available", body
    await stack.worker.start()  # the fixture stops it again


# -- 6. Message count and a big conversation --------------------------------------------------------


async def test_too_many_messages_is_a_fast_400(stack: Stack) -> None:
    messages = [{"role": "user", "content": "hello there"}] * 50_000
    started = time.monotonic()
    status, _, body = await post(stack.url + CHAT, {"messages": messages})
    assert status == 400
    error = orjson.loads(body)["error"]
    assert error["code"] == "too_many_messages" and error["param"] == "messages" and "4096" in error["message"]
    assert time.monotonic() - started < 1.0
    assert not stack.worker.bodies


@pytest.mark.parametrize("stack", [{"context_length": 1_000_000}], indirect=True)
async def test_a_large_allowed_conversation_does_not_stall_the_loop(stack: Stack) -> None:
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"message {i}"} for i in range(4096)]
    body = orjson.dumps({"messages": messages})
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    try:
        status, _, answer = await post(stack.url + CHAT, body)
    finally:
        done.set()
        await ticking
    assert status == 200, answer
    assert stack.worker.bodies == [body]
    assert max(gaps) < 0.1, f"the event loop stalled {max(gaps) * 1000:.0f} ms"
