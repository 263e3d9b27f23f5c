"""The HTTP client side: keep-alive connections to every worker, failures typed.

A lean HTTP/1.1 client on asyncio protocols, because the request path pays for it on
every request: ``aiohttp.ClientSession`` costs ~560 us of CPU per streamed 32-token
request here, this client a fraction of that (figures in gateway/README.md). It does
exactly what forwarding needs: POST a body unchanged over a pooled keep-alive
connection and hand the body back as it arrives (``Content-Length``, ``chunked`` or
until close), with backpressure; and what the fleet's probes need, a GET read whole.
The framing is parsed by llhttp (``httptools``, the parser uvicorn uses), never by hand;
a response it rejects is a ``disconnect``.

``Upstream.post`` returns once the worker's status line and headers are in. What went
wrong is told apart, because the caller treats each differently: ``connect`` (nothing
reached the worker: try the next one and mark this one down), ``disconnect`` (the
worker dropped the connection before answering: try the next one), ``status`` (a 5xx
before the first byte: try the next one) and ``timeout`` (the worker is alive but
silent past ``read_timeout``: 504, no retry, as the first may still be working). A
failure's ``detail`` names the worker's address for the log; ``public`` is what clients read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Literal
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from kvgate.gateway.config import GatewayConfig

FailureKind = Literal["connect", "disconnect", "status", "timeout"]

# RFC 9110 hop-by-hop headers, plus the framing ones each hop sets for itself.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
_MAX_HEAD = 64 * 1024
# Reading from a worker pauses while this much of its answer waits for a slow client.
_HIGH_WATER = 1 << 20


class UpstreamFailure(Exception):
    def __init__(self, kind: FailureKind, detail: str, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status
        self.body = body

    @property
    def retryable(self) -> bool:
        return self.kind != "timeout"

    def public(self, worker: str) -> str:
        """What a client may read: the worker's id and what went wrong. ``detail``, with the
        worker's address and the OS or parser error, is for the gateway's log only."""
        if self.kind == "connect":
            return f"worker {worker} could not be reached"
        if self.kind == "disconnect":
            return f"worker {worker} dropped the connection"
        if self.kind == "status":
            return f"worker {worker} answered {self.status}"
        return f"worker {worker} sent nothing for longer than read_timeout"


def forward_headers(headers: Mapping[str, str], client: str | None = None) -> list[tuple[str, str]]:
    """The client's request headers for the worker hop (auth, ids, tracing pass through).

    Dropped: hop-by-hop headers, those the client's ``Connection`` names (RFC 9110
    7.6.1), and ``Content-Encoding`` (the gateway forwards the body it decoded).
    ``client`` (the peer address) is appended to ``X-Forwarded-For`` and ``Forwarded``
    as a proxy does, never replacing what earlier proxies wrote.
    """
    named = {token.strip().lower() for value in _values(headers, "connection") for token in value.split(",")}
    out: list[tuple[str, str]] = []
    for k, v in headers.items():
        lower = k.lower()
        if lower in HOP_BY_HOP or lower in named or lower in _NOT_FORWARDED or lower in _FORWARDING:
            continue
        out.append((k, v))
    if client is not None:
        xff = ", ".join([*_values(headers, "x-forwarded-for"), client])
        node = f'"[{client}]"' if ":" in client else client
        forwarded = ", ".join([*_values(headers, "forwarded"), f"for={node}"])
        out += [("X-Forwarded-For", xff), ("Forwarded", forwarded)]
    else:
        out += [(k, v) for k, v in headers.items() if k.lower() in _FORWARDING]
    return out


_NOT_FORWARDED = frozenset(("content-encoding",))
_FORWARDING = frozenset(("x-forwarded-for", "forwarded"))


def _values(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    return [v for k, v in headers.items() if k.lower() == name]


def response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The worker's response headers to relay; aiohttp sets the framing for the client hop."""
    return CIMultiDict(
        (k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP and k.lower() not in ("date", "server")
    )


class _Connection(asyncio.Protocol):
    """One keep-alive connection; llhttp (via httptools) parses one response at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._loop_time: Callable[[], float] = asyncio.get_running_loop().time
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.keep_alive = True
        self.got_bytes = False
        self.head_done = False
        self.done = False
        self.error: UpstreamFailure | None = None
        # A fresh parser per response: no state carries over from the previous answer.
        self._parser = httptools.HttpResponseParser(self)
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._until_close = False
        self._chunks: list[bytes] = []
        self._queued = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        # Piping (``UpstreamResponse.pipe``): each body piece goes to the sink from data_received.
        self._sink: Callable[[bytes], None] | None = None
        self._sink_timeout = 0.0
        self.held = False  # reading paused until the sink's client takes what it was given

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stop_timer()
        if not self.done and self.error is None:
            # httptools has no way to pass EOF to llhttp: a body framed by the close ends here.
            if self.head_done and self._until_close:
                self._finish()
            else:
                reason = f"{exc}" if exc else "connection closed"
                self.error = UpstreamFailure("disconnect", f"{self.pool.name} dropped the connection: {reason}")
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.done:
            # Bytes after a complete answer break the framing; never reuse this connection.
            self.keep_alive = False
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as err:
            if self.error is not None:
                return  # a callback already failed the answer
            if self.done:
                self.keep_alive = False  # bytes past the answer: the framing cannot be trusted
            elif self.head_done:
                self._fail("disconnect", f"bad chunk framing: {err}")
            elif isinstance(err, httptools.HttpParserUpgrade):
                self._fail("disconnect", "bad response head: unexpected protocol switch")
            else:
                self._fail("disconnect", f"bad response head: {err}")
            return
        if not self.head_done:
            # httptools buffers a header line until it ends: bound what a head may take.
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD:
                self._fail("disconnect", "response head too large")

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            # A second message after the answer: stop parsing; data_received drops the connection.
            raise httptools.HttpParserError("bytes after the answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        raw, self._raw_headers = self._raw_headers, []
        status = self._parser.get_status_code()
        if status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        headers: CIMultiDict[str] = CIMultiDict()
        size = 0
        for name, value in raw:
            size += len(name) + len(value)
            headers.add(name.decode("latin-1"), value.decode("latin-1").strip())
        if size > _MAX_HEAD:
            self._fail("disconnect", "response head too large")
            raise httptools.HttpParserError("response head too large")
        self.status, self.headers = status, headers
        self.keep_alive = self._parser.should_keep_alive()
        # llhttp reads a body framed by neither chunked nor Content-Length until the close.
        transfer = headers.get("Transfer-Encoding", "")
        self._until_close = "chunked" not in transfer.lower() if transfer else "Content-Length" not in headers
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is not None:
            # The silence clock restarts with every piece (the timer re-arms for the moved deadline).
            self._deadline = self._loop_time() + self._sink_timeout
            sink(body)
            return
        self._chunks.append(body)
        self._queued += len(body)
        if self._queued > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        # Before the head is in, this ends an interim answer; the parser goes on to the next.
        if self.head_done:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        self._wake()

    def _fail(self, kind: FailureKind, detail: str) -> None:
        self.error = UpstreamFailure(kind, f"{self.pool.name}: {detail}")
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the consumer side ----------------------------------------------------------------

    async def wait(self, timeout: float) -> None:
        """Until something new happened (head, data, end, error), or ``timeout`` passes.

        One timer per connection, not one per wait: each wait moves the deadline, and the
        timer, when it fires early (the deadline moved since it was armed), re-arms for the
        rest. A streamed answer's chunks so cost no timer each."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        deadline = self._deadline = loop.time() + timeout
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = loop.call_at(deadline, self._check_deadline)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waiting: the next wait arms a timer again
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._timer_at = self._deadline
            self._timer = loop.call_at(self._deadline, self._check_deadline)
            return
        waiter.set_exception(UpstreamFailure("timeout", f"{self.pool.name} sent nothing for {self.pool.read_timeout}s"))

    def start_sink(self, sink: Callable[[bytes], None], timeout: float) -> None:
        self._sink_timeout = timeout
        self._sink = sink

    def stop_sink(self) -> None:
        self._sink = None
        self.release_hold()

    def hold(self) -> None:
        """Stop reading from the worker until ``release_hold``: the sink's client is behind."""
        if not self.held:
            self.held = True
            if self.transport is not None:
                self.transport.pause_reading()
            self._wake()

    def release_hold(self) -> None:
        if self.held:
            self.held = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._queued = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def has_data(self) -> bool:
        return bool(self._chunks)


class UpstreamResponse:
    """A worker's answer: status and headers now, the body as it arrives."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        ctype = conn.headers.get("Content-Type", "")
        self.content_type = ctype.split(";", 1)[0].strip().lower()
        self._open = True
        self._aborted = False
        self._body: bytes | None = None

    @property
    def streamed(self) -> bool:
        """An SSE stream, relayed as it arrives; any other answer is read whole before it is relayed."""
        return self.content_type == "text/event-stream"

    @property
    def complete(self) -> bool:
        return self._conn.done and not self._conn.has_data()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Everything received since the last step, as soon as there is some."""
        while (chunk := await self.next_chunk()) is not None:
            yield chunk

    async def next_chunk(self) -> bytes | None:
        """What arrived since the last call, as soon as there is some; None at the end."""
        conn = self._conn
        timeout = conn.pool.read_timeout
        while True:
            if conn.has_data():
                return conn.take()
            if conn.done:
                return None
            if conn.error is not None:
                raise conn.error
            await conn.wait(timeout)

    async def pipe(self, sink: Callable[[bytes], None], drain: Callable[[], Awaitable[None]]) -> None:
        """Hand the rest of the body to ``sink`` piece by piece as it arrives, called from the
        connection's ``data_received``: no task switch and no future per piece, which is most of
        what relaying a streamed answer costs. Returns at the end of the body; raises
        ``UpstreamFailure`` as ``iter_chunks`` does (``timeout``: nothing for ``read_timeout``).
        ``sink`` must not raise; it calls ``hold`` when its client falls behind, and reading
        resumes after ``drain``. ``abort`` ends the pipe early (the client left)."""
        conn = self._conn
        timeout = conn.pool.read_timeout
        if conn.has_data():
            sink(conn.take())
        conn.start_sink(sink, timeout)
        try:
            while not (conn.done or self._aborted):
                if conn.error is not None:
                    raise conn.error
                if conn.held:
                    await drain()
                    conn.release_hold()
                    continue
                await conn.wait(timeout)
        finally:
            conn.stop_sink()

    def hold(self) -> None:
        self._conn.hold()

    def abort(self) -> None:
        """End a ``pipe`` early: its sink's client is gone."""
        self._aborted = True
        self._conn._wake()

    async def read(self) -> bytes:
        """The whole body; read once, later calls return it again. A failure closes the connection."""
        if self._body is None:
            try:
                parts = [chunk async for chunk in self.iter_chunks()]
            except UpstreamFailure:
                self.close()
                raise
            self._body = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._body

    def release(self) -> None:
        """Done with it: a complete answer frees the connection for reuse, anything else closes it."""
        if not self._open:
            return
        self._open = False
        conn = self._conn
        if conn.done and not conn.has_data() and conn.keep_alive and not conn.closed:
            conn.pool.put(conn)
        else:
            self.close_connection()

    def close(self) -> None:
        """Abort: closing the connection is what tells the worker to stop generating."""
        self._open = False
        self.close_connection()

    def close_connection(self) -> None:
        conn = self._conn
        conn.keep_alive = False
        if conn.transport is not None and not conn.closed:
            conn.transport.close()


class _Pool:
    """Idle keep-alive connections to one worker (host:port), most recent first."""

    def __init__(self, host: str, port: int, config: GatewayConfig) -> None:
        self.host, self.port = host, port
        self.name = f"{host}:{port}"
        self.read_timeout = config.read_timeout
        self.connect_timeout = config.connect_timeout
        self.max_idle = config.keepalive_connections
        self.idle: list[_Connection] = []

    def put(self, conn: _Connection) -> None:
        conn.stop_timer()
        if len(self.idle) >= self.max_idle:
            conn.transport.close()  # type: ignore[union-attr]
            return
        conn.reused = True
        self.idle.append(conn)

    async def acquire(self, fresh: bool = False) -> _Connection:
        while self.idle and not fresh:
            conn = self.idle.pop()
            # keep_alive turns false if stray bytes arrived while the connection sat idle.
            if conn.keep_alive and not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                conn._reset()
                return conn
            conn.transport.close()  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port), self.connect_timeout
            )
        except TimeoutError:
            raise UpstreamFailure(
                "connect", f"connecting to {self.name} timed out after {self.connect_timeout}s"
            ) from None
        except OSError as err:
            raise UpstreamFailure("connect", f"cannot connect to {self.name}: {err.strerror or err}") from None
        return conn

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


