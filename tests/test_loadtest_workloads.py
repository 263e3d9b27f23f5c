"""Workload request building (through the real tokenizer and chat template) and stream measurement."""

from __future__ import annotations

import json

import pytest

from kvgate.loadtest.corpus import Vocabulary, load_tokenizer
from kvgate.loadtest.stream import RequestRecord, StreamObserver
from kvgate.loadtest.trace import ReplayConfig, load_trace
from kvgate.loadtest.workloads import CHAT_PATH, COMPLETIONS_PATH, WorkloadConfig, make_session, trace_requests
from tests.helpers import TINY_MODEL

BLOCK = 64


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TINY_MODEL))


@pytest.fixture(scope="module")
def vocabulary(tokenizer):
    return Vocabulary.from_tokenizer(tokenizer)


def rendered(tokenizer, body) -> list[int]:
    """Token ids as vLLM (and the gateway) compute them for a chat request."""
    text = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_every_request_streams_with_usage(vocabulary):
    cfg = WorkloadConfig(max_tokens=7)
    for workload in ("multi-turn", "shared-prefix", "no-sharing"):
        spec = make_session(workload, 0, vocabulary, cfg, "m").next_request()
        assert spec.path == CHAT_PATH and spec.workload == workload
        b = spec.body
        assert b["model"] == "m" and b["stream"] is True and b["stream_options"] == {"include_usage": True}
        assert b["max_tokens"] == 7


def test_multi_turn_history_grows_and_each_turn_extends_the_last(tokenizer, vocabulary):
    cfg = WorkloadConfig(turns=4, first_turn_tokens=200, turn_tokens=30)
    session = make_session("multi-turn", 3, vocabulary, cfg, "m")
    prompts = []
    for turn in range(4):
        spec = session.next_request()
        assert spec.turn == turn
        prompts.append(rendered(tokenizer, spec.body))
        session.observe(f" reply number {turn}")
    for before, after in zip(prompts, prompts[1:]):
        # Everything up to the generation prompt of the previous turn is reused, plus the reply and a new turn.
        assert shared(before, after) >= len(before) - 3
        assert len(after) >= len(before) + 30
    assert len(session.next_request().body["messages"]) == 2  # fifth request: a new conversation
    # The opening message is exactly 200 tokens on top of the template.
    empty = session.next_request().body
    empty["messages"][1]["content"] = ""
    assert len(prompts[0]) == len(rendered(tokenizer, empty)) + 200


def test_conversations_differ_between_users_and_repeat_with_the_seed(tokenizer, vocabulary):
    cfg = WorkloadConfig(first_turn_tokens=128)
    a = make_session("multi-turn", 0, vocabulary, cfg, "m").next_request().body
    b = make_session("multi-turn", 1, vocabulary, cfg, "m").next_request().body
    assert shared(rendered(tokenizer, a), rendered(tokenizer, b)) < BLOCK
    assert a == make_session("multi-turn", 0, vocabulary, cfg, "m").next_request().body
    other_seed = WorkloadConfig(first_turn_tokens=128, seed=1)
    assert a != make_session("multi-turn", 0, vocabulary, other_seed, "m").next_request().body


def test_shared_prefix_requests_share_their_tenants_system_prompt(tokenizer, vocabulary):
    cfg = WorkloadConfig(tenants=3, system_prompt_tokens=256, question_tokens=16)
    bodies = []
    for user in range(4):
        session = make_session("shared-prefix", user, vocabulary, cfg, "m")
        for _ in range(6):
            bodies.append(session.next_request().body)
            session.observe("")
    systems = {b["messages"][0]["content"] for b in bodies}
    assert len(systems) == 3
    by_tenant: dict[str, list[list[int]]] = {}
    for b in bodies:
        by_tenant.setdefault(b["messages"][0]["content"], []).append(rendered(tokenizer, b))
    for prompts in by_tenant.values():
        for p in prompts[1:]:
            assert 256 <= shared(prompts[0], p) < len(p)
    heads = [v[0] for v in by_tenant.values()]
    assert shared(heads[0], heads[1]) < BLOCK


def test_no_sharing_prompts_share_less_than_a_block(tokenizer, vocabulary):
    cfg = WorkloadConfig(prompt_tokens=300)
    prompts = []
    for user in range(3):
        session = make_session("no-sharing", user, vocabulary, cfg, "m")
        for _ in range(3):
            prompts.append(rendered(tokenizer, session.next_request().body))
            session.observe("")
    assert all(len(p) == len(prompts[0]) > 300 for p in prompts)
    for i, a in enumerate(prompts):
        for b in prompts[i + 1 :]:
            assert shared(a, b) < BLOCK


