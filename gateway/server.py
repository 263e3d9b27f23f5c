"""The gateway's listening side: aiohttp's HTTP server with the limits a public port needs.

Owns how client connections are accepted and their requests read up to the handler:
the connection cap (a connection beyond ``max_connections`` gets a 503 and is closed
at once, before anything is read), the header timeout (a request whose head is not
complete ``header_timeout`` after its first byte gets a 408 and the connection is
closed), the keep-alive idle timeout and the header size and count limits (aiohttp's
parser enforces those), and the answer to every request aiohttp's parser refuses (bad
request line, header too long, too many headers, Content-Length with Transfer-Encoding,
...): OpenAI-style JSON with its 4xx, logged at INFO in one line, never a traceback.
``serve`` runs an application with all of it until SIGINT / SIGTERM, and beside it,
when given one, the admin application on its own address with the same limits.

It never reads bodies (the body timeout is ``app.py``'s, around its one read) and never
looks inside a request. aiohttp offers no public hook for its protocol class, so
``GatewayRunner`` builds aiohttp's own ``Server`` and hands its arguments to
``GatewayServer``, whose protocol ``GatewayProtocol`` is aiohttp's ``RequestHandler``
with those additions; tests/test_gateway_server.py pins each behaviour with raw bytes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from kvgate.gateway.config import GatewayConfig
from kvgate.gateway.errors import (
    NO_WORKER,
    SERVER_NAME,
    ApiError,
    from_parser_error,
    header_timeout,
    internal_error,
    too_many_connections,
)

log = logging.getLogger(__name__)

# A flood of refused connections is logged once per this many seconds, with its count.
_REFUSAL_LOG_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class ServerLimits:
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_connections: int = 4096
    max_header_size: int = 8190
    max_headers: int = 128

    @classmethod
    def from_config(cls, config: GatewayConfig) -> ServerLimits:
        return cls(
            header_timeout=config.header_timeout,
            keepalive_timeout=config.keepalive_timeout,
            max_connections=config.max_connections,
            max_header_size=config.max_header_size,
            max_headers=config.max_headers,
        )

    def handler_args(self) -> dict[str, Any]:
        """What aiohttp's own request handler enforces."""
        return {
            "keepalive_timeout": self.keepalive_timeout,
            "max_line_size": self.max_header_size,
            "max_field_size": self.max_header_size,
            "max_headers": self.max_headers,
        }


