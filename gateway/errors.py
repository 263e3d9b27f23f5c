"""OpenAI-style error responses: the one shape every gateway failure takes.

Owns ``ApiError`` (raised anywhere in a handler) and its JSON rendering
``{"error": {"message", "type", "param", "code"}}``, the shape the OpenAI SDK
parses. It never decides *when* a request fails; handlers and the upstream client do.
"""

from __future__ import annotations

import orjson
from aiohttp import web

WORKER_HEADER = "x-kvgate-worker"
NO_WORKER = "none"


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

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )

    def response(self, worker: str | None = None) -> web.Response:
        headers = {WORKER_HEADER: worker} if worker is not None else None
        return web.Response(status=self.status, body=self.body(), content_type="application/json", headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body exceeds the {limit}-byte limit.", code="request_too_large")


def no_worker_available(detail: str = "no worker is available to serve this request") -> ApiError:
    return ApiError(503, detail, type="service_unavailable_error", code="no_worker_available")


def upstream_failed(detail: str) -> ApiError:
    return ApiError(502, detail, type="upstream_error", code="bad_gateway")


def upstream_timeout(detail: str) -> ApiError:
    return ApiError(504, detail, type="timeout_error", code="upstream_timeout")


def from_http_exception(exc: web.HTTPException) -> ApiError:
    """aiohttp's own rejections (no route, wrong method, body too large) in OpenAI shape."""
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return ApiError(exc.status, exc.reason if not exc.text else exc.text, type=kind, code=code)
