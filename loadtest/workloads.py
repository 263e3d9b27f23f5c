"""The workloads: what each simulated user sends, seeded and repeatable.

Owns request construction only (bodies and paths); the locust users and the
bench's asyncio driver both draw from here, so the two send identical traffic
for the same seed. Every request streams with usage included.

- ``multi-turn``: each user holds a conversation (a long first message, then
  short turns); the model's reply and the next user turn are appended, so
  every request extends the previous one's prompt.
- ``shared-prefix``: N tenants, each with a long system prompt; every request
  is one tenant's system prompt plus a short, fresh question.
- ``returning``: multi-turn conversations that come back after a pause: each user
  keeps ``conversations_per_user`` conversations open and takes one turn in each in
  rotation, so between two turns of a conversation the user's other conversations
  (and everyone else's) push its blocks out of the GPU pool (into the CPU tier, on a
  tiered worker). The tier benchmark's workload.
- ``no-sharing``: a fresh random prompt every time (the control: no router
  can find a prefix to reuse).
- ``trace``: a Mooncake trace replayed open-loop (see ``trace.py``).
- ``burst``: open loop; every ``burst_period_s`` a new long document arrives and
  ``burst_size`` requests about it (the document, then a fresh short question) arrive
  within ``burst_window_s``: the requests of a burst share a prefix no cache holds yet,
  so a router must place them by what it has just sent, not by what it has been told.

Open-loop schedules live here too: ``poisson_arrivals`` (the rate sweep's arrival
times) and ``burst_schedule``.

Pure and synchronous: nothing here opens a socket.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvgate.loadtest.corpus import Vocabulary
from kvgate.loadtest.trace import ReplayConfig, TracePrompts, TraceRequest, arrival_schedule

WORKLOADS = ("multi-turn", "returning", "shared-prefix", "no-sharing", "trace", "burst")
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class WorkloadConfig:
    """Every workload knob, with its default, in one place."""

    seed: int = 0
    max_tokens: int = 32  # output tokens per chat request
    turns: int = 6  # multi-turn: requests per conversation
    first_turn_tokens: int = 512  # multi-turn: the opening message (a pasted document)
    turn_tokens: int = 48  # multi-turn: each later user message
    conversations_per_user: int = 3  # returning: conversations each user keeps open, in rotation
    tenants: int = 4  # shared-prefix: distinct system prompts
    system_prompt_tokens: int = 1024
    question_tokens: int = 32
    prompt_tokens: int = 512  # no-sharing: tokens per random prompt
    burst_doc_tokens: int = 4096  # burst: the new document every burst shares
    burst_size: int = 8  # burst: requests per document
    burst_window_s: float = 0.1  # burst: a burst's requests arrive within this many seconds
    burst_period_s: float = 2.0  # burst: a new document every this many seconds (the sweep sets it from the rate)
    replay: ReplayConfig = field(default_factory=ReplayConfig)

    def __post_init__(self) -> None:
        positive = (
            "max_tokens",
            "turns",
            "first_turn_tokens",
            "turn_tokens",
            "conversations_per_user",
            "tenants",
            "system_prompt_tokens",
            "question_tokens",
            "prompt_tokens",
            "burst_doc_tokens",
            "burst_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.burst_window_s < 0 or self.burst_period_s <= 0:
            raise ValueError("burst_window_s must be >= 0 and burst_period_s > 0")


@dataclass
class RequestSpec:
    """One HTTP request to send: ``POST path`` with ``body``; ``workload`` labels its metrics."""

    workload: str
    path: str
    body: dict[str, Any]
    user: int = 0
    turn: int = 0


class Session(Protocol):
    """A closed-loop user: asks for its next request, then reports the reply it got."""

    def next_request(self) -> RequestSpec: ...
    def observe(self, content: str) -> None: ...


def _stream_options(body: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    # ignore_eos is vLLM's extension: a real engine then emits exactly max_tokens,
    # so both routing modes do the same decode work.
    body.update(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stream=True, stream_options={"include_usage": True}
    )
    return body


def chat_body(model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return _stream_options({"model": model, "messages": [dict(m) for m in messages]}, max_tokens)


def completion_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return _stream_options({"model": model, "prompt": prompt}, max_tokens)


class MultiTurnSession:
    def __init__(self, user: int, vocabulary: Vocabulary, config: WorkloadConfig, model: str):
        self.user, self.vocabulary, self.config, self.model = user, vocabulary, config, model
        self.conversation = -1
        self.turn = 0
        self.messages: list[dict[str, str]] = []
        self._rng = random.Random()

    def _new_conversation(self) -> None:
        self.conversation += 1
        self.turn = 0
        self._rng = random.Random(f"multi-turn:{self.config.seed}:{self.user}:{self.conversation}")
        opening = self.vocabulary.text(self._rng, self.config.first_turn_tokens)
        self.messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": opening}]

    def next_request(self) -> RequestSpec:
        if not self.messages:
            self._new_conversation()
        body = chat_body(self.model, self.messages, self.config.max_tokens)
        return RequestSpec("multi-turn", CHAT_PATH, body, self.user, self.turn)

    def observe(self, content: str) -> None:
        self.turn += 1
        if self.turn >= self.config.turns:
            self.messages = []
            return
        self.messages.append({"role": "assistant", "content": content})
        self.messages.append({"role": "user", "content": self.vocabulary.text(self._rng, self.config.turn_tokens)})


class ReturningSession:
    """Several multi-turn conversations per user, one turn each in rotation."""

    def __init__(self, user: int, vocabulary: Vocabulary, config: WorkloadConfig, model: str):
        self.user = user
        k = config.conversations_per_user
        # Distinct seeds per conversation: as if user*k+i were multi-turn users of their own.
        self.conversations = [MultiTurnSession(user * k + i, vocabulary, config, model) for i in range(k)]
        self.current = 0

    def next_request(self) -> RequestSpec:
        spec = self.conversations[self.current].next_request()
        return RequestSpec("returning", spec.path, spec.body, self.user, spec.turn)

    def observe(self, content: str) -> None:
        self.conversations[self.current].observe(content)
        self.current = (self.current + 1) % len(self.conversations)


class SharedPrefixSession:
    def __init__(self, user: int, vocabulary: Vocabulary, config: WorkloadConfig, model: str):
        self.user, self.vocabulary, self.config, self.model = user, vocabulary, config, model
        self.turn = 0
        self._rng = random.Random(f"shared-prefix:{config.seed}:{user}")
        self._system = [
            vocabulary.text(random.Random(f"tenant:{config.seed}:{t}"), config.system_prompt_tokens)
            for t in range(config.tenants)
        ]

    def next_request(self) -> RequestSpec:
        tenant = self._rng.randrange(self.config.tenants)
        messages = [
            {"role": "system", "content": self._system[tenant]},
            {"role": "user", "content": self.vocabulary.text(self._rng, self.config.question_tokens)},
        ]
        return RequestSpec(
            "shared-prefix", CHAT_PATH, chat_body(self.model, messages, self.config.max_tokens), self.user, self.turn
        )

    def observe(self, content: str) -> None:
        self.turn += 1


class NoSharingSession:
    def __init__(self, user: int, vocabulary: Vocabulary, config: WorkloadConfig, model: str):
        self.user, self.vocabulary, self.config, self.model = user, vocabulary, config, model
        self.turn = 0
        self._rng = random.Random(f"no-sharing:{config.seed}:{user}")

    def next_request(self) -> RequestSpec:
        messages = [{"role": "user", "content": self.vocabulary.text(self._rng, self.config.prompt_tokens)}]
        return RequestSpec(
            "no-sharing", CHAT_PATH, chat_body(self.model, messages, self.config.max_tokens), self.user, self.turn
        )

    def observe(self, content: str) -> None:
        self.turn += 1


SESSIONS = {
    "multi-turn": MultiTurnSession,
    "returning": ReturningSession,
    "shared-prefix": SharedPrefixSession,
    "no-sharing": NoSharingSession,
}


def make_session(workload: str, user: int, vocabulary: Vocabulary, config: WorkloadConfig, model: str) -> Session:
    try:
        cls = SESSIONS[workload]
    except KeyError:
        raise ValueError(f"unknown closed-loop workload {workload!r} (choose from {', '.join(SESSIONS)})") from None
    return cls(user, vocabulary, config, model)


@dataclass(frozen=True)
class TimedRequest:
    """An open-loop request: send ``spec`` ``offset_s`` seconds after the replay starts."""

    offset_s: float
    spec: RequestSpec


def trace_requests(
    trace: list[TraceRequest], vocabulary: Vocabulary, config: WorkloadConfig, model: str
) -> list[TimedRequest]:
    prompts = TracePrompts(vocabulary, config.replay, config.seed)
    return [
        TimedRequest(
            a.offset_s,
            RequestSpec(
                "trace",
                COMPLETIONS_PATH,
                completion_body(model, prompts.prompt(a.request), prompts.max_tokens(a.request)),
                user=a.index,
            ),
        )
        for a in arrival_schedule(trace, config.replay)
    ]


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Arrival times in [0, duration_s) of a Poisson process of ``rate`` per second
    (exponential gaps, seeded by ``(seed, rate)``: every mode and repeat gets the same)."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = random.Random(f"arrivals:{seed}:{rate}")
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass(frozen=True)
class BurstArrival:
    offset_s: float
    burst: int  # which document
    index: int  # which request of the burst


def burst_schedule(period_s: float, size: int, window_s: float, duration_s: float, seed: int) -> list[BurstArrival]:
    """Bursts at 0, period, 2·period, ... (< duration_s); each burst's ``size`` requests at
    seeded offsets in [start, start + window_s), the first exactly at the start; sorted by time."""
    if period_s <= 0 or size < 1 or window_s < 0:
        raise ValueError("period_s must be > 0, size >= 1, window_s >= 0")
    out = []
    burst = 0
    while burst * period_s < duration_s:
        start = burst * period_s
        rng = random.Random(f"burst-times:{seed}:{burst}")
        offsets = [0.0] + sorted(rng.uniform(0.0, window_s) for _ in range(size - 1))
        out += [BurstArrival(start + o, burst, i) for i, o in enumerate(offsets)]
        burst += 1
    return sorted(out, key=lambda a: (a.offset_s, a.burst, a.index))


def burst_requests(
    vocabulary: Vocabulary, config: WorkloadConfig, model: str, duration_s: float, period_s: float | None = None
) -> list[TimedRequest]:
    """The burst workload's requests: document ``b`` (seeded by ``(seed, b)``) followed by a
    fresh question, as one user message, at ``burst_schedule``'s times."""
    period = config.burst_period_s if period_s is None else period_s
    schedule = burst_schedule(period, config.burst_size, config.burst_window_s, duration_s, config.seed)
    docs: dict[int, str] = {}
    out = []
    for a in schedule:
        if a.burst not in docs:
            doc_rng = random.Random(f"burst-doc:{config.seed}:{a.burst}")
            docs[a.burst] = vocabulary.text(doc_rng, config.burst_doc_tokens)
        question = vocabulary.text(random.Random(f"burst-q:{config.seed}:{a.burst}:{a.index}"), config.question_tokens)
        messages = [{"role": "user", "content": docs[a.burst] + question}]
        body = chat_body(model, messages, config.max_tokens)
        out.append(TimedRequest(a.offset_s, RequestSpec("burst", CHAT_PATH, body, user=a.burst, turn=a.index)))
    return out


def trace_time_scale(trace: list[TraceRequest], replay_config: ReplayConfig, rate: float) -> float:
    """The ``time_scale`` that replays the chosen part of ``trace`` (after ``skip``, up to
    ``max_requests``) at a mean of ``rate`` requests per second."""
    chosen = trace[replay_config.skip :]
    if replay_config.max_requests is not None:
        chosen = chosen[: replay_config.max_requests]
    if len(chosen) < 2:
        return 1.0
    span_s = (chosen[-1].timestamp_ms - chosen[0].timestamp_ms) / 1000.0
    native = (len(chosen) - 1) / span_s if span_s > 0 else rate
    return native / rate