def test_unknown_workload_is_a_clear_error(vocabulary):
    with pytest.raises(ValueError, match="unknown closed-loop workload"):
        make_session("trace", 0, vocabulary, WorkloadConfig(), "m")
    with pytest.raises(ValueError, match="turns"):
        WorkloadConfig(turns=0)


def test_trace_requests_are_timed_completions(vocabulary):
    cfg = WorkloadConfig(replay=ReplayConfig(time_scale=0.5, length_scale=0.125, max_requests=20))
    timed = trace_requests(load_trace(), vocabulary, cfg, "m")
    assert len(timed) == 20
    assert all(t.spec.path == COMPLETIONS_PATH and t.spec.body["stream"] for t in timed)
    assert [t.offset_s for t in timed] == sorted(t.offset_s for t in timed)
    assert timed[3].offset_s == pytest.approx(0.277 * 0.5)
    assert timed[0].spec.body["max_tokens"] == 6


def sse(*chunks: dict | str) -> bytes:
    return b"".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n".encode() for c in chunks)


def test_stream_observer_times_content_only_and_reads_usage():
    body = sse(
        {"choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"content": "a"}}]},
        {"choices": [{"delta": {"content": ""}}]},
        {"choices": [{"delta": {"content": "b"}}]},
        {"choices": [{"delta": {"content": "c"}}]},
        {
            "choices": [],
            "usage": {"prompt_tokens": 100, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 64}},
        },
        "[DONE]",
    )
    events = body.split(b"\n\n")
    obs = StreamObserver(RequestRecord("w", 0, 0, 0.0), sent_at=10.0)
    obs.on_headers(200, {"x-kvgate-worker": "w1"})
    times = [10.1, 10.5, 10.6, 10.8, 11.0, 11.1, 11.2]
    for ev, t in zip(events, times):
        # Split each event mid-line to prove the parser buffers partial lines.
        half = max(1, len(ev) // 2)
        obs.feed(ev[:half], t)
        obs.feed(ev[half:] + b"\n\n", t)
    rec = obs.finish(11.5)
    assert rec.ok and rec.worker == "w1" and obs.text == "abc"
    assert rec.ttft_s == pytest.approx(0.5)
    assert rec.itl_s == pytest.approx([0.3, 0.2])
    assert rec.e2e_s == pytest.approx(1.5)
    assert (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens) == (100, 3, 64)
    again = RequestRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert again.to_json() == rec.to_json() and again.itl_s == pytest.approx(rec.itl_s)


def test_stream_observer_completions_and_failures():
    obs = StreamObserver(RequestRecord("trace", 0, 0, 0.0), sent_at=0.0)
    obs.on_headers(200, {})
    obs.feed(sse({"choices": [{"text": "x"}]}), 0.2)
    rec = obs.finish(0.3)
    assert rec.ttft_s == pytest.approx(0.2) and rec.error == "stream ended without [DONE]" and not rec.ok

    obs = StreamObserver(RequestRecord("trace", 0, 0, 0.0), sent_at=0.0)
    obs.on_headers(200, {})
    obs.feed(sse({"error": {"message": "boom"}}, "[DONE]"), 0.1)
    assert obs.finish(0.2).error == "boom"

    obs = StreamObserver(RequestRecord("trace", 0, 0, 0.0), sent_at=0.0)
    obs.on_headers(404, {})
    obs.error_body(b'{"error": {"message": "model not found", "type": "x"}}')
    rec = obs.finish(0.1)
    assert rec.error == "HTTP 404: model not found" and not rec.ok


def test_returning_conversations_take_turns_in_rotation(vocabulary):
    config = WorkloadConfig(conversations_per_user=3, turns=4, first_turn_tokens=64, turn_tokens=8)
    session = make_session("returning", 1, vocabulary, config, "m")
    openings = []
    for round_ in range(2):
        for k in range(3):
            spec = session.next_request()
            assert spec.workload == "returning" and spec.turn == round_ and spec.user == 1
            messages = spec.body["messages"]
            assert len(messages) == 2 + 2 * round_  # system + opening, then one reply and turn per round
            if round_ == 0:
                openings.append(messages[1]["content"])
            else:
                assert messages[1]["content"] == openings[k] and messages[2]["content"] == f"reply {k}"
            session.observe(f"reply {k}")
    assert len(set(openings)) == 3  # three distinct conversations
    # Same seed, same conversations: the first one is multi-turn user 1 * 3 + 0's.
    assert (
        openings[0]
        == make_session("multi-turn", 3, vocabulary, config, "m").next_request().body["messages"][1]["content"]
    )