class GatewayProtocol(RequestHandler):
    """One client connection: aiohttp's request handler, plus the header timeout and JSON errors."""

    __slots__ = ("_server", "_head_timer", "_body", "_counted")

    def __init__(self, manager: GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._server = manager
        self._head_timer: asyncio.TimerHandle | None = None
        # The payload of the last request whose head arrived: bytes are its body until it ends.
        self._body: Any = None
        self._counted = True

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._server.open_connections -= 1
        self._stop_head_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            # A head arrived (or the parser gave up on it): its clock stops.
            self._stop_head_clock()
            self._body = self._messages[-1][1] if self._messages else None
        elif data and self._head_timer is None and (self._body is None or self._body.is_eof()):
            self._head_timer = self._loop.call_later(self._server.limits.header_timeout, self._head_timed_out)

    def _stop_head_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close:
            return
        if self._waiter is None or self._waiter.done():
            # A pipelined head behind a request still being answered: its clock waits for that answer.
            self._head_timer = self._loop.call_later(self._server.limits.header_timeout, self._head_timed_out)
            return
        seconds = self._server.limits.header_timeout
        log.info("closing a connection from %s: request headers incomplete after %gs", self._peer(), seconds)
        self.transport.write(header_timeout(seconds).raw_response())
        self.force_close()

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else "?"

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            limits = self._server.limits
            error = from_parser_error(exc, limits.max_header_size, limits.max_headers)
            # Non-HTTP bytes as a connection's first request are port scanners and TLS probes: noise.
            first_probe = isinstance(exc, BadHttpMethod) and self._request_count == 1
            log.log(
                logging.DEBUG if first_probe else logging.INFO,
                "refused a malformed request from %s: %d %s",
                request.remote,
                error.status,
                error.message,
            )
        else:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            error = internal_error() if status == 500 else ApiError(status, str(message or status), type="server_error")
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started: no error answer can replace it")
        response = error.response(NO_WORKER)
        response.headers["Server"] = SERVER_NAME
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        if isinstance(kwargs.get("exc_info"), (HttpProcessingError, web.RequestPayloadError)):
            # A body the client broke (bad encoding, cut short), met again while aiohttp drains
            # it after the 400 went out: the client's fault, already answered.
            log.debug("dropped the rest of a broken request body from %s", self._peer())
            return
        super().log_exception(*args, **kwargs)


class _Refused(asyncio.Protocol):
    """A connection over the cap: one 503, then closed, before a byte of it is read."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self._answer)
        transport.close()


class GatewayServer(web.Server):
    """aiohttp's server with ``GatewayProtocol`` connections, counted against ``max_connections``."""

    def __init__(self, limits: ServerLimits, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.open_connections = 0
        self.refused = 0
        self._refused_logged = 0
        self._refusal_logged_at = 0.0
        self._refusal = too_many_connections(limits.max_connections).raw_response()

    def __call__(self) -> RequestHandler:  # type: ignore[override]
        # Counted when accepted, not when connected: a burst accepted in one loop turn
        # would otherwise overshoot the cap by the whole burst.
        if self.open_connections >= self.limits.max_connections:
            self._note_refusal()
            return _Refused(self._refusal)  # type: ignore[return-value]
        self.open_connections += 1
        return GatewayProtocol(self, loop=self._loop, **self._kwargs)

    def _note_refusal(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= _REFUSAL_LOG_INTERVAL:
            log.warning(
                "%d open connections (max_connections): refused %d new ones",
                self.open_connections,
                self.refused - self._refused_logged,
            )
            self._refused_logged, self._refusal_logged_at = self.refused, now


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` serving its application through ``GatewayServer``."""

    def __init__(self, app: web.Application, limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(app, **limits.handler_args(), **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        # aiohttp's own server (after the app's start-up), rebuilt with our protocol.
        base = await super()._make_server()
        return GatewayServer(
            self.limits,
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            **base._kwargs,
        )


@dataclass(frozen=True, slots=True)
class Listener:
    """A second application and where it listens (the admin endpoints)."""

    app: web.Application
    host: str
    port: int


async def serve(
    app: web.Application,
    host: str,
    port: int,
    limits: ServerLimits,
    *,
    admin: Listener | None = None,
    access_log: logging.Logger | None = None,
    backlog: int = 1024,
    reuse_port: bool = False,
) -> None:
    """Serve ``app`` on ``host:port`` (and ``admin``, if any) until SIGINT / SIGTERM, then shut down gracefully.

    ``reuse_port``: bind the public port with SO_REUSEPORT, beside the other gateway
    processes of the same ``--processes`` group (the kernel spreads new connections)."""
    runner = GatewayRunner(
        app,
        limits,
        access_log=access_log,
        # A client that goes away cancels its handler, which closes the upstream request.
        handler_cancellation=True,
    )
    admin_runner = (
        GatewayRunner(admin.app, limits, access_log=access_log, handler_cancellation=True)
        if admin is not None
        else None
    )
    # The public application's start-up starts the gateway the admin one shares, so it goes first.
    await runner.setup()
    try:
        if admin_runner is not None and admin is not None:
            await admin_runner.setup()
            await web.TCPSite(admin_runner, admin.host, admin.port).start()
            log.info("admin endpoints (/debug/route, /metrics) on %s", _address(admin_runner))
        await web.TCPSite(runner, host, port, backlog=backlog, reuse_port=reuse_port or None).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
    finally:
        if admin_runner is not None:
            await admin_runner.cleanup()
        await runner.cleanup()


def _address(runner: web.AppRunner) -> str:
    """Where a started runner listens (its real port when asked for port 0)."""
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"
