"""Locust users for kvgate: the bench's workloads, streamed and timed per request.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -r 8 -t 60s MultiTurnUser

User classes (name one or more on the command line; none = all, equally weighted):
``MultiTurnUser``, ``SharedPrefixUser``, ``NoSharingUser``, ``TraceReplayUser``.
Request contents come from ``loadtest.workloads`` (the same seeded requests the
bench sends). Every request streams with ``stream_options.include_usage`` and
fires, besides locust's own ``POST`` row, these custom request events:

- ``TTFT <workload>``: time to the first content token (ms);
- ``ITL <workload>``: one event per gap between content chunks (ms);
- ``E2E <workload>``: whole request (ms);
- ``WORKER <id>``: one per answered request, from the ``x-kvgate-worker`` header
  (the row's count is the requests that worker served);
- ``CACHED <workload>``: ``usage.prompt_tokens_details.cached_tokens`` as the
  "response time" and the prompt tokens as the "length", when the server reports them.

Knobs are locust custom arguments, each also an env var (``KVGATE_<NAME>``):
see ``--help`` under "Custom arguments". ``--records FILE`` appends one JSON
line per request (the bench's record format). ``TraceReplayUser`` sends each
trace request at its scheduled offset; users bound the concurrency, so give it
at least as many users as requests in flight; it stops when the schedule ends.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

import requests
from locust import HttpUser, constant, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import MasterRunner

from kvgate.loadtest.corpus import DEFAULT_MODEL, Vocabulary, load_tokenizer
from kvgate.loadtest.stream import RequestRecord, StreamObserver
from kvgate.loadtest.trace import DEFAULT_TRACE, ReplayConfig, load_trace
from kvgate.loadtest.workloads import RequestSpec, Session, TimedRequest, WorkloadConfig, make_session, trace_requests

_INT_KNOBS = {
    "max_tokens": WorkloadConfig.max_tokens,
    "turns": WorkloadConfig.turns,
    "first_turn_tokens": WorkloadConfig.first_turn_tokens,
    "turn_tokens": WorkloadConfig.turn_tokens,
    "tenants": WorkloadConfig.tenants,
    "system_prompt_tokens": WorkloadConfig.system_prompt_tokens,
    "question_tokens": WorkloadConfig.question_tokens,
    "prompt_tokens": WorkloadConfig.prompt_tokens,
}


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    def arg(name: str, **kw: Any) -> None:
        parser.add_argument(
            "--" + name.replace("_", "-"), env_var="KVGATE_" + name.upper(), include_in_web_ui=True, **kw
        )

    arg("seed", type=int, default=0, help="workload seed")
    arg("tokenizer", default=str(DEFAULT_MODEL), help="tokenizer dir or hub id (exact prompt lengths)")
    arg("served_model", default="", help="model name to send (default: the gateway's first /v1/models entry)")
    for name, default in _INT_KNOBS.items():
        arg(name, type=int, default=default)
    arg("think_time", type=float, default=0.0, help="mean seconds a user waits between requests (uniform 0..2x)")
    arg("trace", default=str(DEFAULT_TRACE), help="Mooncake trace (TraceReplayUser)")
    arg("time_scale", type=float, default=ReplayConfig.time_scale, help="multiply trace arrival gaps")
    arg("length_scale", type=float, default=ReplayConfig.length_scale, help="scale trace prompt lengths")
    arg("output_scale", type=float, default=ReplayConfig.output_scale, help="scale trace output lengths")
    arg("max_requests", type=int, default=200, help="trace requests to replay")
    arg("records", default="", help="append one JSON line per request to this file")


class _Shared:
    """Per-process state the users share, built in locust's ``init`` (before the run clock starts:
    loading the tokenizer and building a trace replay take seconds and would block every user)."""

    def __init__(self) -> None:
        self.vocabulary: Vocabulary | None = None
        self.model = ""
        self.config: WorkloadConfig | None = None
        self.users = itertools.count()
        self.trace: list[TimedRequest] = []
        self.trace_next = itertools.count()
        self.t0 = time.perf_counter()

    def setup(self, environment: Environment) -> None:
        opts = environment.parsed_options
        self.vocabulary = Vocabulary.from_tokenizer(load_tokenizer(opts.tokenizer))
        if opts.served_model:
            self.model = opts.served_model
        else:
            if not environment.host:
                raise SystemExit("locustfile: give the gateway with -H/--host (or --served-model)")
            resp = requests.get(environment.host.rstrip("/") + "/v1/models", timeout=10)
            resp.raise_for_status()
            self.model = resp.json()["data"][0]["id"]
        replay = ReplayConfig(
            time_scale=opts.time_scale,
            length_scale=opts.length_scale,
            output_scale=opts.output_scale,
            max_requests=opts.max_requests,
        )
        self.config = WorkloadConfig(seed=opts.seed, replay=replay, **{k: getattr(opts, k) for k in _INT_KNOBS})
        if TraceReplayUser in (environment.user_classes or ()):
            self.trace = trace_requests(load_trace(opts.trace), self.vocabulary, self.config, self.model)


_shared = _Shared()


@events.init.add_listener
def on_init(environment: Environment, **_: Any) -> None:
    if environment.parsed_options is not None and not isinstance(environment.runner, MasterRunner):
        _shared.setup(environment)


@events.test_start.add_listener
def on_test_start(environment: Environment, **_: Any) -> None:
    _shared.t0 = time.perf_counter()  # trace arrivals and record times count from here


def _fire(user: HttpUser, kind: str, name: str, value: float, length: int = 0) -> None:
    user.environment.events.request.fire(
        request_type=kind, name=name, response_time=value, response_length=length, exception=None, context={}
    )


def stream_request(user: HttpUser, spec: RequestSpec) -> str:
    """POST ``spec`` streaming; fire the custom events; return the streamed text."""
    data = json.dumps(spec.body)
    obs = StreamObserver(RequestRecord(spec.workload, spec.user, spec.turn, 0.0), time.perf_counter())
    obs.record.start_s = obs.sent_at - _shared.t0
    with user.client.post(
        spec.path,
        data=data,
        headers={"content-type": "application/json"},
        stream=True,
        catch_response=True,
        name=f"{spec.path} [{spec.workload}]",
    ) as resp:
        obs.on_headers(resp.status_code, resp.headers)
        if resp.status_code != 200:
            obs.error_body(resp.content)
            obs.finish(time.perf_counter())
        else:
            try:
                for chunk in resp.iter_content(chunk_size=None):
                    obs.feed(chunk, time.perf_counter())
                obs.finish(time.perf_counter())
            except OSError as exc:
                obs.fail(f"{type(exc).__name__}: {exc}", time.perf_counter())
        rec = obs.record
        if rec.error:
            resp.failure(rec.error)
        else:
            resp.success()
    if rec.ok:
        _fire(user, "TTFT", spec.workload, rec.ttft_s * 1000.0)
        for gap in rec.itl_s:
            _fire(user, "ITL", spec.workload, gap * 1000.0)
        _fire(user, "E2E", spec.workload, (rec.e2e_s or 0.0) * 1000.0)
    if rec.worker:
        _fire(user, "WORKER", rec.worker, 0.0)
    if rec.cached_tokens is not None:
        _fire(user, "CACHED", spec.workload, float(rec.cached_tokens), rec.prompt_tokens or 0)
    path = user.environment.parsed_options.records
    if path:
        with open(Path(path), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec.to_json()) + "\n")
    return obs.text


class _ChatUser(HttpUser):
    abstract = True
    workload = ""
    session: Session

    def wait_time(self) -> float:
        return random.uniform(0.0, 2.0 * self.environment.parsed_options.think_time)

    def on_start(self) -> None:
        assert _shared.vocabulary is not None and _shared.config is not None
        self.session = make_session(
            self.workload, next(_shared.users), _shared.vocabulary, _shared.config, _shared.model
        )

    @task
    def next_turn(self) -> None:
        spec = self.session.next_request()
        self.session.observe(stream_request(self, spec))


class MultiTurnUser(_ChatUser):
    workload = "multi-turn"


class SharedPrefixUser(_ChatUser):
    workload = "shared-prefix"


class NoSharingUser(_ChatUser):
    workload = "no-sharing"


class TraceReplayUser(HttpUser):
    wait_time = constant(0)

    @task
    def replay(self) -> None:
        i = next(_shared.trace_next)
        if i >= len(_shared.trace):
            raise StopUser()
        timed = _shared.trace[i]
        delay = _shared.t0 + timed.offset_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # gevent-patched: yields to the other users
        stream_request(self, timed.spec)
