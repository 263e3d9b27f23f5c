"""The aiohttp application: OpenAI routes in front of the fleet, plus health, metrics, debug.

A completion request flows: read the body (size-limited) -> ``protocol`` validates the
fields routing needs -> ``tokenization`` renders the chat template and tokenizes (off
the event loop for long prompts) -> ``Router.route`` picks a worker and a fallback
order -> ``Upstream.post`` sends the client's bytes unchanged, moving to the next
worker on a connect failure or a 5xx before the first byte -> ``relay`` copies the
answer back as it arrives. The request's lifecycle goes through the one ``InFlight``
handle ``Router.begin`` returns (retry, first token, end or cancel): load-aware scores
see it, and so do the listeners subscribed on the router, the request metrics
(``metrics.GatewayMetrics``), the check of predicted against reported cached tokens
(``hit_check.HitCheck``) and, when there is a NATS bus, the other gateway replicas
(``replicas.GatewayBus``). Handlers hold no policy; errors leave as OpenAI-style JSON
(``errors``), never as a stack trace.

Who may call which route is ``auth.Access``'s: the OpenAI routes need an API key when
keys are configured and count against the caller's rate limits; ``/debug/route`` and
``/metrics`` (the cache and fleet state) need the admin key when one is configured and are
served by a second application, ``ADMIN_APP_KEY``, on its own listener, unless
``admin_on_public_port``; ``/health`` is public and says only up/down per worker there.

Workers come from the static list or from etcd (``router.discovery.EtcdDiscovery``);
their events from their ZMQ sockets or from NATS; ``Gateway.start`` wires whichever
the configuration names.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvgate.gateway.api import ChatRequest, CompletionRequest, parse_chat, parse_completion, parse_json_object
from kvgate.gateway.auth import Access, Budget
from kvgate.gateway.config import GatewayConfig
from kvgate.gateway.errors import (
    NO_WORKER,
    SERVER_NAME,
    WORKER_HEADER,
    ApiError,
    bad_request,
    body_timeout,
    body_too_large,
    body_undecodable,
    from_http_exception,
    internal_error,
    model_not_found,
    no_worker_available,
    upstream_failed,
    upstream_timeout,
)
from kvgate.gateway.fleet import Fleet
from kvgate.gateway.hit_check import HitCheck
from kvgate.gateway.incremental import TokenizationCollector
from kvgate.gateway.metrics import CONTENT_TYPE, GatewayMetrics, Outcome, StateSources
from kvgate.gateway.relay import ClientGone, Exchange, relay
from kvgate.gateway.replicas import GatewayBus, GatewaySecurity
from kvgate.gateway.tokenization import HeadEncoding, Preprocessor, Tokenized, TokenizerError
from kvgate.gateway.upstream import Upstream, UpstreamFailure, UpstreamResponse, forward_headers, response_headers
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.indexer.zmq_source import ReplayDispatcher
from kvgate.protocol.events import WorkerKey
from kvgate.protocol.http import is_json_content_type, model_card
from kvgate.router.accounting import HitAccounting
from kvgate.router.discovery import EtcdDiscovery
from kvgate.router.lifecycle import InFlight
from kvgate.router.load import LoadTracker
from kvgate.router.policies import Decision
from kvgate.router.registry import WorkerRegistry
from kvgate.router.routing import NoWorkerAvailable, Router
from kvgate.tasks import cancel_and_wait

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long start-up waits for etcd's first listing before serving anyway (503 until
# workers appear; the watch keeps retrying in the background).
DISCOVERY_WAIT_SECONDS = 10.0

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")
# The admin endpoints' own application (None with admin_on_public_port), served by server.serve.
ADMIN_APP_KEY: web.AppKey[web.Application | None] = web.AppKey("admin_app")


class CountedFailure(Exception):
    """An unexpected error after the request's InFlight handle counted it (as a 500): the
    error middleware answers it without counting it again."""


@dataclass(slots=True)
class Routed:
    """A validated, tokenized, routed request, ready to forward."""

    route: str
    started: float
    """``time.perf_counter()`` at the request's arrival: TTFT and E2E count from here."""
    prompt_tokens: int
    decision: Decision
    tokenize_seconds: float
    sequences: int = 1
    """Prompts x choices the worker will run (see ``metrics.Outcome.sequences``)."""
    stream: bool = False
    head: HeadEncoding | None = None
    """Set when the request was routed on its prompt's head alone (``Router.route_head``)."""
    lora_name: str | None = None