class Upstream:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._pools: dict[str, tuple[_Pool, str]] = {}

    async def start(self) -> None:
        """Nothing to open in advance: connections are made on first use and kept alive."""

    async def close(self) -> None:
        for pool, _ in self._pools.values():
            pool.close()
        self._pools.clear()

    def forget(self, base_url: str) -> None:
        """Close the idle connections to a worker that left the fleet."""
        found = self._pools.pop(base_url, None)
        if found is not None:
            found[0].close()

    def _pool(self, base_url: str) -> tuple[_Pool, str]:
        found = self._pools.get(base_url)
        if found is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http":
                raise UpstreamFailure("connect", f"{base_url}: only http:// workers are supported")
            pool = _Pool(parts.hostname or "127.0.0.1", parts.port or 80, self.config)
            found = self._pools[base_url] = (pool, parts.path.rstrip("/"))
        return found

    async def post(self, base_url: str, path: str, body: bytes, headers: list[tuple[str, str]]) -> UpstreamResponse:
        """POST ``body`` unchanged; returns at the status line. The caller must release/close it."""
        pool, prefix = self._pool(base_url)
        # aiohttp decoded the client's header bytes as UTF-8 with surrogateescape; encoding
        # the same way sends the worker the very bytes the client sent, Latin-1 or not.
        head = "".join(f"{k}: {v}\r\n" for k, v in headers)
        request = (
            f"POST {prefix}{path} HTTP/1.1\r\nHost: {pool.name}\r\n{head}Content-Length: {len(body)}\r\n\r\n"
        ).encode("utf-8", "surrogateescape") + body
        response = await self._send(pool, request)
        if response.status >= 500:
            try:
                payload = await response.read()
            except UpstreamFailure:
                payload = b""
            response.release()
            raise UpstreamFailure("status", f"{pool.name} answered {response.status}", response.status, payload)
        return response

    async def get(self, base_url: str, path: str, timeout: float) -> tuple[int, bytes]:
        """GET ``path`` and read the whole answer within ``timeout`` seconds: the fleet's health
        polls, load scrapes and ``/kv_event_sources`` questions, a few a second per worker, over a
        kept-alive connection (through aiohttp's client they were most of an idle gateway's CPU).
        Raises ``UpstreamFailure`` or ``TimeoutError``; any status is returned, 5xx included."""
        pool, prefix = self._pool(base_url)
        request = f"GET {prefix}{path} HTTP/1.1\r\nHost: {pool.name}\r\n\r\n".encode("utf-8", "surrogateescape")
        response: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(timeout):
                response = await self._send(pool, request)
                body = await response.read()
        except BaseException:
            if response is not None:
                response.close()
            raise
        response.release()
        return response.status, body

    async def _send(self, pool: _Pool, request: bytes) -> UpstreamResponse:
        conn = await pool.acquire()
        try:
            return await self._exchange(conn, request)
        except UpstreamFailure as err:
            # An idle connection the worker closed just as it was reused is no failure of
            # the worker: send once more on a fresh one.
            if not (conn.reused and err.kind == "disconnect" and not conn.got_bytes):
                raise
            return await self._exchange(await pool.acquire(fresh=True), request)

    async def _exchange(self, conn: _Connection, request: bytes) -> UpstreamResponse:
        try:
            conn.transport.write(request)  # type: ignore[union-attr]
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(conn.pool.read_timeout)
        except BaseException:
            conn.keep_alive = False
            if conn.transport is not None:
                conn.transport.close()
            raise
        return UpstreamResponse(conn)
