"""The gateway's HTTP/1.1 client against real loopback servers that answer scripted bytes.

Each server reads whole requests (head + Content-Length body), records them, and writes
the scripted answer in the pieces given, so framing split anywhere is exercised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from multidict import CIMultiDict

from kvgate.dev.launch import free_port
from kvgate.gateway.config import GatewayConfig
from kvgate.gateway.upstream import Upstream, UpstreamFailure, forward_headers, response_headers

Answer = Sequence[bytes]


@dataclass
class Scripted:
    """A server whose n-th request on any connection gets ``answers(n)``; ``close_after`` closes then."""

    answers: Callable[[int], Answer]
    close_after: bool = False
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                self.requests.append(head + await reader.readexactly(length))
                for piece in self.answers(len(self.requests) - 1):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"X-Worker-Note: kept\r\n\r\n"
    b'f\r\ndata: {"a":1}\n\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n'
)


@pytest.fixture
async def upstream():
    client = Upstream(GatewayConfig(read_timeout=0.5, connect_timeout=1.0))
    await client.start()
    yield client
    await client.close()


async def test_chunked_split_anywhere_then_keep_alive(upstream: Upstream) -> None:
    server = Scripted(lambda n: bytewise(CHUNKED) if n == 0 else [CHUNKED])
    url = await server.start()
    try:
        for _ in range(2):
            response = await upstream.post(url, "/v1/chat/completions", b'{"x": 1}', [("Authorization", "Bearer k")])
            assert response.status == 200 and response.content_type == "text/event-stream"
            assert response.headers["X-Worker-Note"] == "kept"
            assert "X-Trailer" not in response.headers  # trailers are dropped, not merged into the head
            assert await response.read() == b'data: {"a":1}\n\nhello'
            assert response.complete
            response.release()
        assert server.connections == 1  # the second request reused the connection
        first = server.requests[0]
        assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"Authorization: Bearer k\r\n" in first and first.endswith(b'\r\n\r\n{"x": 1}')
    finally:
        await server.stop()


async def test_content_length_interim_answer_and_close_delimited(upstream: Upstream) -> None:
    answers = [
        [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n", b"\r\nabc", b"defg"],
        [b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"body":', b' "until close"}'],
    ]
    server = Scripted(lambda n: answers[n], close_after=True)
    url = await server.start()
    try:
        response = await upstream.post(url, "/v1/completions", b"{}", [])
        assert await response.read() == b"abcdefg"
        response.release()
        response = await upstream.post(url, "/v1/completions", b"{}", [])
        assert await response.read() == b'{"body": "until close"}'
        response.release()
        assert server.connections == 2
    finally:
        await server.stop()


async def test_broken_chunk_framing_fails_the_answer(upstream: Upstream) -> None:
    server = Scripted(lambda n: [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n"])
    url = await server.start()
    try:
        response = await upstream.post(url, "/v1/completions", b"{}", [])
        with pytest.raises(UpstreamFailure, match="bad chunk framing"):
            await response.read()
        response.release()
    finally:
        await server.stop()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BIG_HEADER = b"X-Big: " + b"a" * 70_000 + b"\r\n"


@pytest.mark.parametrize(
    ("answer", "fails_at", "message"),
    [
        pytest.param(
            bytewise(b"HTPT/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            "post",
            "bad response head",
            id="garbage-status-line",
        ),
        pytest.param([b"HTTP/1.1 2x0 OK\r\n\r\n"], "post", "bad response head", id="bad-status-code"),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"],
            "post",
            "bad response head",
            id="two-content-lengths",
        ),
        pytest.param(
            [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"],
            "post",
            "unexpected protocol switch",
            id="protocol-switch",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\n" + BIG_HEADER + b"Content-Length: 2\r\n\r\nok"],
            "post",
            "response head too large",
            id="oversized-head",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nX-Endless: "] + [b"a" * 8192] * 10,
            "post",
            "response head too large",
            id="unterminated-head",
        ),
        pytest.param(
            bytewise(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"),
            "read",
            "bad chunk framing",
            id="bad-chunk-size",
        ),
    ],
)
async def test_malformed_answer_is_a_disconnect_and_drops_the_connection(
    upstream: Upstream, answer: Answer, fails_at: str, message: str
) -> None:
    server = Scripted(lambda n: answer if n == 0 else [OK])
    url = await server.start()
    try:
        if fails_at == "post":
            with pytest.raises(UpstreamFailure, match=message) as err:
                await upstream.post(url, "/v1/completions", b"{}", [])
        else:
            response = await upstream.post(url, "/v1/completions", b"{}", [])
            with pytest.raises(UpstreamFailure, match=message) as err:
                await response.read()
            response.release()
        assert err.value.kind == "disconnect" and err.value.retryable
        response = await upstream.post(url, "/v1/completions", b"{}", [])
        assert await response.read() == b"ok"
        response.release()
        assert server.connections == 2  # the broken connection was not reused
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "answer",
    [
        # The server keeps these connections open: the client alone must decide not to reuse them.
        pytest.param([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"], id="connection-close"),
        pytest.param([b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"], id="http-1.0"),
        pytest.param([OK + b"XY"], id="length-then-bytes"),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" + OK],
            id="chunked-then-a-second-answer",
        ),
        pytest.param([OK, b"garbage"], id="length-then-later-bytes"),
    ],
)
async def test_answers_that_forbid_reuse(upstream: Upstream, answer: Answer) -> None:
    server = Scripted(lambda n: answer if n == 0 else [OK])
    url = await server.start()
    try:
        for _ in range(2):
            response = await upstream.post(url, "/v1/completions", b"{}", [])
            assert await response.read() == b"ok"
            await asyncio.sleep(0.05)  # let any late bytes arrive before the release
            response.release()
        assert server.connections == 2
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"], id="length"),
        pytest.param([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"], id="chunked"),
    ],
)
async def test_close_before_the_body_ends_is_a_disconnect(upstream: Upstream, answer: Answer) -> None:
    server = Scripted(lambda n: answer, close_after=True)
    url = await server.start()
    try:
        response = await upstream.post(url, "/v1/completions", b"{}", [])
        with pytest.raises(UpstreamFailure, match="dropped the connection") as err:
            await response.read()
        assert err.value.kind == "disconnect" and not response.complete
        response.release()
    finally:
        await server.stop()


async def test_early_hints_then_no_content_keeps_the_connection(upstream: Upstream) -> None:
    answer = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 204 No Content\r\nX-Id:  r1 \r\n\r\n"
    server = Scripted(lambda n: bytewise(answer))
    url = await server.start()
    try:
        for _ in range(2):
            response = await upstream.post(url, "/v1/completions", b"{}", [])
            assert (response.status, response.headers["X-Id"], "Link" in response.headers) == (204, "r1", False)
            assert await response.read() == b"" and response.complete
            response.release()
        assert server.connections == 1
    finally:
        await server.stop()


async def test_5xx_is_a_retryable_status_failure(upstream: Upstream) -> None:
    server = Scripted(lambda n: [b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"])
    url = await server.start()
    try:
        with pytest.raises(UpstreamFailure) as err:
            await upstream.post(url, "/v1/completions", b"{}", [])
        assert (err.value.kind, err.value.status, err.value.body, err.value.retryable) == ("status", 503, b"busy", True)
    finally:
        await server.stop()


async def test_connect_refused_disconnect_and_timeout(upstream: Upstream) -> None:
    with pytest.raises(UpstreamFailure) as err:
        await upstream.post(f"http://127.0.0.1:{free_port()}", "/v1/completions", b"{}", [])
    assert err.value.kind == "connect"

    hang_up = Scripted(lambda n: [], close_after=True)
    url = await hang_up.start()
    try:
        with pytest.raises(UpstreamFailure) as err:
            await upstream.post(url, "/v1/completions", b"{}", [])
        assert err.value.kind == "disconnect" and err.value.retryable
    finally:
        await hang_up.stop()

    silent = Scripted(lambda n: [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"])
    url = await silent.start()
    try:
        response = await upstream.post(url, "/v1/completions", b"{}", [])
        chunks = response.iter_chunks()
        assert await chunks.__anext__() == b"abc"
        with pytest.raises(UpstreamFailure) as err:
            await chunks.__anext__()
        assert err.value.kind == "timeout" and not err.value.retryable
        response.close()
    finally:
        await silent.stop()


async def test_idle_connection_closed_by_the_worker_is_replaced(upstream: Upstream) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    # The server answers once per connection and then closes it, as an idle timeout would.
    server = Scripted(lambda n: [ok], close_after=True)
    url = await server.start()
    try:
        for _ in range(3):
            response = await upstream.post(url, "/v1/completions", b"{}", [])
            assert await response.read() == b"ok"
            response.release()
            await asyncio.sleep(0.05)  # let the close arrive before the connection is reused
        assert server.connections == 3
    finally:
        await server.stop()


async def test_get_reads_whole_answers_any_status_over_one_connection_within_its_deadline(upstream: Upstream) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nup!\r\n0\r\n\r\n"
    busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
    server = Scripted(lambda n: bytewise(ok) if n % 2 == 0 else [busy])
    url = await server.start()
    try:
        assert await upstream.get(url, "/health", 1.0) == (200, b"up!")
        assert await upstream.get(url, "/metrics", 1.0) == (503, b"busy")  # a status, not a failure
        assert await upstream.get(url, "/health", 1.0) == (200, b"up!")
        assert server.connections == 1  # kept alive between polls
        assert server.requests[1] == f"GET /metrics HTTP/1.1\r\nHost: {url[7:]}\r\n\r\n".encode()
    finally:
        await server.stop()

    # A worker that sends its head and then stalls: the deadline, not read_timeout, ends the poll.
    stalled = Scripted(lambda n: [b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart"])
    url = await stalled.start()
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            await upstream.get(url, "/metrics", 0.1)
        assert loop.time() - start < 0.4  # read_timeout is 0.5 s
        with pytest.raises(TimeoutError):
            await upstream.get(url, "/metrics", 0.1)
        assert stalled.connections == 2  # the half-read connection was closed, never reused
    finally:
        await stalled.stop()

    with pytest.raises(UpstreamFailure) as err:
        await upstream.get(f"http://127.0.0.1:{free_port()}", "/health", 1.0)
    assert err.value.kind == "connect"


async def test_forget_closes_a_departed_workers_idle_connections(upstream: Upstream) -> None:
    server = Scripted(lambda n: [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    url = await server.start()
    try:
        assert await upstream.get(url, "/health", 1.0) == (200, b"ok")
        (conn,) = upstream._pools[url][0].idle
        upstream.forget(url)
        assert url not in upstream._pools
        assert await _eventually(lambda: conn.closed)
        upstream.forget(url)  # twice, or a worker never polled: nothing to do
    finally:
        await server.stop()


async def _eventually(check: Callable[[], bool], timeout: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def test_header_filters_drop_hop_by_hop() -> None:
    sent = forward_headers(
        {
            "Host": "gw",
            "Content-Length": "3",
            "Connection": "keep-alive",
            "Authorization": "Bearer k",
            "X-Request-Id": "r1",
        }
    )
    assert sent == [("Authorization", "Bearer k"), ("X-Request-Id", "r1")]
    # Headers the client's Connection names are hop-by-hop too; the decoded body loses its encoding.
    sent = forward_headers(
        CIMultiDict(
            [
                ("Connection", "close, X-Secret-Hop"),
                ("X-Secret-Hop", "1"),
                ("Content-Encoding", "gzip"),
                ("X-Kept", "2"),
            ]
        )
    )
    assert sent == [("X-Kept", "2")]
    relayed = response_headers(
        {
            "Transfer-Encoding": "chunked",
            "Content-Type": "text/event-stream",
            "Date": "now",
            "Server": "uvicorn",
            "X-Request-Id": "r1",
        }
    )
    assert dict(relayed) == {"Content-Type": "text/event-stream", "X-Request-Id": "r1"}


def test_the_client_address_is_appended_to_forwarding_headers() -> None:
    headers = CIMultiDict([("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=203.0.113.7"), ("X-A", "1")])
    sent = forward_headers(headers, client="127.0.0.5")
    assert sent == [
        ("X-A", "1"),
        ("X-Forwarded-For", "203.0.113.7, 127.0.0.5"),
        ("Forwarded", "for=203.0.113.7, for=127.0.0.5"),
    ]
    assert forward_headers(CIMultiDict(), client="::1") == [("X-Forwarded-For", "::1"), ("Forwarded", 'for="[::1]"')]
    # Without a known peer, what the client sent passes as it was.
    assert forward_headers(headers) == [
        ("X-A", "1"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("Forwarded", "for=203.0.113.7"),
    ]


async def test_header_values_beyond_latin_1_reach_the_worker_byte_for_byte() -> None:
    server = Scripted(lambda n: [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    url = await server.start()
    upstream = Upstream(GatewayConfig())
    await upstream.start()
    try:
        # What aiohttp hands us for a UTF-8 value, and for a raw Latin-1 byte (surrogate-escaped).
        headers = [("X-Name", "Zoë ✓"), ("X-Raw", b"caf\xe9".decode("utf-8", "surrogateescape"))]
        response = await upstream.post(url, "/v1/completions", b"{}", headers)
        await response.read()
        response.release()
        head = server.requests[0]
        assert "X-Name: Zoë ✓".encode() in head and b"X-Raw: caf\xe9\r\n" in head
    finally:
        await upstream.close()
        await server.stop()


# -- piping: pieces handed over from data_received ------------------------------------------------


async def test_pipe_hands_over_every_piece_then_the_connection_is_reused(upstream: Upstream) -> None:
    server = Scripted(lambda n: bytewise(CHUNKED) if n == 0 else [CHUNKED])
    url = await server.start()
    drained: list[bool] = []

    async def drain() -> None:
        drained.append(True)

    try:
        for _ in range(2):
            response = await upstream.post(url, "/v1/chat/completions", b"{}", [])
            first = await response.next_chunk()
            assert first
            pieces: list[bytes] = []
            await response.pipe(pieces.append, drain)
            assert first + b"".join(pieces) == b'data: {"a":1}\n\nhello'
            assert await response.next_chunk() is None and response.complete and not drained
            response.release()
        assert server.connections == 1
    finally:
        await server.stop()


def stream_head() -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def test_pipe_times_out_only_after_read_timeout_of_silence(upstream: Upstream) -> None:
    # read_timeout 0.5 s: pieces 0.3 s apart for 1.2 s keep the answer alive, then silence fails it.
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(stream_head() + chunk(b"data: 0\n\n"))
        for i in range(1, 5):
            await asyncio.sleep(0.3)
            writer.write(chunk(b"data: %d\n\n" % i))
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        response = await upstream.post(url, "/v1/chat/completions", b"{}", [])
        assert await response.next_chunk() == b"data: 0\n\n"
        pieces: list[bytes] = []
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def drain() -> None:
            pass

        with pytest.raises(UpstreamFailure) as failed:
            await response.pipe(pieces.append, drain)
        assert failed.value.kind == "timeout"
        assert b"".join(pieces) == b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n"
        assert 1.2 + 0.5 - 0.1 < loop.time() - started < 1.2 + 0.5 + 0.6
        response.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_pipe_holds_reading_until_drained_and_aborts_early(upstream: Upstream) -> None:
    pieces_sent = 40

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # one answer per request, on the same connection while it stays open
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)  # the body, b"{}"
                writer.write(stream_head())
                for i in range(pieces_sent):
                    writer.write(chunk(b"data: %d\n\n" % i))
                    await writer.drain()
                    await asyncio.sleep(0.002)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        # A sink whose client is always behind: every piece holds reading until a drain.
        response = await upstream.post(url, "/v1/chat/completions", b"{}", [])
        got: list[bytes] = []
        drains = 0

        def sink(piece: bytes) -> None:
            got.append(piece)
            response.hold()

        async def drain() -> None:
            nonlocal drains
            drains += 1
            await asyncio.sleep(0.001)

        await response.pipe(sink, drain)
        assert b"".join(got) == b"".join(b"data: %d\n\n" % i for i in range(pieces_sent))
        assert drains >= 1 and response.complete
        response.release()

        # A sink whose client left: abort ends the pipe before the answer does.
        response = await upstream.post(url, "/v1/chat/completions", b"{}", [])
        seen: list[bytes] = []

        def leaving(piece: bytes) -> None:
            seen.append(piece)
            response.abort()

        await response.pipe(leaving, drain)
        assert seen and not response.complete
        response.close()
    finally:
        server.close()
        await server.wait_closed()
