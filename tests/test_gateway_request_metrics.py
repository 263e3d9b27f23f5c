"""gateway.metrics as a listener of the router's request lifecycle: each routed request is
counted once, when its InFlight handle finishes, from the Outcome it finished with."""

from __future__ import annotations

from kvgate.gateway.metrics import GatewayMetrics, Outcome
from kvgate.gateway.relay import Exchange
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.protocol.events import RouterStored, WorkerKey
from kvgate.protocol.hashing import sequence_hashes
from kvgate.router.config import RouterConfig
from kvgate.router.registry import StaticDiscovery
from kvgate.router.routing import Router

CHAT = "/v1/chat/completions"
PROMPT = list(range(200))  # 3 full blocks of 64


def setup() -> tuple[Router, GatewayMetrics]:
    indexer = KvIndexer(block_size=64)
    registry = StaticDiscovery(
        [{"id": "w0", "url": "http://127.0.0.1:1"}, {"id": "w1", "url": "http://127.0.0.1:2"}]
    ).registry()
    indexer.apply_router_events(WorkerKey("w0"), [RouterStored(sequence_hashes(PROMPT, 64)[:2])])
    router = Router(RouterConfig(), indexer, registry)
    metrics = GatewayMetrics()
    router.subscribe(metrics)
    return router, metrics


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_a_streamed_answer_is_counted_once_with_its_timings_and_prompt() -> None:
    router, metrics = setup()
    flight = router.begin("r1", router.route(PROMPT), len(PROMPT))
    assert flight.key == WorkerKey("w0")
    exchange = Exchange(10.0, streamed=True, first_byte=10.25, last_byte=11.0, complete=True, cached_tokens=128)
    flight.first_token()
    flight.finish(Outcome(CHAT, "200", exchange))
    flight.finish(Outcome(CHAT, "500", exchange))  # only the first finish counts
    assert value(metrics, "kvgate_requests_total", route=CHAT, status="200", worker="w0") == 1
    assert value(metrics, "kvgate_requests_total", route=CHAT, status="500", worker="w0") == 0
    assert value(metrics, "kvgate_time_to_first_token_seconds_sum", route=CHAT, worker="w0") == 0.25
    assert value(metrics, "kvgate_e2e_request_latency_seconds_sum", route=CHAT, worker="w0") == 1.0
    assert value(metrics, "kvgate_prompt_tokens_total", worker="w0") == 200
    assert value(metrics, "kvgate_cached_tokens_total", worker="w0") == 128
    assert value(metrics, "kvgate_prompt_blocks_total", worker="w0") == 3
    assert value(metrics, "kvgate_overlap_blocks_total", worker="w0", tier="GPU") == 2
    assert value(metrics, "kvgate_request_prefix_hit_rate_sum", worker="w0") == 2 / 3


def test_failures_cancellations_and_refusals() -> None:
    router, metrics = setup()
    # Every attempt failed: counted on the last worker tried, nothing relayed.
    flight = router.begin("r1", router.route(PROMPT), len(PROMPT))
    flight.move_to(WorkerKey("w1"))
    flight.report_usage(None, streamed=False, served=False)  # as the gateway reports a failure
    flight.finish(Outcome(CHAT, "502"))
    assert value(metrics, "kvgate_requests_total", route=CHAT, status="502", worker="w1") == 1
    assert value(metrics, "kvgate_requests_total", route=CHAT, status="502", worker="w0") == 0

    # The client went away mid-stream: a 499 and a disconnect, no E2E, no prompt counted.
    flight = router.begin("r2", router.route(PROMPT), len(PROMPT))
    flight.finish(Outcome(CHAT, "499", Exchange(0.0, streamed=True, first_byte=0.5)))
    assert value(metrics, "kvgate_client_disconnects_total", worker="w0") == 1
    assert value(metrics, "kvgate_time_to_first_token_seconds_count", route=CHAT, worker="w0") == 1
    assert value(metrics, "kvgate_e2e_request_latency_seconds_count", route=CHAT, worker="w0") == 0
    assert value(metrics, "kvgate_prompt_tokens_total", worker="w0") == 0

    # The worker broke the stream off: a stream failure.
    flight = router.begin("r3", router.route(PROMPT), len(PROMPT))
    flight.finish(Outcome(CHAT, "200", Exchange(0.0, streamed=True, first_byte=0.1, upstream_error="cut")))
    assert value(metrics, "kvgate_stream_failures_total", worker="w0") == 1

    # Cancelled while connecting: not an answer, nothing counted.
    before = value(metrics, "kvgate_requests_total", route=CHAT, status="200", worker="w0")
    router.begin("r4", router.route(PROMPT), len(PROMPT)).finish()
    assert value(metrics, "kvgate_requests_total", route=CHAT, status="200", worker="w0") == before

    metrics.refused(CHAT, 400)
    assert value(metrics, "kvgate_requests_total", route=CHAT, status="400", worker="none") == 1
    assert len(router.load) == 0