class Gateway:
    """Everything one gateway process holds; the handlers are its methods."""

    def __init__(self, config: GatewayConfig, preprocessor: Preprocessor | None = None) -> None:
        self.config = config
        self.preprocessor = (
            preprocessor
            if preprocessor is not None
            else Preprocessor.load(config.model, **config.preprocessor_options())
        )
        self.context_length = self.preprocessor.context_length
        self.model_name = config.model_name
        self.lora_adapters = frozenset(config.lora_adapters)
        self.access = Access.from_config(config)
        self.registry = WorkerRegistry()
        self.replay = ReplayDispatcher()
        self.indexer = KvIndexer(
            config.block_size, self.replay, prediction_capacity=config.kv.prediction_capacity_blocks
        )
        self.load = LoadTracker.from_config(config.kv)
        self.bus: GatewayBus | None = None
        security = GatewaySecurity.from_config(config)
        if config.nats_url is not None:
            self.bus = GatewayBus(
                config.nats_url,
                config.namespace,
                config.replica_id,
                self.indexer,
                self.registry,
                self.load,
                events_stale_after=config.events_stale_after,
                replica_timeout=config.replica_timeout,
                credentials=security.nats,
                secret=security.bus_secret,
                events=config.kv_events == "on",
            )
        self.fleet = Fleet(config, self.registry, self.indexer, self.load, self.replay, self.bus)
        # A stale NATS stream's blocks are left out by the index itself (its trust state).
        self.router = Router(config.kv, self.indexer, self.registry, self.load)
        self.discovery: EtcdDiscovery | None = None
        if config.discovery == "etcd":
            assert config.etcd_endpoints is not None
            self.discovery = EtcdDiscovery(
                config.etcd_endpoints, config.namespace, self.registry, credentials=security.etcd
            )
        self.upstream = Upstream(config)
        self.metrics = GatewayMetrics(
            StateSources(
                block_counts=self.indexer.block_counts,
                indexer_stats=lambda: self.indexer.stats,
                load=lambda: self.load.snapshots(self.registry.keys()),
                workers_up=lambda: dict(self.fleet.up),
                prediction_trusted=lambda: self.hit_check.trusted(),
                extra=self._distributed_metrics,
            )
        )
        self.router.subscribe(self.metrics)
        self.metrics.registry.register(TokenizationCollector(self.preprocessor))
        self.router.subscribe(self.fleet)
        self.hit_check = HitCheck(
            HitAccounting(config.block_size, config.prediction_window, config.prediction_mismatches),
            self.indexer,
            self.metrics,
            self.registry,
        )
        self.router.subscribe(self.hit_check)
        if self.bus is not None:
            self.router.subscribe(self.bus)
        self._request_ids = itertools.count()
        self._passthrough_turns = itertools.count()
        # Prompts' rests encoded after forwarding, on the tokenizer threads (`_finish_long_prefix_route`).
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self.metrics.loop_lag.start()
        await self.upstream.start()
        if self.bus is not None:
            await self.bus.start()
        await self.fleet.start()
        if self.discovery is None:
            self.config.static_discovery().apply(self.registry)
            return
        await self.discovery.start()
        try:
            await self.discovery.wait_ready(DISCOVERY_WAIT_SECONDS)
        except TimeoutError:
            log.warning(
                "etcd %s not answering after %.0fs: serving without workers until it does",
                self.config.etcd_endpoints,
                DISCOVERY_WAIT_SECONDS,
            )

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        if self.bus is not None:
            await self.bus.stop()
        await self.fleet.stop()
        await cancel_and_wait(*self._background)
        await self.upstream.close()
        self.hit_check.close()
        self.router.close()
        self.preprocessor.close()
        self.metrics.loop_lag.stop()

    # -- OpenAI routes --------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, COMPLETIONS)

    async def tokenize(self, request: web.Request) -> web.Response:
        return await self._passthrough(request, "/tokenize")

    async def detokenize(self, request: web.Request) -> web.Response:
        return await self._passthrough(request, "/detokenize")

    async def _passthrough(self, request: web.Request, path: str) -> web.Response:
        """vLLM's ``/tokenize`` and ``/detokenize``, which every worker answers alike (the model's tokenizer
        and chat template, no engine): the client's bytes go to the next worker that is up, its answer comes
        back as it is; a worker that cannot be reached is marked down and the next one tried."""
        try:
            self._admit(request)
            body = await self._read_body(request)
        except ApiError as err:
            self.metrics.refused(path, err.status)
            return err.response(NO_WORKER)
        up = [info for info in self.registry.all() if self.fleet.up.get(info.worker_id)]
        if not up:
            self.metrics.refused(path, 503)
            return no_worker_available("No worker is available: none is up").response(NO_WORKER)
        start = next(self._passthrough_turns) % len(up)
        headers = forward_headers(request.headers, request.remote)
        failure: UpstreamFailure | None = None
        worker = NO_WORKER
        for info in (up[start:] + up[:start])[: self.config.max_attempts]:
            worker = info.worker_id
            try:
                upstream = await self.upstream.post(info.base_url, path, body, headers)
                try:
                    payload = await upstream.read()
                except BaseException:
                    upstream.close()
                    raise
                upstream.release()
            except UpstreamFailure as err:
                failure = err
                if err.kind == "connect":
                    self.fleet.mark_down(info.worker_id, err.detail)
                if not err.retryable:
                    break
                continue
            answer = response_headers(upstream.headers)
            answer[WORKER_HEADER] = worker
            return web.Response(status=upstream.status, body=payload, headers=answer)
        assert failure is not None
        detail = failure.public(worker)
        error = upstream_timeout(detail) if failure.kind == "timeout" else upstream_failed(detail)
        self.metrics.refused(path, error.status)
        return error.response(worker)

    async def models(self, request: web.Request) -> web.Response:
        self._admit(request)
        return _json({"object": "list", "data": self._model_cards()})

    async def model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}`` (the OpenAI SDK's ``models.retrieve``): one card of the list, else a 404."""
        self._admit(request)
        name = request.match_info["model"]
        card = next((card for card in self._model_cards() if card["id"] == name), None)
        if card is None:
            raise model_not_found(name)
        return _json(card)

    def _model_cards(self) -> list[dict[str, Any]]:
        """vLLM 0.32's model cards, field for field (its permission list included)."""
        created = int(time.time())

        def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
            return model_card(name, root, parent, self.context_length, created, owned_by="kvgate")

        cards = [card(self.model_name, self.config.model, None)]
        cards += [card(name, self.model_name, self.model_name) for name in sorted(self.lora_adapters)]
        return cards

    # -- operations -----------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """Public: up/down per worker; the rest as well where the admin endpoints are served
        and the request may see them."""
        detailed = self.config.admin_on_public_port and self._admin_allowed(request)
        return self._health(detailed)

    async def admin_health(self, request: web.Request) -> web.Response:
        return self._health(self._admin_allowed(request))

    def _health(self, detailed: bool) -> web.Response:
        workers = {info.worker_id: bool(self.fleet.up.get(info.worker_id)) for info in self.registry.all()}
        ready = any(workers.values())
        body: dict[str, object] = {"status": "ok" if ready else "unavailable", "workers": workers}
        if not detailed:
            return _json(body, status=200 if ready else 503)
        distrusted = self.hit_check.distrusted(workers)
        if distrusted:
            body["predictions"] = distrusted
        if self.discovery is not None:
            body["discovery"] = {
                "mode": "etcd",
                "connected": self.discovery.connected,
                "revision": self.discovery.revision,
            }
        events = {wid: self.fleet.events_of(wid) for wid in workers}
        # Shown with NATS, and whenever a worker's events are missing or absent (load-only routing).
        if self.bus is not None or not {"zmq-missing", "none"}.isdisjoint(events.values()):
            body["events"] = events
        if self.bus is not None:
            body["nats"] = {
                "connected": self.bus.connected,
                "router_id": self.bus.router_id,
                "replicas": self.bus.sync.replicas(),
            }
        return _json(body, status=200 if ready else 503)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        self.access.check_admin(request.headers.get("Authorization"))
        return web.Response(body=await self.metrics.render_async(), headers={"Content-Type": CONTENT_TYPE})

    async def debug_route(self, request: web.Request) -> web.Response:
        """Explain where a chat or completion body would go, without forwarding it."""
        try:
            self.access.check_admin(request.headers.get("Authorization"))
            body = await self._read_body(request)
            data = parse_json_object(body)
            route = CHAT if "messages" in data else COMPLETIONS
            parsed = parse_chat(body, self.config.max_messages) if route == CHAT else parse_completion(body)
            # The whole prompt's overlap and block hashes, even for a new turn a request would route on its
            # cached prefix: the same choice (`Router.route_head`), with every block counted.
            routed = await self._route(route, parsed, time.perf_counter(), whole=True)
        except ApiError as err:
            return err.response(NO_WORKER)
        decision = routed.decision
        explained = decision.explain()
        explained.update(
            route=route,
            prompt_tokens=routed.prompt_tokens,
            routed_on_head=routed.head is not None,
            tokenize_us=routed.tokenize_seconds * 1e6,
            workers_up={info.worker_id: bool(self.fleet.up.get(info.worker_id)) for info in self.registry.all()},
        )
        return _json(explained, headers={WORKER_HEADER: decision.chosen.worker_id})

    # -- the request path -----------------------------------------------------------------

    async def _complete(self, request: web.Request, route: str) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            client = self._admit(request)
            body = await self._read_body(request)
            parsed = parse_chat(body, self.config.max_messages) if route == CHAT else parse_completion(body)
            routed = await self._route(route, parsed, started)
            self._limit("tokens", client, routed.prompt_tokens)
        except ApiError as err:
            self.metrics.refused(route, err.status)
            return err.response(NO_WORKER)
        return await self._forward(request, body, routed)

    def _admit(self, request: web.Request) -> str:
        """The caller's identity for the rate limits, once its key is checked and its request counted."""
        client = self.access.client(request.headers.get("Authorization"), request.remote)
        self._limit("requests", client, 1)
        return client

    def _limit(self, budget: Budget, client: str, cost: int) -> None:
        try:
            self.access.take(budget, client, cost)
        except ApiError:
            self.metrics.child(self.metrics.rate_limited, budget).inc()
            raise

    def _admin_allowed(self, request: web.Request) -> bool:
        return self.access.admin_allowed(request.headers.get("Authorization"))

    async def _read_body(self, request: web.Request) -> bytes:
        try:
            # One deadline for the whole body: a client trickling it would hold the connection forever.
            async with asyncio.timeout(self.config.body_timeout):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise body_too_large(self.config.client_max_size) from None
        except TimeoutError:
            raise body_timeout(self.config.body_timeout) from None
        except web.RequestPayloadError as err:
            # aiohttp decodes Content-Encoding (gzip, deflate, br) as it reads; bytes that are
            # not what the header says, or broken chunked framing, are the client's error.
            cause = err.__cause__
            encoding = request.headers.get("Content-Encoding")
            if isinstance(cause, ContentEncodingError) and encoding:
                raise body_undecodable(f"it is not valid {encoding.strip()} data (Content-Encoding)") from None
            raise body_undecodable("its framing is broken") from None
        # Read first, so the connection stays usable; then refused as vLLM 0.32 refuses any other type.
        content_type = request.headers.get("Content-Type")
        if not is_json_content_type(content_type):
            said = "has no Content-Type" if content_type is None else f"says {content_type!r:.80}"
            raise bad_request(
                f"The request body must be JSON, sent with Content-Type: application/json (this one {said})."
            )
        return body

    async def _route(
        self, route: str, parsed: ChatRequest | CompletionRequest, started: float, whole: bool = False
    ) -> Routed:
        lora_name = self._lora_for(parsed.model)
        t0 = time.perf_counter()
        param = "messages" if isinstance(parsed, ChatRequest) else "prompt"
        decision: Decision | None = None
        routed_head: HeadEncoding | None = None
        shared: tuple[WorkerKey, int] | None = None
        head = await self._tokenize_head(parsed)
        truncation = parsed.truncation
        if isinstance(head, HeadEncoding) and ((whole and head.prefix) or truncation is not None):
            # A truncated prompt keeps its last tokens (or first): only the whole prompt's ids tell which.
            head = await self._tokenized(self.preprocessor.finish_head_async(head, counted=False), param)
        while isinstance(head, HeadEncoding):
            # A prompt of which only the head is encoded (a long one's first chars, or a new turn's cached
            # prefix): it is routed on the head when the rest cannot change the choice (Router.route_head)
            # and it fits the context by a bound on its length, or by a wide margin on its estimate (twice
            # the rest's; the worker checks the exact count against its own max_model_len anyway and
            # answers a 400 of its own). Otherwise a longer head, or the whole prompt, is encoded.
            completion = parsed.max_tokens or 0
            margin = 2 * head.token_estimate - len(head.ids)
            if min(head.token_bound, margin) + completion > self.context_length:
                head = await self._tokenized(self.preprocessor.finish_head_async(head), param)
                break
            holder: tuple[WorkerKey, int] | None = None
            if head.holder is not None and isinstance(head.holder[0], WorkerKey):
                holder = (head.holder[0], head.holder[1])
            decision = self._route_or_raise(
                functools.partial(
                    self.router.route_head,
                    head.ids,
                    head.token_estimate,
                    lora_name=lora_name,
                    cache_salt=parsed.cache_salt,
                    exclude=self.fleet.down_keys,
                    token_bound=head.token_bound,
                    holder=holder,
                )
            )
            if decision is not None:
                prompt_tokens, routed_head = head.token_estimate, head
                break
            head = await self._tokenized(self.preprocessor.deepen_head_async(head), param)
        if isinstance(head, Tokenized):
            prompts = [head.ids]
            if isinstance(head.shared_tag, WorkerKey):
                shared = (head.shared_tag, head.shared_tokens)
        elif head is None:
            assert isinstance(parsed, CompletionRequest)
            encode = self.preprocessor.encode_prompt_async
            prompts = [await self._tokenized(encode(prompt), "prompt") for prompt in parsed.prompts]
        # A head-routed request's decision was made in this span: its time is the router's, not the tokenizer's.
        routing_seconds = decision.timings.total if decision is not None else 0.0
        tokenize_seconds = time.perf_counter() - t0 - routing_seconds
        if decision is None:
            if truncation is not None:
                # The engine computes, caches and counts only the tokens it keeps: so are they routed.
                prompts = [truncation.apply(ids, self.context_length) for ids in prompts]
                shared = None
            for token_ids in prompts:
                self._check_length(len(token_ids), parsed.max_tokens, param)
            # A batch of prompts goes to one worker; its first prompt decides where.
            decision = self._route_or_raise(
                lambda: self.router.route(
                    prompts[0],
                    lora_name=lora_name,
                    cache_salt=parsed.cache_salt,
                    exclude=self.fleet.down_keys,
                    shared=shared,
                )
            )
            assert decision is not None
            prompt_tokens = sum(len(p) for p in prompts)
        self.metrics.observe_routing(
            tokenize_seconds,
            {"hash": decision.timings.hash, "match": decision.timings.match, "score": decision.timings.score},
        )
        sequences = (1 if isinstance(parsed, ChatRequest) else len(parsed.prompts)) * parsed.n
        return Routed(
            route,
            started,
            prompt_tokens,
            decision,
            tokenize_seconds,
            sequences,
            parsed.stream,
            routed_head,
            lora_name,
        )

    @staticmethod
    def _route_or_raise(choose: Callable[[], Decision | None]) -> Decision | None:
        try:
            return choose()
        except NoWorkerAvailable as err:
            raise no_worker_available(f"No worker is available: {err.reason}") from None

    def _lora_for(self, model: str | None) -> str | None:
        if not model or model == self.model_name:  # vLLM serves an empty name as its model too
            return None
        if model in self.lora_adapters:
            return model
        raise model_not_found(model)

    async def _tokenize_head(self, parsed: ChatRequest | CompletionRequest) -> Tokenized | HeadEncoding | None:
        """One prompt's ids, or only its head (see ``Router.route_head``); None for a batch of prompts."""
        if isinstance(parsed, ChatRequest):
            work = self.preprocessor.encode_chat_head_async(parsed.messages, **parsed.template_args)
            return await self._tokenized(work, "messages")
        if len(parsed.prompts) != 1:
            return None
        return await self._tokenized(self.preprocessor.encode_prompt_head_async(parsed.prompts[0]), "prompt")

    @staticmethod
    async def _tokenized(work: Awaitable[T], param: str) -> T:
        try:
            return await work
        except TokenizerError as err:
            raise bad_request(str(err), param) from None

    def _check_length(self, prompt_tokens: int, max_tokens: int | None, param: str) -> None:
        """vLLM 0.32's limits: ``max_tokens`` at most the context window, and a prompt that leaves room for
        one output token. A prompt plus ``max_tokens`` over the window is not refused: the engine cuts the
        answer to fit (finish_reason ``length``)."""
        limit = self.context_length
        if max_tokens is not None and max_tokens > limit:
            raise bad_request(
                f"max_tokens={max_tokens} cannot be greater than the model's maximum context length of {limit} "
                "tokens. Please request fewer output tokens.",
                "max_tokens",
                code="context_length_exceeded",
            )
        if prompt_tokens >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your prompt contains "
                f"{prompt_tokens} input tokens, which leaves no room for an output token. "
                "Please reduce the length of the input prompt.",
                param,
                code="context_length_exceeded",
            )

    async def _forward(self, request: web.Request, body: bytes, routed: Routed) -> web.StreamResponse:
        decision = routed.decision
        request_id = str(next(self._request_ids))
        headers = forward_headers(request.headers, request.remote)
        flight: InFlight | None = None
        failure: UpstreamFailure | None = None
        failed_worker = NO_WORKER
        attempts = 0
        for key in decision.ranked:
            if attempts == self.config.max_attempts:
                break
            info = self.registry.get(key.worker_id)
            if info is None or (attempts and key in self.fleet.down_keys):
                continue
            attempts += 1
            if flight is None:
                flight = self.router.begin(request_id, decision, routed.prompt_tokens, key)
            else:
                flight.move_to(key)
            if routed.head is not None:
                if routed.head.prefix:
                    if attempts == 1:
                        # The rest of a new turn is encoded once the request is on its way to the worker (this
                        # runs when `post` first waits; a long rest on the tokenizer threads), then stored for
                        # the next turn and its blocks predicted where the request is by then (a retry
                        # predicts the whole prompt).
                        if self.preprocessor.long_rest(routed.head):
                            task = asyncio.create_task(self._finish_long_prefix_route(routed, flight))
                            self._background.add(task)
                            task.add_done_callback(self._background.discard)
                        else:
                            asyncio.get_running_loop().call_soon(self._finish_prefix_route, routed, flight)
                else:
                    # Its blocks past the head were never hashed, so never predicted: a prompt sharing them
                    # finds out from the prefix cache where they went (``Tokenized.shared_tag``). Tagging
                    # indexes every chunk of the text (~0.2 ms for 8k tokens), so it runs once the request
                    # is on its way, as the rest of a new turn's encode does; a retry tags its own worker.
                    asyncio.get_running_loop().call_soon(
                        self.preprocessor.tag_head, routed.head, key, self.router.prediction_ttl
                    )
            if attempts == 1:
                self.metrics.observe_forward(time.perf_counter() - routed.started)
            upstream: UpstreamResponse | None = None
            try:
                upstream = await self.upstream.post(info.base_url, routed.route, body, headers)
                if not upstream.streamed:
                    # A whole answer is read before the client gets a byte of it, so a worker that
                    # drops the connection mid-body is retried like one that drops it before answering.
                    await upstream.read()
            except UpstreamFailure as err:
                failure, failed_worker = err, key.worker_id
                if err.kind == "connect":
                    self.fleet.mark_down(key.worker_id, err.detail)
                if not err.retryable:
                    break
                self.metrics.child(self.metrics.retries, key.worker_id, err.kind).inc()
                log.info("request %s: %s; trying the next worker", request_id, err.detail)
                continue
            except BaseException:
                if upstream is not None:
                    upstream.close()  # the client left while its answer was read: the worker stops
                flight.finish()
                raise
            return await self._answer(request, routed, flight, upstream)
        if failure is None:
            error = no_worker_available("No worker is available: every candidate is down")
        else:
            log.warning("request %s failed: %s", request_id, failure.detail)
            if failure.kind == "timeout":
                error = upstream_timeout(failure.public(failed_worker))
            else:
                tried = f"{attempts} attempt{'s' if attempts != 1 else ''}"
                error = upstream_failed(f"{failure.public(failed_worker)} (after {tried})")
        if flight is None:
            self.metrics.refused(routed.route, error.status)
            return error.response(NO_WORKER)
        # The last worker tried answers for the failure.
        flight.report_usage(None, streamed=False, served=False)
        flight.finish(Outcome(routed.route, str(error.status)))
        return error.response(flight.key.worker_id)

    def _finish_prefix_route(self, routed: Routed, flight: InFlight) -> None:
        assert routed.head is not None
        try:
            ids = self.preprocessor.finish_prefix_route(routed.head)
        except TokenizerError as err:  # the head was encoded, so the rest cannot fail; the worker has it anyway
            log.warning("request %s: encoding the rest of its prompt failed: %s", flight.request_id, err)
            return
        self.router.extend(flight, ids, lora_name=routed.lora_name)

    async def _finish_long_prefix_route(self, routed: Routed, flight: InFlight) -> None:
        assert routed.head is not None
        try:
            ids = await self.preprocessor.finish_prefix_route_async(routed.head)
        except TokenizerError as err:
            log.warning("request %s: encoding the rest of its prompt failed: %s", flight.request_id, err)
            return
        self.router.extend(flight, ids, lora_name=routed.lora_name)

    def _router_metrics(self):
        """The cost model's learned rates and the predictions of sent blocks."""
        speed = self.router.speed
        rate = GaugeMetricFamily(
            "kvgate_worker_prefill_tokens_per_second",
            "Learned prefill speed per worker (kv cost model)",
            labels=["worker"],
        )
        overhead = GaugeMetricFamily(
            "kvgate_worker_ttft_overhead_seconds", "Learned fixed part of a first token per worker", labels=["worker"]
        )
        hold = GaugeMetricFamily(
            "kvgate_worker_hold_seconds",
            "Learned time a request keeps its KV blocks per worker, sent to finished (the memory wait's unit)",
            labels=["worker"],
        )
        for worker in sorted(info.worker_id for info in self.registry.all()):
            learned = speed.speed(worker)
            rate.add_metric((worker,), learned.tokens_per_second)
            overhead.add_metric((worker,), learned.overhead)
            hold.add_metric((worker,), speed.hold_seconds(worker))
        yield rate
        yield overhead
        yield hold
        yield GaugeMetricFamily(
            "kvgate_router_decode_slowdown",
            "Learned growth of per-token prefill time per unit of KV usage (decode load)",
            value=speed.decode_slowdown,
        )
        tier = GaugeMetricFamily(
            "kvgate_router_tier_block_seconds", "Learned cost of loading one block back from a tier", labels=["tier"]
        )
        tier.add_metric(("cpu",), speed.tier_block_seconds[1])
        tier.add_metric(("disk",), speed.tier_block_seconds[2])
        yield tier
        samples = CounterMetricFamily(
            "kvgate_router_speed_samples", "Answers the cost model learned from (or rejected)", labels=["result"]
        )
        samples.add_metric(("learned",), float(speed.samples))
        samples.add_metric(("rejected",), float(speed.rejected))
        yield samples
        p = self.indexer.predictions
        yield GaugeMetricFamily("kvgate_predicted_blocks", "Sent blocks counted held, not yet confirmed", value=len(p))
        outcomes = CounterMetricFamily(
            "kvgate_prediction_blocks", "Predicted blocks by what became of them", labels=["outcome"]
        )
        for name in ("predicted", "confirmed", "expired", "evicted"):
            outcomes.add_metric((name,), float(getattr(p, name)))
        yield outcomes

    async def _answer(
        self, request: web.Request, routed: Routed, flight: InFlight, upstream: UpstreamResponse
    ) -> web.StreamResponse:
        worker = flight.key.worker_id
        exchange = Exchange(routed.started)
        status = "500"
        try:
            response = await relay(
                request,
                upstream,
                worker,
                exchange,
                on_first_byte=flight.first_token,
                on_gap=self.metrics.child(self.metrics.itl, worker).observe,
            )
            status = str(response.status)
            return response
        except UpstreamFailure as err:
            log.warning("request %s failed: %s", flight.request_id, err.detail)
            public = err.public(worker)
            failed = upstream_timeout(public) if err.kind == "timeout" else upstream_failed(public)
            status = str(failed.status)
            return failed.response(worker)
        except (ClientGone, asyncio.CancelledError) as err:
            status = "499"
            if isinstance(err, asyncio.CancelledError):
                raise
            return web.Response(status=499)
        except Exception as err:
            raise CountedFailure() from err
        finally:
            if exchange.complete:
                upstream.release()
            else:
                # Closing the connection is what tells the worker to abort the generation.
                upstream.close()
            # A streamed answer's first byte timed its first token: the router learns from it.
            flight.report_usage(
                exchange.cached_tokens,
                streamed=routed.stream and status == "200",
                served=status == "200",
                prompt_tokens=exchange.prompt_tokens if routed.head is not None else None,
            )
            flight.finish(Outcome(routed.route, status, exchange, routed.sequences))
            if exchange.upstream_error is not None:
                log.warning("request %s: %s", flight.request_id, exchange.upstream_error)

    def _distributed_metrics(self):
        yield from self._router_metrics()
        yield from self.fleet.collect()
        if self.bus is not None:
            yield from self.bus.collect(self.fleet.nats_fed)
        if self.discovery is not None:
            d = self.discovery
            yield GaugeMetricFamily(
                "kvgate_discovery_connected", "1 while the etcd watch is established", value=float(d.connected)
            )
            yield GaugeMetricFamily("kvgate_discovery_revision", "Last etcd revision applied", value=float(d.revision))
            for name in ("resyncs", "compactions", "watch_restarts", "puts", "deletes", "invalid_records"):
                family = CounterMetricFamily(f"kvgate_discovery_{name}", f"etcd discovery: {name.replace('_', ' ')}")
                family.add_metric((), float(getattr(d.stats, name)))
                yield family


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Whatever escapes a handler leaves as OpenAI-style JSON, and the gateway keeps serving."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return from_http_exception(exc).response()
    except ApiError as err:
        return err.response()
    except asyncio.CancelledError:
        raise
    except Exception as err:
        log.exception("unhandled error on %s %s", request.method, request.path)
        error = internal_error()
        if not isinstance(err, CountedFailure):
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else request.path
            request.app[GATEWAY_KEY].metrics.refused(route, error.status)
        return error.response(NO_WORKER)


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_NAME


