"""End to end: failing workers. Retries on the next-best worker, 502 / 504, a worker killed mid-run.

Besides two ``worker.sim`` processes, a broken worker runs here: a real HTTP server on
loopback that is healthy but answers chat with 500 and completions too slowly.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from aiohttp import web

from kvgate.dev.launch import free_port
from tests.helpers import wait_http, wait_until
from tests.test_e2e_gateway import (
    MODEL,
    Gateway,
    Worker,
    conversation,
    explain,
    get,
    metric,
    metrics,
    post,
    start_gateway,
    start_worker,
    stop_all,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SLOW_SECONDS = 3.0
# The message that makes the broken worker send half a whole answer and drop the connection.
HALF_BODY = "half an answer, please"


class BrokenWorker:
    """Healthy on /health; chat: 500, a stream that breaks off, or half a whole answer (HALF_BODY);
    completions: silent for SLOW_SECONDS."""

    def __init__(self) -> None:
        self.port = free_port()
        self.chat_calls = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/health", self._ok)
        app.router.add_get("/metrics", self._ok)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._slow)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.chat_calls += 1
        payload = await request.json()
        if payload["messages"][-1]["content"] == HALF_BODY:
            # A whole answer's head and the start of its body, then the engine dies.
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = 1000
            await response.prepare(request)
            await response.write(b'{"id":"chatcmpl-half","object":"chat.completion","choices":[')
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return response
        if not payload.get("stream"):
            return web.json_response({"error": {"message": "engine crashed"}}, status=500)
        # A stream that starts, then the engine dies: one event, and the connection drops.
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n')
        await asyncio.sleep(0.05)
        request.transport.close()
        return response

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(SLOW_SECONDS)
        return web.json_response({"choices": []})


@dataclass
class Stack:
    w0: Worker
    w1: Worker
    broken: BrokenWorker
    retry: Gateway  # broken worker + w0
    bad: Gateway  # broken worker only, short read timeout
    kill: Gateway  # w0 + w1; only failed forwards detect a dead worker


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("e2e-failover")
    broken = BrokenWorker()
    broken.start()
    w0, w1 = start_worker("w0", log_dir), start_worker("w1", log_dir)
    procs = [w0.proc, w1.proc]
    try:
        for w in (w0, w1):
            wait_http(w.url + "/health", timeout=60, proc=w.proc)
        broken_flag = f"--worker=id=a-broken,url={broken.url}"
        retry = start_gateway("retry", log_dir, broken_flag, w0.flag())
        bad = start_gateway("bad", log_dir, broken_flag, "--read-timeout", "1")
        # A long health interval: after start-up only a failed forward can notice a dead worker.
        kill = start_gateway("kill", log_dir, w0.flag(), w1.flag(), "--health-interval", "60")
        procs += [retry.proc, bad.proc, kill.proc]
        for g in (retry, bad, kill):
            wait_http(g.url + "/health", timeout=60, proc=g.proc)
        for g in (retry, kill):
            wait_until(
                lambda g=g: all(json.loads(get(g.url + "/health")[2])["workers"].values()), what="all workers up"
            )
        yield Stack(w0, w1, broken, retry, bad, kill)
    finally:
        stop_all(*procs)
        broken.stop()


def test_5xx_before_first_byte_retries_on_the_next_best_worker(stack: Stack) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    # Idle tie: the smallest worker id, the broken one, ranks first and w0 second.
    assert explain(stack.retry, body)["ranked"] == ["a-broken", "w0"]
    calls = stack.broken.chat_calls
    status, headers, payload = post(stack.retry.url + "/v1/chat/completions", body)
    assert status == 200, payload
    assert headers["x-kvgate-worker"] == "w0"
    assert stack.broken.chat_calls == calls + 1
    text = metrics(stack.retry.url)
    assert metric(text, "kvgate_upstream_retries_total", worker="a-broken", reason="status") >= 1
    assert metric(text, "kvgate_requests_total", status="200", worker="w0") >= 1


def test_a_worker_dropping_a_whole_answer_midway_is_retried_on_the_next_worker(stack: Stack) -> None:
    # Nothing of a whole (non-streamed) answer reaches the client before all of it arrived, so a
    # worker that dies after its status line is retried like one that dies before it.
    body = {"model": MODEL, "messages": [{"role": "user", "content": HALF_BODY}], "max_tokens": 4}
    # Equal costs go to the worker chosen least recently: a request to w0 puts the broken one first.
    if explain(stack.retry, body)["ranked"][0] == "w0":
        hello = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
        assert post(stack.retry.url + "/v1/chat/completions", hello)[1]["x-kvgate-worker"] == "w0"
    assert explain(stack.retry, body)["ranked"] == ["a-broken", "w0"]
    calls = stack.broken.chat_calls
    status, headers, payload = post(stack.retry.url + "/v1/chat/completions", body)
    assert status == 200, payload
    assert headers["x-kvgate-worker"] == "w0"
    assert json.loads(payload)["choices"][0]["message"]["content"]
    assert stack.broken.chat_calls == calls + 1
    text = metrics(stack.retry.url)
    assert metric(text, "kvgate_upstream_retries_total", worker="a-broken", reason="disconnect") == 1
    # With no other worker to try, it is a 502 naming the worker, never half a body.
    status, headers, payload = post(stack.bad.url + "/v1/chat/completions", body)
    assert status == 502 and headers["x-kvgate-worker"] == "a-broken"
    error = json.loads(payload)["error"]
    assert error["code"] == "bad_gateway" and "worker a-broken dropped the connection" in error["message"]


def test_upstream_failure_is_502_and_timeout_504(stack: Stack) -> None:
    status, headers, payload = post(
        stack.bad.url + "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 502 and headers["x-kvgate-worker"] == "a-broken"
    assert json.loads(payload)["error"]["code"] == "bad_gateway"
    status, headers, payload = post(stack.bad.url + "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 504 and headers["x-kvgate-worker"] == "a-broken"
    assert json.loads(payload)["error"]["code"] == "upstream_timeout"
    assert get(stack.bad.url + "/health")[0] == 200


def test_stream_broken_after_the_first_byte_ends_with_an_error_event(stack: Stack) -> None:
    status, headers, payload = post(
        stack.bad.url + "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True},
    )
    assert status == 200 and headers["x-kvgate-worker"] == "a-broken"
    events = [e[6:] for e in payload.decode().split("\n\n") if e.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "Hi"
    # vLLM's ending of a failed stream: the error event, then [DONE].
    assert json.loads(events[-2])["error"]["code"] == 502 and events[-1] == "[DONE]"
    assert metric(metrics(stack.bad.url), "kvgate_stream_failures_total", worker="a-broken") == 1


def test_worker_killed_mid_run_is_routed_around(stack: Stack) -> None:
    # The conversation's prefix lives on w1 (turn 1 sent to it directly), so kv routes there.
    first = conversation("geology")
    assert post(stack.w1.url + "/v1/chat/completions", {"model": MODEL, "messages": first, "max_tokens": 4})[0] == 200
    body = {
        "model": MODEL,
        "messages": first + [{"role": "user", "content": "more"}],
        "max_tokens": 30,
        "ignore_eos": True,
    }
    wait_until(lambda: explain(stack.kill, body)["chosen"] == "w1", what="w1's prefix in the index")

    results: list[tuple[int, str]] = []
    killed = threading.Event()
    after_kill: list[tuple[int, str]] = []

    def client() -> None:
        # Each client keeps sending until enough requests have completed after the kill.
        while len(after_kill) < 30:
            status, headers, _ = post(stack.kill.url + "/v1/chat/completions", body)
            outcome = (status, headers.get("x-kvgate-worker", "?"))
            (after_kill if killed.is_set() else results).append(outcome)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client) for _ in range(4)]
        wait_until(lambda: len(results) >= 8, what="requests flowing before the kill")
        stack.w1.proc.kill(signal.SIGKILL)
        killed.set()
        for f in futures:
            f.result()

    assert "w1" in {w for _, w in results}, results
    # Requests in flight at the kill and after it were all served: by w0, after a retry if needed.
    failed = [outcome for outcome in results + after_kill if outcome[0] != 200]
    assert not failed, failed
    assert after_kill[-1][1] == "w0"
    text = metrics(stack.kill.url)
    assert metric(text, "kvgate_upstream_retries_total", worker="w1") >= 1
    assert metric(text, "kvgate_worker_up", worker="w1") == 0
    assert json.loads(get(stack.kill.url + "/health")[2])["workers"] == {"w0": True, "w1": False}
