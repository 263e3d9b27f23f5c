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
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from aiohttp import web

from kvgate.protocol.http import UNSUPPORTED_MEDIA_TYPE, is_json_content_type
from kvgate.worker.sim import metrics, protocol
from kvgate.worker.sim.answer import Vocabulary, logprobs_key, step_logprobs
from kvgate.worker.sim.config import SimConfig
from kvgate.worker.sim.engine_loop import Delta, EngineLoop, ParentRequest, RequestHandle
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
        # FastAPI's own answers to a path or method no route has: {"detail": ...}, not an OpenAI error.
        return _json({"detail": exc.reason}, exc.status)
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
        self.vocab = engine.vocab
        self._pieces: dict[int, str] = {}  # texts of tokens outside the answer vocabulary (echoed prompts)
        self._decoded: dict[int, str] = {}  # tokens as prompt logprobs show them, special ones included
        self.fingerprint = protocol.system_fingerprint(repr((self.model, config.engine)))

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

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``/tokenize``: a prompt's (or a rendered chat's) token ids."""
        tokenize = protocol.parse_tokenize(await self._json_request(request))
        self._check_model(tokenize.params.model)
        ids = await asyncio.get_running_loop().run_in_executor(
            self._tokenize, self.renderer.tokenize, tokenize.params, tokenize.add_special_tokens
        )
        strs = self.renderer.token_strs(ids) if tokenize.return_token_strs else None
        max_model_len = self.config.engine.max_model_len
        return _json({"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``/detokenize``: token ids back to text."""
        model, ids = protocol.parse_detokenize(await self._json_request(request))
        self._check_model(model)
        return _json({"prompt": self.renderer.detokenize(ids)})

    async def _json_request(self, request: web.Request) -> Any:
        raw = await request.read()
        if not is_json_content_type(request.headers.get("Content-Type")):
            raise protocol.validation_error([UNSUPPORTED_MEDIA_TYPE])
        return protocol.json_body(raw)

    def _check_model(self, model: str | None) -> None:
        if model and model != self.model:  # vLLM serves an empty name as its model too
            raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: {self.model}.", "model")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, protocol.parse_chat, "chatcmpl")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, protocol.parse_completion, "cmpl")

    async def _generate(self, request: web.Request, parse: Callable[[Any], GenerateParams], prefix: str):
        params = parse(await self._json_request(request))
        self._check_model(params.model)
        # Off the event loop (as vLLM does): a long prompt takes milliseconds to encode,
        # which would otherwise stall every running request's engine steps. One thread:
        # a fast tokenizer must not be used from two threads at once.
        prompts = await asyncio.get_running_loop().run_in_executor(self._tokenize, self._token_ids, params)
        protocol.check_vocabulary(params, self.renderer.vocab_size)
        max_model_len = self.config.engine.max_model_len
        if params.truncate is not None:
            side = params.truncation_side
            prompts = [protocol.truncated(ids, params.truncate, side, max_model_len) for ids in prompts]
        budgets = [protocol.resolve_max_tokens(params, len(ids), max_model_len) for ids in prompts]
        if not self.engine.alive:
            raise ApiError(503, "the engine is not running")
        response_id = protocol.response_id(prefix)
        sink: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        handles = self._submit(response_id, params, prompts, budgets, sink)
        try:
            answer = _Answer(params, handles, sink, prompts, self._text, self.vocab, self._decode)
            if params.stream:
                return await self._stream(request, params, response_id, answer)
            return await self._complete(params, response_id, answer)
        finally:
            for handle in handles:
                if not handle.finished:
                    self.engine.abort(handle)

    def _token_ids(self, params: GenerateParams) -> list[list[int]]:
        if params.kind == "chat" or len(params.prompts) <= 1:
            return [self.renderer.token_ids(params)]
        return [self.renderer.token_ids(dataclasses.replace(params, prompt=p)) for p in params.prompts]

    def _submit(
        self,
        response_id: str,
        params: GenerateParams,
        prompts: list[list[int]],
        budgets: list[int],
        sink: asyncio.Queue[tuple[int, Delta]],
    ) -> list[RequestHandle]:
        """An engine request per prompt and choice, as vLLM runs a batch (``{id}-{prompt}``) and
        ``n`` > 1 (parallel sampling: ``{choice}_{id}``, one sampler each)."""
        n = params.n
        handles: list[RequestHandle] = []
        for p, (ids, budget) in enumerate(zip(prompts, budgets, strict=True)):
            item = response_id if len(prompts) == 1 else f"{response_id}-{p}"
            parent = ParentRequest(n, n) if n > 1 else None
            for i in range(n):
                handles.append(
                    self.engine.submit(
                        item if n == 1 else f"{i}_{item}",
                        ids,
                        max(budget, 1),
                        params.stop,
                        params.ignore_eos,
                        params.cache_salt,
                        sample=i,
                        index=p * n + i,
                        sink=sink,
                        parent=parent,
                    )
                )
        return handles

    async def _complete(self, params: GenerateParams, response_id: str, answer: _Answer) -> web.Response:
        texts: list[list[str]] = [[] for _ in answer.handles]
        steps: list[list[Any]] = [[] for _ in answer.handles]
        generated: list[list[int]] = [[] for _ in answer.handles]
        async for index, delta in answer.deltas():
            text, logprobs = answer.shown(index, delta)
            texts[index].append(text)
            steps[index].extend(logprobs)
            generated[index].extend(delta.token_ids)
        # vLLM's final output carries the cached tokens of the engine request that finished last (the
        # last prompt's, for a batch).
        last = answer.handles[next(i for i in reversed(answer.finished) if i // params.n == answer.prompts - 1)]
        echoed = protocol.chat_echo(params)
        prompt_logprobs = [answer.prompt_logprobs(p) for p in range(answer.prompts)]
        ids = params.return_token_ids
        choices = [
            protocol.Choice(
                echoed + "".join(t),
                h.finish_reason,
                h.stop_reason,
                answer.logprobs_object(st, 0),
                prompt_logprobs[i // params.n],
                generated[i] if ids else None,
                answer.prompt_ids[i // params.n] if ids else None,
            )
            for i, (t, st, h) in enumerate(zip(texts, steps, answer.handles, strict=True))
        ]
        return _json(
            protocol.response(
                params.kind,
                response_id,
                int(time.time()),
                self.model,
                choices,
                answer.usage(last),
                self.fingerprint,
                params.role,
            )
        )

    def _decode(self, token_id: int) -> str:
        """A token as vLLM's prompt logprobs name it (``decode([id])``, special tokens shown)."""
        piece = self._decoded.get(token_id)
        if piece is None:
            piece = self._decoded[token_id] = self.renderer.tokenizer.decode([token_id]) or ""
        return piece

    def _text(self, token_id: int) -> str:
        """A token's text as vLLM's detokenizer shows it in logprobs (special tokens skipped)."""
        piece = self.vocab.pieces.get(token_id)
        if piece is None:
            piece = self._pieces.get(token_id)
            if piece is None:
                piece = self._pieces[token_id] = self.renderer.tokenizer.decode([token_id], skip_special_tokens=True)
        return piece

    async def _stream(
        self, request: web.Request, params: GenerateParams, response_id: str, answer: _Answer
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        kind, rid, model, usage = params.kind, response_id, self.model, params.include_usage
        created = int(time.time())
        generated = [0] * len(answer.handles)

        async def send(obj: dict[str, Any], index: int = 0) -> None:
            if params.continuous_usage and obj.get("choices"):
                # stream_options.continuous_usage_stats: every chunk counts the choice's tokens so far.
                prompt_tokens, done = len(answer.prompt_ids[index // params.n]), generated[index]
                obj = protocol.with_running_usage(obj, prompt_tokens, done)
            await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

        ids = params.return_token_ids

        async def open_choices() -> None:
            prompt_ids = answer.prompt_ids[0] if ids else None
            for i in range(len(answer.handles)):
                await send(
                    protocol.chunk(
                        kind, rid, created, model, "", role=params.role, index=i, prompt_token_ids=prompt_ids
                    ),
                    i,
                )
            # An echoed chat answer: vLLM 0.32 builds the echo chunk from the last message's content as
            # parts, which its delta refuses: the stream carries that error after the role chunks, then ends.
            if protocol.chat_echo(params):
                raise protocol.StreamedEchoError(params)

        # vLLM sends a chat stream's role chunks, one per choice, with the engine's first output, not on
        # arrival (chat_completion/serving.py: inside `async for res in result_generator`), so its
        # first byte times the first token, prefill included. Usage counts the cached tokens of the
        # engine request whose output came first.
        role_due = kind == "chat"
        first: RequestHandle | None = None
        try:
            async for index, delta in answer.deltas():
                if first is None:
                    first = answer.handles[index]
                if role_due:
                    role_due = False
                    await open_choices()
                text, steps = answer.shown(index, delta)
                generated[index] += len(delta.token_ids)
                # vLLM sends a completions chunk for every step that generated tokens, its text empty while a
                # stop string holds it back; a chat chunk only with text, or logprobs or token ids to carry.
                carried = (steps or (ids and delta.token_ids)) if kind == "chat" else delta.token_ids
                if text or delta.finish_reason is not None or carried:
                    await send(
                        protocol.chunk(
                            kind,
                            rid,
                            created,
                            model,
                            text,
                            delta.finish_reason,
                            delta.stop_reason,
                            index=index,
                            logprobs=answer.logprobs_object(steps, answer.offsets[index]),
                            fingerprint=None if usage else self.fingerprint,
                            token_ids=list(delta.token_ids) if ids else None,
                            prompt_token_ids=answer.prompt_ids_due(index) if kind == "completion" else None,
                        ),
                        index,
                    )
                    # vLLM advances text_offset by the tokens reported, not by the text (held back for stop strings).
                    answer.offsets[index] += sum(len(step[0]) for step in steps)
            if role_due:
                await open_choices()
            if usage:
                await send(
                    protocol.usage_chunk(
                        kind, rid, created, model, answer.usage(first or answer.handles[0]), self.fingerprint
                    )
                )
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except protocol.StreamedEchoError as err:
            await resp.write(b"data: " + orjson.dumps(err.body()) + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client hung up; the caller aborts the request
        return resp


class _Answer:
    """The engine requests of one HTTP request, their deltas read from one queue as they come, and
    what each choice shows of them: its text (after the prompt, when echoed) and its logprobs."""

    def __init__(
        self,
        params: GenerateParams,
        handles: list[RequestHandle],
        sink: asyncio.Queue[tuple[int, Delta]],
        prompts: list[list[int]],
        text: Callable[[int], str],
        vocabulary: Vocabulary,
        decode: Callable[[int], str],
    ) -> None:
        self.params = params
        self.vocabulary = vocabulary
        self.handles = handles
        self.sink = sink
        self.prompt_ids = prompts
        self.prompt_tokens = sum(len(ids) for ids in prompts)  # each prompt once, whatever n
        self.prompts = len(prompts)
        self.offsets = [0] * len(handles)  # completions' text_offset: characters of the tokens reported, per choice
        self._text = text
        self._decode = decode
        self._positions = [0] * len(handles)  # tokens generated so far, per choice
        self._echoed = [False] * len(handles)
        self._prompt_ids_sent = [False] * len(handles)
        self.finished: list[int] = []  # the choices' indices, in the order they ended
        # Seeds of the made-up logprobs (hashing each prompt: only when asked for).
        self._keys = (
            [logprobs_key(prompts[h.index // params.n], h.index % params.n) for h in handles]
            if params.logprobs is not None
            else []
        )

    def shown(self, index: int, delta: Delta) -> tuple[str, list[Any]]:
        """The text a delta shows and its logprob steps (none unless asked): an echoed completion's first
        delta carries its prompt first; with max_tokens 0, only the prompt (the one token vLLM generates
        for it is not shown)."""
        params = self.params
        text, steps = delta.text, self._steps(index, delta.token_ids)
        if not params.echo or params.kind != "completion":
            return text, steps  # a chat answer's echo is the last message (protocol.chat_echo)
        if params.max_tokens == 0:
            text, steps = "", []
        if not self._echoed[index]:
            self._echoed[index] = True
            # With return_token_ids vLLM echoes the prompt's ids (and logprobs), not its text.
            text = ("" if params.return_token_ids else self._prompt_text(index)) + text
            steps = self._prompt_steps(index) + steps
        return text, steps

    def prompt_ids_due(self, index: int) -> list[int] | None:
        """A completions stream's prompt ids: on a choice's first chunk, with return_token_ids or echo."""
        if self._prompt_ids_sent[index] or not (self.params.return_token_ids or self.params.echo):
            return None
        self._prompt_ids_sent[index] = True
        return self.prompt_ids[index // self.params.n]

    def logprobs_object(self, steps: list[Any], offset: int) -> dict[str, Any] | None:
        if self.params.logprobs is None:
            return None
        if self.params.kind == "chat":
            return protocol.chat_logprobs(steps)
        return protocol.completion_logprobs(steps, offset)

    def _steps(self, index: int, token_ids: Sequence[int]) -> list[Any]:
        top = self.params.logprobs
        if top is None or not token_ids:
            return []
        key, start = self._keys[index], self._positions[index]
        self._positions[index] += len(token_ids)
        return [self._step(key, start + j, t, top) for j, t in enumerate(token_ids)]

    def _step(self, key: int, position: int, token_id: int, top: int) -> tuple[str, float, list[tuple[str, float]]]:
        dist = step_logprobs(self.vocabulary, key, position, token_id, max(top, 1))
        # Chat lists the first top_logprobs of them; completions up to logprobs + 1 (OpenAI's rule).
        shown = dist[:top] if self.params.kind == "chat" else dist
        return self._text(token_id), dist[0][1], [(self._text(t), lp) for t, lp in shown]

    def _prompt_text(self, index: int) -> str:
        prompt = self.params.prompts[index // self.params.n] if self.params.prompts else ""
        if isinstance(prompt, str):
            return prompt
        return "".join(self._text(t) for t in prompt)

    def prompt_logprobs(self, prompt: int) -> list[dict[str, Any] | None] | None:
        """vLLM's prompt logprobs of prompt ``prompt`` (None unless asked): none for its first token,
        then per position its own token and the ``prompt_logprobs`` most likely, keyed by token id
        with logprob, rank and decoded text (the figures an echoed prompt's logprobs show)."""
        top = self.params.prompt_logprobs
        if top is None:
            return None
        ids = self.prompt_ids[prompt]
        key = logprobs_key(ids, -1)
        out: list[dict[str, Any] | None] = [None]
        for position, token_id in enumerate(ids[1:], 1):
            # The prompt's token first (in this made-up world the most likely: rank 1), then the rest of
            # the top k; step_logprobs lists each token once.
            dist = step_logprobs(self.vocabulary, key, position, token_id, max(top, 1))
            out.append(
                {
                    str(t): {"logprob": lp, "rank": rank, "decoded_token": self._decode(t)}
                    for rank, (t, lp) in enumerate(dist, 1)
                }
            )
        return out

    def _prompt_steps(self, index: int) -> list[Any]:
        """An echoed prompt's logprobs: none for its first token, as vLLM's prompt logprobs."""
        top = self.params.logprobs
        if top is None:
            return []
        ids = self.prompt_ids[index // self.params.n]
        key = logprobs_key(ids, -1)
        first = [(self._text(ids[0]), None, None)]
        return first + [self._step(key, j, t, top) for j, t in enumerate(ids[1:], 1)]

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        while len(self.finished) < len(self.handles):
            index, delta = await self.sink.get()
            yield index, delta
            if delta.finish_reason is not None:
                self.finished.append(index)

    def usage(self, reference: RequestHandle) -> dict[str, Any]:
        """vLLM's usage of the answer: prompts counted once, every choice's tokens, and the cache
        figures of ``reference`` (the engine output vLLM reads them from; completions report no
        created cache tokens)."""
        return protocol.usage(
            self.prompt_tokens,
            sum(h.completion_tokens for h in self.handles),
            reference.cached_tokens,
            reference.created_cache_tokens if self.params.kind == "chat" else None,
            reference.cached_tokens_per_tier,
        )


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
    app.router.add_post("/tokenize", server.tokenize)
    app.router.add_post("/detokenize", server.detokenize)
    app.router.add_post("/reset_prefix_cache", server.reset_prefix_cache)
    app.router.add_get("/kv_event_sources", server.kv_event_sources)
    return app
