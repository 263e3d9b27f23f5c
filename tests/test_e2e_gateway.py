"""End to end over real HTTP: simulated workers, real gateway processes, the OpenAI SDK.

One stack per module: two ``worker.sim`` processes publishing KV events, a ``kv`` gateway
and a ``round-robin`` gateway in front of them (plus, on demand, a gateway whose only
worker is down). The stack helpers here are reused by ``test_e2e_failover``.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from kvgate.dev.launch import free_port
from tests.helpers import TINY_MODEL, Proc, python_module, wait_http, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "kvgate-tiny"
CONTEXT = 8192
BODY_LIMIT = 1 << 20
LORA = "sql-lora"


# -- stack helpers (shared with test_e2e_failover) ----------------------------------------


@dataclass
class Worker:
    worker_id: str
    port: int
    events: int
    replay: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def flag(self) -> str:
        return (
            f"--worker=id={self.worker_id},url={self.url},kv_events_endpoint=tcp://127.0.0.1:{self.events},"
            f"kv_events_replay_endpoint=tcp://127.0.0.1:{self.replay}"
        )


@dataclass
class Gateway:
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def start_worker(worker_id: str, log_dir: Path, *extra: str) -> Worker:
    port, events, replay = free_port(), free_port(), free_port()
    proc = python_module(
        "kvgate.worker.sim",
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--model-dir",
        TINY_MODEL,
        "--max-model-len",
        CONTEXT,
        "--kv-events-endpoint",
        f"tcp://*:{events}",
        "--kv-events-replay-endpoint",
        f"tcp://*:{replay}",
        *extra,
        log_path=log_dir / f"{worker_id}.log",
    )
    return Worker(worker_id, port, events, replay, proc)


def start_gateway(name: str, log_dir: Path, *flags: str) -> Gateway:
    port = free_port()
    proc = python_module(
        "kvgate.gateway",
        "--port",
        port,
        "--model",
        TINY_MODEL,
        "--context-length",
        CONTEXT,
        "--health-interval",
        "0.5",
        "--load-interval",
        "0.5",
        # The tests read /metrics and /debug/route where they send requests.
        "--admin-on-public-port",
        *flags,
        log_path=log_dir / f"gateway-{name}.log",
    )
    return Gateway(port, proc)


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post(url: str, body: bytes | dict, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


def metrics(base_url: str) -> str:
    return get(base_url + "/metrics")[2].decode()


def stop_all(*procs: Proc) -> None:
    for proc in procs:
        proc.stop()


def conversation(topic: str, turns: int = 1) -> list[dict[str, str]]:
    """A chat whose system prompt spans several 64-token blocks and is unique to ``topic``."""
    system = f"You are the {topic} assistant. " + " ".join(f"{topic} fact {i} is worth remembering." for i in range(60))
    messages = [{"role": "system", "content": system}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t} about {topic}?"})
    return messages


def explain(gateway: Gateway, body: dict) -> dict:
    status, headers, payload = post(gateway.url + "/debug/route", body)
    assert status == 200, payload
    return json.loads(payload)


def overlap_of(explained: dict, worker_id: str) -> dict:
    return next(c["overlap"] for c in explained["candidates"] if c["worker_id"] == worker_id)


# -- the stack -----------------------------------------------------------------------------


@dataclass
class Stack:
    workers: dict[str, Worker]
    kv: Gateway
    rr: Gateway


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("e2e-gateway")
    workers = {wid: start_worker(wid, log_dir) for wid in ("w0", "w1")}
    procs = [w.proc for w in workers.values()]
    try:
        for w in workers.values():
            wait_http(w.url + "/health", timeout=60, proc=w.proc)
        flags = [w.flag() for w in workers.values()]
        kv = start_gateway(
            "kv", log_dir, "--router-mode", "kv", "--client-max-size", BODY_LIMIT, "--lora-adapter", LORA, *flags
        )
        rr = start_gateway("rr", log_dir, "--router-mode", "round-robin", *flags)
        procs += [kv.proc, rr.proc]
        for g in (kv, rr):
            wait_http(g.url + "/health", timeout=60, proc=g.proc)
            # Ready means every worker up, not just one: the tests below count on both.
            wait_until(
                lambda g=g: all(json.loads(get(g.url + "/health")[2])["workers"].values()), what="all workers up"
            )
        yield Stack(workers, kv, rr)
    finally:
        stop_all(*procs)


# -- the OpenAI SDK, unchanged ---------------------------------------------------------------


def test_sdk_chat(stack: Stack) -> None:
    raw = stack.kv.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say something."}], max_tokens=8
    )
    completion = raw.parse()
    assert raw.headers["x-kvgate-worker"] in stack.workers
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens <= 8
    assert completion.usage.prompt_tokens > 0


def test_sdk_chat_stream(stack: Stack) -> None:
    raw = stack.kv.client().chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Stream something."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-kvgate-worker"] in stack.workers
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_sdk_completions(stack: Stack) -> None:
    client = stack.kv.client()
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6)
    assert completion.choices[0].text
    from_ids = client.completions.create(model=MODEL, prompt=[11, 12, 13, 14], max_tokens=3)
    assert from_ids.usage.prompt_tokens == 4
    streamed = list(client.completions.create(model=MODEL, prompt="Stream a story", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices)


def test_sdk_n_choices_and_batches_of_prompts_through_the_gateway(stack: Stack) -> None:
    """n > 1 and a batch of prompts reach one worker and come back whole, streamed or not, as vLLM answers them."""
    client = stack.kv.client()
    messages = [{"role": "user", "content": "Two versions, please."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=6)
    assert [c.index for c in whole.choices] == [0, 1] and all(c.message.content for c in whole.choices)
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=6, stream=True))
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]
    batch = client.completions.create(model=MODEL, prompt=["Once upon a time", "In a far land"], n=2, max_tokens=3)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    single = client.completions.create(model=MODEL, prompt="In a far land", max_tokens=3)
    assert batch.choices[2].text == single.choices[0].text
    by_ids = client.completions.create(model=MODEL, prompt=[[11, 12, 13, 14], [15, 16, 17]], max_tokens=3)
    assert by_ids.usage.prompt_tokens == 7
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, n=2, temperature=0)
    assert "greedy sampling" in err.value.message
    # An echoed prompt scored without generating (lm-eval's loglikelihood requests) passes through.
    scored = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].text == "Once upon a time" and scored.choices[0].logprobs.token_logprobs[0] is None


def test_sdk_models_and_errors(stack: Stack) -> None:
    client = stack.kv.client()
    assert MODEL in [m.id for m in client.models.list().data]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_dump() in [m.model_dump() for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


# -- raw HTTP: the body reaches the worker as sent, the stream as the worker sent it ----------


def test_raw_stream_is_relayed_as_sse(stack: Stack) -> None:
    # ignore_eos is a vLLM extension the gateway does not know: it must still reach the worker.
    status, headers, body = post(
        stack.kv.url + "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "raw"}],
            "max_tokens": 40,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert status == 200 and headers["x-kvgate-worker"] in stack.workers
    events = [line[6:] for line in body.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 40


def test_raw_non_stream_passthrough(stack: Stack) -> None:
    status, headers, body = post(
        stack.kv.url + "/v1/completions",
        {"model": MODEL, "prompt": "abc", "max_tokens": 30, "ignore_eos": True},
        headers={"X-Request-Id": "abc-123"},
    )
    assert status == 200
    assert headers["x-kvgate-worker"] in stack.workers
    assert json.loads(body)["usage"]["completion_tokens"] == 30


# -- kv routing -------------------------------------------------------------------------------


def test_next_turn_lands_on_the_worker_holding_the_prefix(stack: Stack) -> None:
    before = metrics(stack.kv.url)
    # Turn 1 goes straight to w1, behind the gateway's back: only w1's KV events can
    # tell the gateway where the prefix lives (an idle tie would otherwise go to w0).
    first = conversation("astronomy")
    status, _, body = post(
        stack.workers["w1"].url + "/v1/chat/completions", {"model": MODEL, "messages": first, "max_tokens": 8}
    )
    assert status == 200
    reply = json.loads(body)["choices"][0]["message"]["content"]
    nxt = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    explained = wait_until(
        lambda: (e := explain(stack.kv, {"model": MODEL, "messages": nxt})) and overlap_of(e, "w1")["gpu"] > 0 and e,
        what="w1's prefix in the index",
    )
    assert explained["chosen"] == "w1"
    assert overlap_of(explained, "w0")["blocks"] == 0

    raw = stack.kv.client().chat.completions.with_raw_response.create(model=MODEL, messages=nxt, max_tokens=8)
    assert raw.headers["x-kvgate-worker"] == "w1"
    usage = raw.parse().usage
    assert usage.prompt_tokens_details.cached_tokens > 0

    after = metrics(stack.kv.url)
    assert (
        metric(after, "kvgate_cached_tokens_total", worker="w1")
        - metric(before, "kvgate_cached_tokens_total", worker="w1")
        == usage.prompt_tokens_details.cached_tokens
    )
    gained = metric(after, "kvgate_overlap_blocks_total", worker="w1", tier="GPU") - metric(
        before, "kvgate_overlap_blocks_total", worker="w1", tier="GPU"
    )
    assert gained == overlap_of(explained, "w1")["gpu"] > 0
    assert metric(after, "kvgate_request_prefix_hit_rate_count", worker="w1") > 0
    assert metric(after, "kvgate_index_blocks", worker="w1", tier="GPU") > 0
    assert metric(after, "kvgate_index_events_applied_total") > 0
    for stage in ("tokenize", "hash", "match", "score"):
        assert metric(after, "kvgate_routing_overhead_seconds_count", stage=stage) > 0


def test_debug_route_explains_without_forwarding(stack: Stack) -> None:
    body = {"model": MODEL, "messages": conversation("botany"), "max_tokens": 4}
    before = metrics(stack.kv.url)
    explained = explain(stack.kv, body)
    assert metric(metrics(stack.kv.url), "kvgate_requests_total") == metric(before, "kvgate_requests_total")
    assert explained["mode"] == "kv"
    assert explained["num_blocks"] == explained["prompt_tokens"] // 64 >= 4
    assert explained["chosen"] in stack.workers
    assert {c["worker_id"] for c in explained["candidates"]} == set(stack.workers)
    for candidate in explained["candidates"]:
        assert set(candidate["overlap"]) == {"blocks", "gpu", "cpu", "disk", "predicted"}
        costs = candidate["costs_ms"]
        parts = ("overhead", "tier_load", "queued_prefill", "prefill", "memory_wait")
        assert set(costs) == {*parts, "ttft", "added_work", "total"}
        assert costs["ttft"] == pytest.approx(sum(costs[k] for k in parts))
        assert costs["total"] == pytest.approx(costs["ttft"] + costs["added_work"])
        assert candidate["prefill_tokens_per_s"] > 0
    assert set(explained["speed"]["workers"]) <= set(stack.workers)
    as_completion = explain(stack.kv, {"model": MODEL, "prompt": "x " * 300})
    assert as_completion["route"] == "/v1/completions" and as_completion["num_blocks"] >= 1


def test_a_truncated_prompt_is_routed_on_the_tokens_the_engine_keeps(stack: Stack) -> None:
    """vLLM's ``truncate_prompt_tokens`` keeps the prompt's last N tokens (first N with ``truncation_side``
    'right'): the gateway counts and hashes those, so the blocks it routes on are the ones the worker caches,
    and a prompt past the window that the engine would truncate is served, not refused."""
    messages = conversation("geology")
    whole = explain(stack.kv, {"model": MODEL, "messages": messages})
    right = explain(
        stack.kv, {"model": MODEL, "messages": messages, "truncate_prompt_tokens": 130, "truncation_side": "right"}
    )
    left = explain(stack.kv, {"model": MODEL, "messages": messages, "truncate_prompt_tokens": 130})
    assert right["prompt_tokens"] == left["prompt_tokens"] == 130 and right["num_blocks"] == left["num_blocks"] == 2
    assert right["block_hashes"] == whole["block_hashes"][:2]
    assert not set(left["block_hashes"]) & set(whole["block_hashes"])  # the tail, in blocks of its own
    body = {"model": MODEL, "messages": messages, "truncate_prompt_tokens": 130, "max_tokens": 2}
    status, headers, payload = post(stack.kv.url + "/v1/chat/completions", body)
    assert status == 200 and json.loads(payload)["usage"]["prompt_tokens"] == 130
    worker = headers["x-kvgate-worker"]
    # The worker's events name the blocks of what it kept: the gateway's hashes of the same prompt find them.
    wait_until(lambda: overlap_of(explain(stack.kv, body), worker)["blocks"] == 2)
    long = [{"role": "user", "content": "word " * (CONTEXT + 100)}]
    status, _, payload = post(
        stack.kv.url + "/v1/chat/completions", {"model": MODEL, "messages": long, "max_tokens": 1}
    )
    assert status == 400 and b"maximum context length" in payload
    truncated = {"model": MODEL, "messages": long, "max_tokens": 1, "truncate_prompt_tokens": -1}
    status, _, payload = post(stack.kv.url + "/v1/chat/completions", truncated)
    assert status == 200 and json.loads(payload)["usage"]["prompt_tokens"] == CONTEXT - 1
    for fields, param in (
        ({"truncate_prompt_tokens": CONTEXT + 1}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 0}, None),
    ):
        status, _, payload = post(
            stack.kv.url + "/v1/chat/completions", {"model": MODEL, "messages": messages, **fields}
        )
        assert status == 400 and json.loads(payload)["error"]["param"] == param, payload


def test_tokenize_and_detokenize_are_answered_by_the_workers_in_turn(stack: Stack) -> None:
    body = {"model": MODEL, "messages": conversation("optics")}
    answered_by = set()
    for _ in range(4):
        status, headers, payload = post(stack.kv.url + "/tokenize", body)
        assert status == 200, payload
        answered_by.add(headers["x-kvgate-worker"])
    assert answered_by == set(stack.workers)
    tokens = json.loads(payload)["tokens"]
    # The gateway routes a chat on the ids its workers report for it: the same template and tokenizer.
    assert len(tokens) == explain(stack.kv, body)["prompt_tokens"]
    status, _, payload = post(stack.kv.url + "/detokenize", {"tokens": tokens[-8:]})
    assert status == 200 and json.loads(payload)["prompt"]
    status, _, payload = post(stack.kv.url + "/detokenize", {"tokens": [-1]})
    assert status == 400 and json.loads(payload)["error"]["param"] == "body.tokens.0"


def test_lora_adapter_requests_hash_apart(stack: Stack) -> None:
    first = conversation("zoology")
    assert (
        post(stack.workers["w1"].url + "/v1/chat/completions", {"model": MODEL, "messages": first, "max_tokens": 2})[0]
        == 200
    )
    nxt = first + [{"role": "user", "content": "More?"}]
    wait_until(
        lambda: overlap_of(explain(stack.kv, {"model": MODEL, "messages": nxt}), "w1")["blocks"] > 0,
        what="w1's prefix in the index",
    )
    # The same tokens under an adapter are other blocks: no worker holds them.
    adapter = explain(stack.kv, {"model": LORA, "messages": nxt})
    assert all(c["overlap"]["blocks"] == 0 for c in adapter["candidates"])
    assert LORA in [m.id for m in stack.kv.client().models.list().data]
    assert stack.kv.client().models.retrieve(LORA).model_dump()["parent"] == MODEL


def test_cache_salts_keep_tenants_apart(stack: Stack) -> None:
    # The same conversation cached salted on w1 and unsalted on w0, behind the gateway's back.
    messages = conversation("cartography")
    for worker, extra in (("w1", {"cache_salt": "tenant-A"}), ("w0", {})):
        url = stack.workers[worker].url + "/v1/chat/completions"
        assert post(url, {"model": MODEL, "messages": messages, "max_tokens": 2, **extra})[0] == 200

    def overlaps(**extra: str) -> dict[str, int]:
        explained = explain(stack.kv, {"model": MODEL, "messages": messages, **extra})
        return {w: overlap_of(explained, w)["blocks"] for w in stack.workers}

    tenant_a = wait_until(
        lambda: (o := overlaps(cache_salt="tenant-A")) and o["w1"] > 0 and o, what="w1's salted prefix in the index"
    )
    assert tenant_a["w0"] == 0
    plain = wait_until(lambda: (o := overlaps()) and o["w0"] > 0 and o, what="w0's prefix in the index")
    assert plain["w1"] == 0 and plain["w0"] == tenant_a["w1"]
    assert overlaps(cache_salt="tenant-B") == {"w0": 0, "w1": 0}

    # Served: tenant A lands on its own blocks, tenant B reuses nobody's.
    raw = stack.kv.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=1, extra_body={"cache_salt": "tenant-A"}
    )
    assert raw.headers["x-kvgate-worker"] == "w1"
    assert raw.parse().usage.prompt_tokens_details.cached_tokens == 64 * tenant_a["w1"]
    other = stack.kv.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=1, extra_body={"cache_salt": "tenant-B"}
    )
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_round_robin_alternates(stack: Stack) -> None:
    client = stack.rr.client()
    served = [
        client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": "same prompt every time"}],
            max_tokens=2,
        ).headers["x-kvgate-worker"]
        for _ in range(6)
    ]
    assert all(a != b for a, b in zip(served, served[1:])), served
    assert set(served) == set(stack.workers)


# -- errors: OpenAI-shaped, right status, and the gateway keeps serving -------------------------


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


ERROR_CASES = [
    ("invalid json", "/v1/chat/completions", b'{"model": ', 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("empty body", "/v1/completions", b"", 400, None),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    (
        "message without role",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "message content wrong type",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    ("max_tokens zero", "/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens not a number", "/v1/chat/completions", _chat(max_tokens="five"), 400, "max_tokens"),
    ("max_tokens fractional", "/v1/chat/completions", _chat(max_tokens=2.5), 400, "max_tokens"),
    ("stream not a boolean", "/v1/chat/completions", _chat(stream="maybe"), 400, "stream"),
    ("empty cache_salt", "/v1/chat/completions", _chat(cache_salt=""), 400, "cache_salt"),
    (
        "cache_salt with a slash",
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "cache_salt": "a/b"},
        400,
        "cache_salt",
    ),
    ("model not string", "/v1/chat/completions", _chat(model=7), 400, "model"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("prompt wrong type", "/v1/completions", {"model": MODEL, "prompt": {"a": 1}}, 400, "prompt"),
    ("prompt token out of vocabulary", "/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, 400, "prompt"),
    ("unknown model", "/v1/completions", {"model": "gpt-99", "prompt": "x"}, 404, "model"),
    (
        "prompt over the context length",
        "/v1/completions",
        {"model": MODEL, "prompt": "word " * (CONTEXT + 100)},
        400,
        "prompt",
    ),
    (
        "max_tokens over the context length",
        "/v1/completions",
        {"model": MODEL, "prompt": "hello", "max_tokens": CONTEXT + 1},
        400,
        "max_tokens",
    ),
    (
        "chat over the context length",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "word " * (CONTEXT + 100)}]},
        400,
        "messages",
    ),
    ("body over the size limit", "/v1/chat/completions", b'{"pad": "' + b"x" * (BODY_LIMIT + 10) + b'"}', 413, None),
]


@pytest.mark.parametrize("route,body,status,param", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_error_cases(stack: Stack, route: str, body: bytes | dict, status: int, param: str | None) -> None:
    got, headers, payload = post(stack.kv.url + route, body)
    assert got == status, payload
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param
    assert headers["x-kvgate-worker"] == "none"
    if status == 404:
        assert error["code"] == "model_not_found"
    if status == 413:
        assert error["code"] == "request_too_large"
    # Still serving, and correctly.
    assert post(stack.kv.url + "/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 1})[0] == 200


def test_unknown_route_and_method_are_json(stack: Stack) -> None:
    status, _, payload = post(stack.kv.url + "/v1/nothing-here", {})
    assert status == 404 and json.loads(payload)["error"]["code"] == "not_found"
    status, _, payload = get(stack.kv.url + "/v1/chat/completions")
    assert status == 405 and json.loads(payload)["error"]["code"] == "method_not_allowed"


def test_health_and_metrics_endpoints(stack: Stack) -> None:
    status, _, body = get(stack.kv.url + "/health")
    assert status == 200 and json.loads(body) == {"status": "ok", "workers": {"w0": True, "w1": True}}
    text = metrics(stack.kv.url)
    assert metric(text, "kvgate_worker_up", worker="w0") == 1.0
    assert metric(text, "kvgate_requests_total", route="/v1/chat/completions", status="200") > 0
    # Every forwarded request's time before the worker saw it, all stages together.
    forwarded = metric(text, "kvgate_routing_overhead_seconds_count", stage="forward")
    answered = sum(metric(text, "kvgate_requests_total", route=r, status="200") for r in ("/v1/chat/completions",))
    assert forwarded >= answered > 0
    assert 0 < metric(text, "kvgate_routing_overhead_seconds_sum", stage="forward") < forwarded
    assert metric(text, "kvgate_requests_total", status="400", worker="none") > 0
    # Engine load scraped from the workers' /metrics (vLLM names) reaches the tracker, with the
    # size of each worker's KV pool (vllm:cache_config_info: the simulator's 1,024 blocks of 64).
    assert "kvgate_engine_kv_usage{" in text
    candidates = explain(stack.kv, {"model": MODEL, "prompt": "pool?", "max_tokens": 1})["candidates"]
    assert {c["worker_id"]: c["load"]["capacity_tokens"] for c in candidates} == {"w0": 65_536, "w1": 65_536}
    assert all(c["costs_ms"]["memory_wait"] == 0.0 for c in candidates)


# -- cancellation ----------------------------------------------------------------------------


def test_client_disconnect_mid_stream_frees_the_worker(stack: Stack) -> None:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "a very long story"}],
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    sock = socket.create_connection(("127.0.0.1", stack.kv.port), timeout=30)
    try:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"data: " not in received:
            received += sock.recv(65536)
        worker = re.search(rb"x-kvgate-worker: (\S+)", received, re.I).group(1).decode()
        worker_url = stack.workers[worker].url
        assert metric(metrics(stack.kv.url), "kvgate_active_requests", worker=worker) == 1
        assert metric(metrics(worker_url), "vllm:num_requests_running") == 1
    finally:
        sock.close()
    wait_until(
        lambda: metric(metrics(stack.kv.url), "kvgate_active_requests", worker=worker) == 0,
        what="the gateway freeing the request's load",
    )
    # The upstream request was cancelled too: the worker stops generating.
    wait_until(
        lambda: metric(metrics(worker_url), "vllm:num_requests_running") == 0, what="the worker aborting the generation"
    )
    assert metric(metrics(stack.kv.url), "kvgate_client_disconnects_total", worker=worker) == 1


# -- no worker up ------------------------------------------------------------------------------


def test_no_worker_up_is_503(stack: Stack, tmp_path: Path) -> None:
    dead = free_port()  # nothing listens here
    gateway = start_gateway("dead", tmp_path, f"--worker=id=gone,url=http://127.0.0.1:{dead}")
    try:
        wait_http(gateway.url + "/health", timeout=60, proc=gateway.proc, status=503)
        status, _, body = get(gateway.url + "/health")
        assert json.loads(body) == {"status": "unavailable", "workers": {"gone": False}}
        status, headers, payload = post(gateway.url + "/v1/chat/completions", _chat())
        assert status == 503 and headers["x-kvgate-worker"] == "none"
        assert json.loads(payload)["error"]["code"] == "no_worker_available"
    finally:
        gateway.proc.stop()
