"""Who may call the gateway: API keys on the OpenAI routes, the admin endpoints off the public
port and behind their own key, per-key rate limits with OpenAI's 429, and keys never logged.

In-process tests run the real server (``server.GatewayRunner``) for the public application
and, by default, a second one for the admin application, in front of the scripted worker of
test_gateway_hardening; one process test runs ``python -m kvgate.gateway`` as deployed.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from kvgate.dev.launch import free_port
from kvgate.gateway import auth
from kvgate.gateway.app import ADMIN_APP_KEY, CHAT, GATEWAY_KEY, build_app
from kvgate.gateway.auth import Access, Buckets, KeyRing
from kvgate.gateway.config import GatewayConfig, config_from_dict, load_config
from kvgate.gateway.server import GatewayRunner, ServerLimits
from tests.helpers import TINY_MODEL, python_module, until, wait_http
from tests.test_gateway_hardening import ScriptedWorker

KEY_A = "sk-kvgate-alpha-0123456789"
KEY_B = "sk-kvgate-beta-9876543210"
ADMIN = "adm-kvgate-secret-55555"
MESSAGES = [{"role": "user", "content": "hi"}]
CHAT_BODY = {"model": "kvgate-tiny", "messages": MESSAGES, "max_tokens": 1}


@dataclass
class Stack:
    worker: ScriptedWorker
    app: web.Application
    port: int
    admin_port: int | None
    runners: list[GatewayRunner]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        assert self.admin_port is not None, "admin endpoints are on the public port"
        return f"http://127.0.0.1:{self.admin_port}"

    def sample(self, name: str, **labels: str) -> float:
        return self.app[GATEWAY_KEY].metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """The gateway as ``server.serve`` runs it: the public application, and the admin one on its own port."""
    worker = ScriptedWorker()
    await worker.start()
    port, admin_port = free_port(), free_port()
    config = GatewayConfig(
        port=port,
        admin_port=admin_port,
        model=str(TINY_MODEL),
        workers=[{"id": "w0", "url": worker.url}],
        health_interval=0.2,
        load_interval=10.0,
        **getattr(request, "param", {}),
    )
    app = build_app(config)
    limits = ServerLimits.from_config(config)
    runners = [GatewayRunner(app, limits, handler_cancellation=True)]
    await runners[0].setup()
    await web.TCPSite(runners[0], "127.0.0.1", port).start()
    admin = app[ADMIN_APP_KEY]
    if admin is not None:
        runners.append(GatewayRunner(admin, limits, handler_cancellation=True))
        await runners[1].setup()
        await web.TCPSite(runners[1], config.admin_host, admin_port).start()
    await until(lambda: app[GATEWAY_KEY].fleet.up.get("w0"), "the scripted worker to be up")
    try:
        yield Stack(worker, app, port, admin_port if admin is not None else None, runners)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        await worker.stop()


async def call(
    method: str, url: str, body: dict[str, Any] | None = None, key: str | None = None, scheme: str = "Bearer"
) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"{scheme} {key}"} if key is not None else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, json=body, headers=headers) as response:
            raw = await response.read()
            try:
                payload: Any = orjson.loads(raw)
            except orjson.JSONDecodeError:
                payload = raw.decode()
            return response.status, dict(response.headers), payload


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


INVALID_KEY = {"type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


# --- API keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", [{"api_keys": [KEY_A, KEY_B]}], indirect=True)
async def test_openai_routes_answer_401_without_a_configured_key_and_forward_with_one(stack: Stack) -> None:
    for key, scheme in ((None, "Bearer"), ("sk-wrong", "Bearer"), (KEY_A[:-1], "Bearer"), (KEY_A, "Basic")):
        for method, path, body in (("POST", CHAT, CHAT_BODY), ("POST", "/v1/completions", {"prompt": "x"})):
            status, headers, payload = await call(method, stack.url + path, body, key, scheme)
            assert status == 401, (key, scheme, path)
            assert payload["error"] == {**INVALID_KEY, "message": payload["error"]["message"]}
            assert "Authorization: Bearer" in payload["error"]["message"]
            assert headers["x-kvgate-worker"] == "none"
        status, _, payload = await call("GET", stack.url + "/v1/models", key=key, scheme=scheme)
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"
    assert stack.worker.bodies == []  # nothing reached the worker
    assert stack.sample("kvgate_requests_total", route=CHAT, status="401", worker="none") == 4

    for key in (KEY_A, KEY_B):
        status, headers, _ = await call("POST", stack.url + CHAT, CHAT_BODY, key)
        assert status == 200 and headers["x-kvgate-worker"] == "w0"
        status, _, models = await call("GET", stack.url + "/v1/models", key=key)
        assert status == 200 and models["data"][0]["id"] == "kvgate-tiny"
    # The client's Authorization goes to the worker unchanged (vLLM may check its own key).
    assert [h["Authorization"] for h in stack.worker.headers] == [f"Bearer {KEY_A}", f"Bearer {KEY_B}"]
    # /health stays open: load balancers probe it without a key.
    status, _, health = await call("GET", stack.url + "/health")
    assert status == 200 and health == {"status": "ok", "workers": {"w0": True}}


@pytest.mark.parametrize("stack", [{"api_keys": [KEY_A]}], indirect=True)
async def test_the_openai_sdk_authenticates_with_api_key(stack: Stack) -> None:
    good = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key=KEY_A, max_retries=0)
    answer = await good.chat.completions.create(model="kvgate-tiny", messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
    assert answer.id == "c"
    assert [m.id for m in (await good.models.list()).data] == ["kvgate-tiny"]
    assert (await good.models.retrieve("kvgate-tiny")).id == "kvgate-tiny"
    # The SDK refuses to send no key at all: an unknown one is what a keyless client sends.
    for key in ("sk-not-configured", KEY_B):
        bad = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as raised:
            await bad.chat.completions.create(model="kvgate-tiny", messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
        assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await bad.models.retrieve("kvgate-tiny")


async def test_without_keys_the_openai_routes_stay_open(stack: Stack) -> None:
    status, _, _ = await call("POST", stack.url + CHAT, CHAT_BODY)
    assert status == 200
    status, _, _ = await call("POST", stack.url + CHAT, CHAT_BODY, "anything")
    assert status == 200


def test_keys_come_from_flags_yaml_env_and_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"# team keys\n\n  {KEY_A}  \n# revoked: sk-old\n{KEY_B}\n")
    config = load_config(["--api-key-file", str(key_file)], environ={"KVGATE_API_KEYS": "env-one, env-two,"})
    assert config.api_keys == ["env-one", "env-two"]
    access = Access.from_config(config)
    for key in ("env-one", "env-two", KEY_A, KEY_B):
        assert access.client(f"Bearer {key}", "10.0.0.1").startswith("key#")
    for key in ("sk-old", "# team keys", "", "env-one,env-two"):
        with pytest.raises(auth.ApiError):
            access.client(f"Bearer {key}", "10.0.0.1")
    # Flags replace the environment's list (flags win); YAML takes a list.
    assert load_config(["--api-key", "f1", "--api-key", "f2"], environ={"KVGATE_API_KEYS": "e"}).api_keys == [
        "f1",
        "f2",
    ]
    yaml_file = tmp_path / "gateway.yaml"
    yaml_file.write_text(f"api_keys: [{KEY_A}]\nadmin_key_file: {tmp_path / 'admin'}\n")
    (tmp_path / "admin").write_text(ADMIN + "\n")
    config = load_config(["--config", str(yaml_file)], environ={})
    access = Access.from_config(config)
    assert access.client(f"Bearer {KEY_A}", None) == "key#0"
    assert access.admin_allowed(f"Bearer {ADMIN}") and not access.admin_allowed(f"Bearer {KEY_A}")
    assert load_config([], environ={"KVGATE_ADMIN_KEY": ADMIN}).admin_key == ADMIN
    # Nothing that prints a configuration or the keys shows one.
    shown = repr(config) + repr(access) + repr(load_config([], environ={"KVGATE_ADMIN_KEY": ADMIN}))
    assert KEY_A not in shown and ADMIN not in shown
    with pytest.raises(ValueError) as bad:
        config_from_dict({"admin_key": 12345678})
    assert "12345678" not in str(bad.value)
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        Access.from_config(GatewayConfig(api_key_file=str(empty)))


def test_a_key_ring_checks_digests_of_every_key() -> None:
    ring = KeyRing([KEY_A, KEY_B])
    assert ring.match(f"Bearer {KEY_B}") == 1 and ring.match(f"bearer  {KEY_A} ") == 0
    for header in (None, "", "Bearer", "Bearer ", KEY_A, f"Token {KEY_A}", f"Bearer {KEY_A}x", f"Bearer {KEY_A[:8]}"):
        assert ring.match(header) is None, header
    assert KEY_A not in repr(ring) and KeyRing([]).match(f"Bearer {KEY_A}") is None


# --- admin endpoints ---------------------------------------------------------------------------


async def test_admin_paths_are_off_the_public_port_by_default(stack: Stack) -> None:
    for method, path in (("GET", "/metrics"), ("POST", "/debug/route")):
        status, _, payload = await call(method, stack.url + path, CHAT_BODY if method == "POST" else None)
        assert status == 404 and payload["error"]["code"] == "not_found", path
    status, _, text = await call("GET", stack.admin_url + "/metrics")
    assert status == 200 and "kvgate_requests_total" in text
    status, headers, explained = await call("POST", stack.admin_url + "/debug/route", CHAT_BODY)
    assert status == 200 and explained["chosen"] == "w0" and headers["x-kvgate-worker"] == "w0"
    # The OpenAI routes are not on the admin listener.
    status, _, _ = await call("POST", stack.admin_url + CHAT, CHAT_BODY)
    assert status == 404
    # /health on the public port: up/down per worker, nothing more; the detail is the admin listener's.
    status, _, health = await call("GET", stack.url + "/health")
    assert status == 200 and health == {"status": "ok", "workers": {"w0": True}}
    status, _, health = await call("GET", stack.admin_url + "/health")
    assert status == 200 and health == {"status": "ok", "workers": {"w0": True}, "events": {"w0": "none"}}


@pytest.mark.parametrize("stack", [{"api_keys": [KEY_A], "admin_key": ADMIN}], indirect=True)
async def test_an_api_key_does_not_open_the_cache_side_channel(stack: Stack) -> None:
    for key in (None, KEY_A, "wrong"):
        status, _, payload = await call("POST", stack.admin_url + "/debug/route", CHAT_BODY, key)
        assert status == 401 and payload["error"] == {**INVALID_KEY, "message": payload["error"]["message"]}
        status, _, _ = await call("GET", stack.admin_url + "/metrics", key=key)
        assert status == 401
    status, _, explained = await call("POST", stack.admin_url + "/debug/route", CHAT_BODY, ADMIN)
    assert status == 200 and explained["prompt_tokens"] > 0
    status, _, text = await call("GET", stack.admin_url + "/metrics", key=ADMIN)
    assert status == 200 and "kvgate_requests_total" in text
    # The admin key is not an API key either.
    status, _, _ = await call("POST", stack.url + CHAT, CHAT_BODY, ADMIN)
    assert status == 401
    # /health: public everywhere, never a 401; its detail only with the admin key.
    status, _, health = await call("GET", stack.admin_url + "/health", key=KEY_A)
    assert status == 200 and "events" not in health
    status, _, health = await call("GET", stack.admin_url + "/health", key=ADMIN)
    assert status == 200 and health["events"] == {"w0": "none"}


@pytest.mark.parametrize(
    "stack", [{"api_keys": [KEY_A], "admin_key": ADMIN, "admin_on_public_port": True}], indirect=True
)
async def test_admin_on_public_port_still_requires_the_admin_key(stack: Stack) -> None:
    assert stack.admin_port is None
    status, _, _ = await call("POST", stack.url + "/debug/route", CHAT_BODY, KEY_A)
    assert status == 401
    status, _, _ = await call("GET", stack.url + "/metrics", key=KEY_A)
    assert status == 401
    status, _, explained = await call("POST", stack.url + "/debug/route", CHAT_BODY, ADMIN)
    assert status == 200 and explained["chosen"] == "w0"
    status, _, _ = await call("GET", stack.url + "/metrics", key=ADMIN)
    assert status == 200


# --- rate limits -------------------------------------------------------------------------------


def assert_rate_limited(status: int, headers: dict[str, str], payload: Any, budget: str) -> int:
    assert status == 429, payload
    assert payload["error"]["type"] == budget and payload["error"]["code"] == "rate_limit_exceeded"
    assert payload["error"]["param"] is None and payload["error"]["message"].startswith("Rate limit reached for")
    retry_after = headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) > 0
    return int(retry_after)


@pytest.mark.parametrize("stack", [{"api_keys": [KEY_A, KEY_B], "rate_limit_requests": 3}], indirect=True)
async def test_the_request_budget_is_per_key(stack: Stack) -> None:
    for _ in range(3):
        status, _, _ = await call("POST", stack.url + CHAT, CHAT_BODY, KEY_A)
        assert status == 200
    status, headers, payload = await call("POST", stack.url + CHAT, CHAT_BODY, KEY_A)
    # 3 a minute: one request back every 20 s.
    assert assert_rate_limited(status, headers, payload, "requests") <= 20
    status, headers, payload = await call("GET", stack.url + "/v1/models", key=KEY_A)
    assert_rate_limited(status, headers, payload, "requests")
    status, _, _ = await call("POST", stack.url + CHAT, CHAT_BODY, KEY_B)
    assert status == 200
    assert len(stack.worker.bodies) == 4
    assert stack.sample("kvgate_rate_limited_total", reason="requests") == 2
    assert stack.sample("kvgate_requests_total", route=CHAT, status="429", worker="none") == 1


@pytest.mark.parametrize("stack", [{"rate_limit_requests": 1}], indirect=True)
async def test_without_keys_the_budget_is_per_client_address(stack: Stack) -> None:
    status, _, _ = await call("POST", stack.url + CHAT, CHAT_BODY)
    assert status == 200
    status, headers, payload = await call("POST", stack.url + CHAT, CHAT_BODY, KEY_A)
    assert_rate_limited(status, headers, payload, "requests")


@pytest.mark.parametrize("stack", [{"api_keys": [KEY_A, KEY_B], "rate_limit_tokens": 1000}], indirect=True)
async def test_the_prompt_token_budget_counts_tokenized_prompts_per_key(stack: Stack) -> None:
    gateway = stack.app[GATEWAY_KEY]
    messages = [{"role": "user", "content": " ".join(f"word{i}" for i in range(170))}]
    tokens = len(await gateway.preprocessor.encode_chat_async(messages))
    assert 500 < tokens < 1000  # one fits the budget, two do not
    body = {**CHAT_BODY, "messages": messages}
    status, _, _ = await call("POST", stack.url + CHAT, body, KEY_A)
    assert status == 200
    status, headers, payload = await call("POST", stack.url + CHAT, body, KEY_A)
    assert_rate_limited(status, headers, payload, "tokens")
    assert "prompt tokens per minute (limit: 1000)" in payload["error"]["message"]
    status, _, _ = await call("POST", stack.url + CHAT, CHAT_BODY, KEY_A)  # a short one still fits
    assert status == 200
    status, _, _ = await call("POST", stack.url + CHAT, body, KEY_B)
    assert status == 200
    assert stack.sample("kvgate_rate_limited_total", reason="tokens") == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_buckets_refill_expire_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    buckets = Buckets(6, clock=clock)  # one back every 10 s
    assert [buckets.take("a", 1) for _ in range(6)] == [0.0] * 6
    assert buckets.take("a", 1) == pytest.approx(10.0)
    clock.now += 5
    assert buckets.take("a", 1) == pytest.approx(5.0)
    clock.now += 5
    assert buckets.take("a", 1) == 0.0
    # Larger than the bucket: passes on a full bucket, then the debt must be paid back.
    assert buckets.take("big", 20) == 0.0
    assert buckets.take("big", 1) == pytest.approx(150.0)
    # Refilled buckets are forgotten: memory follows the clients active in the last window.
    clock.now += 60
    assert buckets.take("c", 1) == 0.0 and len(buckets) == 2  # "big" still owes, "a" is full
    clock.now += 200
    buckets.take("c", 1)
    assert len(buckets) == 1
    monkeypatch.setattr(auth, "MAX_CLIENTS", 3)
    for i in range(10):
        buckets.take(f"addr{i}", 1)
    assert len(buckets) == 3


# --- secrets stay out of logs -------------------------------------------------------------------


@pytest.mark.parametrize("stack", [{"api_keys": [KEY_A], "admin_key": ADMIN, "rate_limit_requests": 2}], indirect=True)
async def test_keys_never_reach_the_log(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for key in (KEY_A, KEY_B, ADMIN, None):
        await call("POST", stack.url + CHAT, CHAT_BODY, key)
        await call("POST", stack.admin_url + "/debug/route", CHAT_BODY, key)
    await call("POST", stack.url + CHAT, CHAT_BODY, KEY_A)  # over its budget: a 429
    assert caplog.records
    text = "\n".join(r.getMessage() + repr(r.args) for r in caplog.records)
    for secret in (KEY_A, KEY_B, ADMIN):
        assert secret not in text


@pytest.mark.slow
@pytest.mark.e2e
def test_the_gateway_process_serves_admin_paths_on_their_own_listener(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    key_file = tmp_path / "keys"
    key_file.write_text(f"{KEY_A}\n")
    (tmp_path / "admin").write_text(ADMIN)
    proc = python_module(
        "kvgate.gateway",
        "--host",
        "0.0.0.0",
        "--port",
        port,
        "--admin-port",
        admin_port,
        "--model",
        TINY_MODEL,
        "--api-key-file",
        key_file,
        "--admin-key-file",
        tmp_path / "admin",
        "--log-level",
        "debug",
        "--access-log",
        log_path=tmp_path / "gateway.log",
        env={"KVGATE_API_KEYS": KEY_B},
    )
    try:
        # No workers: /health says 503, the routes still authenticate first.
        wait_http(f"http://127.0.0.1:{port}/health", timeout=60, proc=proc, status=503)

        def status_of(url: str, key: str | None = None, data: bytes | None = None) -> int:
            headers = {**(bearer(key) if key else {}), "Content-Type": "application/json"}
            request = urllib.request.Request(url, data=data, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as err:
                return err.code

        body = json.dumps(CHAT_BODY).encode()
        assert status_of(f"http://127.0.0.1:{port}/metrics", ADMIN) == 404
        assert status_of(f"http://127.0.0.1:{port}/debug/route", ADMIN, body) == 404
        assert status_of(f"http://127.0.0.1:{admin_port}/metrics") == 401
        assert status_of(f"http://127.0.0.1:{admin_port}/metrics", KEY_A) == 401
        assert status_of(f"http://127.0.0.1:{admin_port}/metrics", ADMIN) == 200
        assert status_of(f"http://127.0.0.1:{port}{CHAT}", None, body) == 401
        # Keys from the file and from KVGATE_API_KEYS both pass (then no worker: 503).
        assert status_of(f"http://127.0.0.1:{port}{CHAT}", KEY_A, body) == 503
        assert status_of(f"http://127.0.0.1:{port}/v1/models", KEY_B) == 200
    finally:
        proc.stop()
    log = proc.log()
    assert f"admin endpoints (/debug/route, /metrics) on http://127.0.0.1:{admin_port}" in log
    for secret in (KEY_A, KEY_B, ADMIN):
        assert secret not in log


@pytest.mark.slow
@pytest.mark.e2e
def test_an_open_gateway_on_a_public_address_warns_at_start_up(tmp_path: Path) -> None:
    port = free_port()
    proc = python_module(
        "kvgate.gateway",
        "--host",
        "0.0.0.0",
        "--port",
        port,
        "--admin-host",
        "0.0.0.0",
        "--admin-port",
        0,
        "--model",
        TINY_MODEL,
        log_path=tmp_path / "gateway.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=60, proc=proc, status=503)
    finally:
        proc.stop()
    log = proc.log()
    assert "WARNING kvgate.gateway.auth: listening on 0.0.0.0 without API keys" in log
    assert "served on 0.0.0.0 without an admin key" in log
