"""OpenAI-style error responses: the one shape every gateway failure takes.

Owns ``ApiError`` (raised anywhere in a handler) and its JSON rendering
``{"error": {"message", "type", "param", "code"}}``, the shape the OpenAI SDK
parses, also as raw HTTP/1.1 bytes for the server's answers outside any request
(``raw_response``), and the mapping of aiohttp's parser rejections to it. It never
decides *when* a request fails; handlers, the server and the upstream client do.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError, LineTooLong

WORKER_HEADER = "x-kvgate-worker"
NO_WORKER = "none"
# Every answer's Server header: no library or Python version for a scanner to match.
SERVER_NAME = "kvgate"


class ApiError(Exception):
    """A request failure with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers: dict[str, str] = {}
        """Extra answer headers (``Retry-After`` on a 429)."""
        self.close = False
        """Answer with ``Connection: close`` and end the connection: the request's body could not be
        read to its end (broken encoding or framing, too slow, too large), so the next bytes on it
        are not a request a client could rely on."""

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )

    def response(self, worker: str | None = None) -> web.Response:
        headers = dict(self.headers)
        if worker is not None:
            headers[WORKER_HEADER] = worker
        response = web.Response(status=self.status, body=self.body(), content_type="application/json", headers=headers)
        if self.close:
            response.force_close()
        return response

    def raw_response(self) -> bytes:
        """The whole HTTP/1.1 answer, for a connection that gets it and is closed (no request object)."""
        body = self.body()
        head = (
            f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\nServer: {SERVER_NAME}\r\n{WORKER_HEADER}: {NO_WORKER}\r\n\r\n"
        )
        return head.encode("ascii") + body


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _closing(error: ApiError) -> ApiError:
    error.close = True
    return error


def body_too_large(limit: int) -> ApiError:
    return _closing(ApiError(413, f"Request body exceeds the {limit}-byte limit.", code="request_too_large"))


def no_worker_available(detail: str = "no worker is available to serve this request") -> ApiError:
    return ApiError(503, detail, type="service_unavailable_error", code="no_worker_available")


def too_many_messages(count: int, limit: int) -> ApiError:
    return ApiError(
        400,
        f"The request has {count} messages; this gateway accepts at most {limit} per request (max_messages).",
        param="messages",
        code="too_many_messages",
    )


def body_undecodable(detail: str) -> ApiError:
    return _closing(ApiError(400, f"The request body cannot be read: {detail}.", code="invalid_body"))


def body_timeout(seconds: float) -> ApiError:
    return _closing(
        ApiError(408, f"The request body did not arrive within {seconds:g}s (body_timeout).", code="request_timeout")
    )


def header_timeout(seconds: float) -> ApiError:
    return ApiError(
        408, f"The request headers did not arrive within {seconds:g}s (header_timeout).", code="request_timeout"
    )


def too_many_connections(limit: int) -> ApiError:
    return ApiError(
        503,
        f"The gateway is at its limit of {limit} open connections (max_connections); retry later.",
        type="service_unavailable_error",
        code="too_many_connections",
    )


def internal_error() -> ApiError:
    return ApiError(500, "Internal gateway error; see the gateway log.", type="server_error", code="internal_error")


def upstream_failed(detail: str) -> ApiError:
    return ApiError(502, detail, type="upstream_error", code="bad_gateway")


def upstream_timeout(detail: str) -> ApiError:
    return ApiError(504, detail, type="timeout_error", code="upstream_timeout")


def from_http_exception(exc: web.HTTPException) -> ApiError:
    """aiohttp's own rejections (no route, wrong method, body too large) in OpenAI shape."""
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return ApiError(exc.status, exc.reason if not exc.text else exc.text, type=kind, code=code)


def from_parser_error(exc: HttpProcessingError, max_header_size: int, max_headers: int) -> ApiError:
    """A request aiohttp's parser refused, in OpenAI shape; the message never echoes the client's bytes."""
    if isinstance(exc, LineTooLong):
        return ApiError(
            431,
            f"A request line or header field is longer than {max_header_size} bytes (max_header_size).",
            code="request_header_fields_too_large",
        )
    if isinstance(exc, ContentEncodingError) and "Can not decode content-encoding" in exc.message:
        # A compression this build cannot decode (zstd without its library): the client can send it otherwise.
        return ApiError(
            415,
            "The request's Content-Encoding is not supported here; send the body uncompressed, gzip or deflate.",
            code="unsupported_content_encoding",
        )
    # aiohttp's messages quote the offending bytes and point at them with a caret: keep only the words.
    words = [
        line.strip().rstrip(":")
        for line in exc.message.splitlines()
        if line.strip() and not line.strip().startswith(("b'", 'b"', "bytearray(", "^"))
    ]
    summary = "; ".join(words)[:200] or "unparseable request"
    if summary.startswith("Too many headers"):
        return ApiError(
            431,
            f"The request has more than {max_headers} header fields (max_headers).",
            code="request_header_fields_too_large",
        )
    status = exc.code if 400 <= exc.code < 500 else 400
    return ApiError(status, f"Malformed HTTP request: {summary}.", code="malformed_request")
