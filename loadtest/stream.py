"""Per-request measurement of an OpenAI streaming response.

Owns the SSE parsing and the clock arithmetic: feed the raw body bytes as they
arrive with the time they arrived, and get a ``RequestRecord`` with the time to
the first *content* token (role-only or empty deltas do not count), the gaps
between content chunks (inter-token latency), end-to-end latency, the worker
named by the ``x-kvgate-worker`` header and the usage block (prompt, completion
and ``prompt_tokens_details.cached_tokens``) when the server sends one.

Pure: the HTTP clients (aiohttp in the bench driver, requests in locust) stay
at the edges and only call ``StreamObserver``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

WORKER_HEADER = "x-kvgate-worker"


@dataclass
class RequestRecord:
    workload: str
    user: int
    turn: int
    start_s: float  # send time, seconds after the run started
    status: int = 0  # HTTP status (0: no response)
    error: str | None = None
    worker: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunks: int = 0  # SSE events carrying content
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.ttft_s is not None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["itl_s"] = [round(x, 6) for x in self.itl_s]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RequestRecord:
        return cls(**d)


class StreamObserver:
    """Incremental SSE reader for one request; times are ``time.perf_counter()`` seconds."""

    def __init__(self, record: RequestRecord, sent_at: float):
        self.record = record
        self.sent_at = sent_at
        self.content: list[str] = []
        self._buf = b""
        self._last_token_at: float | None = None
        self.done = False

    def on_headers(self, status: int, headers: Any) -> None:
        self.record.status = status
        self.record.worker = headers.get(WORKER_HEADER)

    def feed(self, data: bytes, now: float) -> None:
        self._buf += data
        while True:
            cut = self._buf.find(b"\n")
            if cut < 0:
                return
            line, self._buf = self._buf[:cut].rstrip(b"\r"), self._buf[cut + 1 :]
            if line.startswith(b"data:"):
                self._event(line[5:].strip(), now)

    def _event(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            self.record.error = f"bad SSE payload: {payload[:80]!r}"
            return
        if not isinstance(chunk, dict):
            return
        if "error" in chunk:
            err = chunk["error"]
            self.record.error = str(err.get("message", err) if isinstance(err, dict) else err)
            return
        text = "".join(_choice_text(c) for c in chunk.get("choices") or ())
        if text:
            self.content.append(text)
            self.record.chunks += 1
            if self._last_token_at is None:
                self.record.ttft_s = now - self.sent_at
            else:
                self.record.itl_s.append(now - self._last_token_at)
            self._last_token_at = now
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.record.prompt_tokens = usage.get("prompt_tokens")
            self.record.completion_tokens = usage.get("completion_tokens")
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and details.get("cached_tokens") is not None:
                self.record.cached_tokens = details["cached_tokens"]

    def finish(self, now: float) -> RequestRecord:
        self.record.e2e_s = now - self.sent_at
        if self.record.status == 200 and self.record.error is None:
            if self.record.ttft_s is None:
                self.record.error = "stream carried no content"
            elif not self.done:
                self.record.error = "stream ended without [DONE]"
        return self.record

    def fail(self, error: str, now: float) -> RequestRecord:
        self.record.error = error
        self.record.e2e_s = now - self.sent_at
        return self.record

    def error_body(self, body: bytes) -> None:
        """A non-200 answer: keep the OpenAI error message."""
        try:
            msg = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = body[:200].decode(errors="replace")
        self.record.error = f"HTTP {self.record.status}: {msg}"

    @property
    def text(self) -> str:
        return "".join(self.content)


def _choice_text(choice: Any) -> str:
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta.get("content") or ""
    return choice.get("text") or ""