def build_app(config: GatewayConfig, preprocessor: Preprocessor | None = None) -> web.Application:
    """The public application; the admin endpoints' one, unless on the public port, is its ``ADMIN_APP_KEY``."""
    gateway = Gateway(config, preprocessor)
    app = web.Application(client_max_size=config.client_max_size, middlewares=[openai_errors])
    app[GATEWAY_KEY] = gateway

    async def lifecycle(app: web.Application):
        await gateway.start()
        # What is loaded by now (tokenizer, vocabularies, modules) lives as long as the process:
        # frozen, it is out of the collector's reach, so a full collection no longer walks it
        # and stalls every thread, the event loop included, for 0.2-0.3 s.
        gc.freeze()
        yield
        gc.unfreeze()
        await gateway.stop()

    app.cleanup_ctx.append(lifecycle)
    app.on_response_prepare.append(server_header)
    app.router.add_post(CHAT, gateway.chat_completions)
    app.router.add_post(COMPLETIONS, gateway.completions)
    app.router.add_post("/tokenize", gateway.tokenize)
    app.router.add_post("/detokenize", gateway.detokenize)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/v1/models/{model:.+}", gateway.model)
    app.router.add_get("/health", gateway.health)
    if config.admin_on_public_port:
        app[ADMIN_APP_KEY] = None
        _add_admin_routes(app, gateway)
        return app
    admin = web.Application(client_max_size=config.client_max_size, middlewares=[openai_errors])
    admin[GATEWAY_KEY] = gateway
    admin.on_response_prepare.append(server_header)
    admin.router.add_get("/health", gateway.admin_health)
    _add_admin_routes(admin, gateway)
    app[ADMIN_APP_KEY] = admin
    return app


def _add_admin_routes(app: web.Application, gateway: Gateway) -> None:
    app.router.add_get("/metrics", gateway.metrics_endpoint)
    app.router.add_post("/debug/route", gateway.debug_route)
