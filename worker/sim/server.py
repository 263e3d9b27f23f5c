"""The HTTP surface of the simulated worker (aiohttp), shaped like vLLM's OpenAI server.

Handlers parse and validate (``protocol``), tokenize (``prompt``), submit to the engine
loop and serialize; they hold no policy. Every error — bad JSON, bad fields, unknown
model or route, a prompt over the context window — is answered as an OpenAI-style JSON
error with its 4xx status, and the engine keeps serving. A client that disconnects
(the handler is cancelled, or a stream write fails) aborts its request, freeing its
blocks. Request headers (``X-Request-Id`` and the like) are accepted and ignored. Every
answered request is recorded as vLLM's HTTP instrumentation records it (``/metrics``'
``http_*`` families): its route, method, status, sizes and duration.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from aiohttp import web

from kvgate.worker.sim import metrics, protocol
from kvgate.worker.sim.answer import Vocabulary
from kvgate.worker.sim.config import SimConfig
from kvgate.worker.sim.engine_loop import EngineLoop, RequestHandle
from kvgate.worker.sim.prompt import PromptRenderer
from kvgate.worker.sim.protocol import ApiError, GenerateParams
from kvgate.worker.sim.publisher import KvEventPublisher, kv_event_sources
from kvgate.worker.sim.scheduler import Scheduler

log = logging.getLogger(__name__)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error(exc: ApiError) -> web.Response:
    return _json(exc.body(), exc.status)


def _route(request: web.Request) -> str:
    """The route a request matched, as the instrumentator names it: ``none`` when no path did."""
    info = request.match_info
    resource = info.route.resource
    if resource is not None:
        return resource.canonical
    if isinstance(getattr(info, "http_exception", None), web.HTTPMethodNotAllowed):
        return request.path  # the path is a route's, only not for this method
    return "none"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _http_metrics(stats: metrics.HttpStats) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        response = await handler(request)
        stats.observe(
            _route(request),
            request.method,
            response.status,
            request.content_length or 0,
            response.content_length or 0,
            time.perf_counter() - start,
        )
        return response

    return record


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(ApiError(exc.status, exc.reason if exc.status != 404 else f"not found: {request.path}"))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(ApiError(500, "internal error in the simulated engine"))


class SimServer:
    """Handlers bound to one engine, renderer and model name."""

    def __init__(self, config: SimConfig, engine: EngineLoop, renderer: PromptRenderer) -> None:
        self.config = config
        self.engine = engine
        self.renderer = renderer
        self.model = config.model_name
        self.registry = metrics.make_registry(engine, self.model)
        self.created = int(time.time())
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    def close(self) -> None:
        self._tokenize.shutdown(wait=False, cancel_futures=True)

    async def models(self, request: web.Request) -> web.Response:
        return _json(
            protocol.models_list(self.model, str(self.config.model_dir), self.config.engine.max_model_len, self.created)
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.engine.alive else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.registry.render(), headers={"Content-Type": metrics.CONTENT_TYPE})

    async def kv_event_sources(self, request: web.Request) -> web.Response:
        return _json(kv_event_sources(self.config.events))

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        # vLLM's answer: 200 with {"success": false} while requests hold blocks, unless
        # ?reset_running_requests=true preempts them first.
        preempt = request.query.get("reset_running_requests", "false").lower() in ("1", "true", "yes")
        return _json({"success": self.engine.reset_prefix_cache(preempt)})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, protocol.parse_chat, "chatcmpl")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, protocol.parse_completion, "cmpl")

    async def _generate(self, request: web.Request, parse: Callable[[Any], GenerateParams], prefix: str):
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        params = parse(body)
        if params.model is not None and params.model != self.model:
            raise ApiError(404, f"The model `{params.model}` does not exist.", "model")
        # Off the event loop (as vLLM does): a long prompt takes milliseconds to encode,
        # which would otherwise stall every running request's engine steps. One thread:
        # a fast tokenizer must not be used from two threads at once.
        prompt_ids = await asyncio.get_running_loop().run_in_executor(self._tokenize, self.renderer.token_ids, params)
        max_tokens = protocol.resolve_max_tokens(params, len(prompt_ids), self.config.engine.max_model_len)
        if not self.engine.alive:
            raise ApiError(503, "the engine is not running")
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        handle = self.engine.submit(
            response_id, prompt_ids, max_tokens, params.stop, params.ignore_eos, params.cache_salt
        )
        try:
            if params.stream:
                return await self._stream(request, params, handle)
            return await self._complete(params, handle)
        finally:
            if not handle.finished:
                self.engine.abort(handle)

    def _usage(self, handle: RequestHandle) -> dict[str, Any]:
        return protocol.usage(
            handle.prompt_tokens,
            handle.completion_tokens,
            handle.cached_tokens,
            handle.created_cache_tokens,
            handle.cached_tokens_per_tier,
        )

    async def _complete(self, params: GenerateParams, handle: RequestHandle) -> web.Response:
        parts = [delta.text async for delta in handle.deltas()]
        return _json(
            protocol.response(
                params.kind,
                handle.request_id,
                int(time.time()),
                self.model,
                "".join(parts),
                handle.finish_reason,
                handle.stop_reason,
                self._usage(handle),
            )
        )

    async def _stream(self, request: web.Request, params: GenerateParams, handle: RequestHandle) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        kind, rid, created, model, usage = (
            params.kind,
            handle.request_id,
            int(time.time()),
            self.model,
            params.include_usage,
        )

        async def send(obj: dict[str, Any]) -> None:
            await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

        # vLLM sends a chat stream's role chunk with the engine's first output, not on
        # arrival (chat_completion/serving.py: inside `async for res in result_generator`),
        # so its first byte times the first token, prefill included.
        role_due = kind == "chat"
        try:
            async for delta in handle.deltas():
                if role_due:
                    role_due = False
                    await send(protocol.chunk(kind, rid, created, model, "", role=True, include_usage=usage))
                if delta.text or delta.finish_reason is not None:
                    await send(
                        protocol.chunk(
                            kind,
                            rid,
                            created,
                            model,
                            delta.text,
                            delta.finish_reason,
                            delta.stop_reason,
                            include_usage=usage,
                        )
                    )
            if role_due:
                await send(protocol.chunk(kind, rid, created, model, "", role=True, include_usage=usage))
            if usage:
                await send(protocol.usage_chunk(kind, rid, created, model, self._usage(handle)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client hung up; the caller aborts the request
        return resp


def build_app(config: SimConfig, renderer: PromptRenderer | None = None) -> web.Application:
    """The worker as an aiohttp app; binds the event sockets now, runs the engine with the app."""
    config.engine.validate()
    config.answer.validate()
    renderer = renderer or PromptRenderer.from_dir(config.model_dir)
    renderer.trust_request_chat_template = config.trust_request_chat_template
    vocab = Vocabulary.from_tokenizer(renderer.tokenizer)
    publisher = KvEventPublisher(config.events) if config.events.endpoint else None
    engine = EngineLoop(Scheduler(config.engine), vocab, config.answer, publisher)
    server = SimServer(config, engine, renderer)
    app = web.Application(middlewares=[_http_metrics(server.registry.http), _errors], client_max_size=64 * 1024 * 1024)

    async def lifecycle(app: web.Application):
        if publisher is not None:
            publisher.start()
        engine.start()
        yield
        await engine.stop()
        if publisher is not None:
            await publisher.close()
        server.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/v1/models", server.models)
    app.router.add_get("/health", server.health)
    app.router.add_get("/metrics", server.prometheus)
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_post("/reset_prefix_cache", server.reset_prefix_cache)
    app.router.add_get("/kv_event_sources", server.kv_event_sources)
    return app
