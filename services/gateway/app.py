"""The OpenAI-compatible HTTP API: routes, auth, limits and the request lifecycle.

Lifecycle of a generation request: read (bounded) → validate → tokenize → check the context →
submit on the shared Serve stream → wait for the first step (a refusal still becomes a 400) →
answer (SSE or one JSON body). Whatever ends the handler early (client disconnect cancels it,
a write fails, an error) aborts the request at the executor in `finally`, which frees its blocks
within one scheduler step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from pagemesh.services.gateway.chat import PromptError, Tokenizer
from pagemesh.services.gateway.errors import APIError, invalid
from pagemesh.services.gateway.executor_client import ExecutorClient, ExecutorUnavailable
from pagemesh.services.gateway.generation import ChoiceDelta, Generation, TokenInfo, build_request
from pagemesh.services.gateway.kvmanager_link import KVManagerLink
from pagemesh.services.gateway.metrics import GatewayMetrics
from pagemesh.services.gateway.responses import ChatFormatter, CompletionFormatter, ResponseMeta
from pagemesh.services.gateway.sse import SSEWriter, encode_event
from pagemesh.services.gateway.trace import RequestTimes, RequestTrace
from pagemesh.services.gateway.turnstile import Turnstile
from pagemesh.services.gateway.validation import (
    ChatRequest,
    CompletionRequest,
    Limits,
    check_context,
    parse_chat,
    parse_completion,
    parse_json,
)

from pagemesh.heap import freeze_startup_heap

log = logging.getLogger("pagemesh.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class GatewayConfig:
    executor: str = "127.0.0.1:50052"
    kvmanager: str | None = None
    model_name: str | None = None  # None: the executor's model name
    tokenizer: str | None = None  # None: the executor's model_path
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 << 20
    # Generations in flight at once; more get a 429 instead of queueing without bound.
    max_concurrent: int = 1024
    limits: Limits = field(default_factory=Limits)
    trace_requests: str = ""  # a JSON line per request there (trace.py)


class Gateway:
    """Process-wide state: the executor stream, the tokenizer and the metrics."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.client = ExecutorClient(config.executor)
        self.turnstile = Turnstile()  # one request's ingest per loop iteration (turnstile.py)
        # kvmanager's stats (/metrics) and health (/health); it is not on the token path.
        self.kvmanager = KVManagerLink(config.kvmanager) if config.kvmanager else None
        self.metrics = GatewayMetrics(self.kvmanager)
        self.tokenizer: Tokenizer | None = None
        self.model_name = config.model_name or ""
        self.max_model_len = 0
        self.created = int(time.time())
        self.in_flight = 0
        self.trace = RequestTrace(config.trace_requests) if config.trace_requests else None
        self._prepare_task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.tokenizer is not None and self.client.connected

    async def start(self) -> None:
        self._prepare_task = asyncio.create_task(self._prepare(), name="gateway-prepare")
        self._prepare_task.add_done_callback(_log_prepare_failure)

    async def _prepare(self) -> None:
        """Waits for the executor, loads the tokenizer, opens the Serve stream. A failure is
        logged (_log_prepare_failure); /health then keeps answering 503."""
        # The HTTP port is open from the start (health says 503) while the executor loads.
        info = await self.client.wait_for_info()
        self.max_model_len = info.max_model_len
        if info.max_beam_width:  # beam.py checks beam_width against the executor's limits
            width = info.max_beam_width
            if info.max_num_seqs:  # each beam runs as a sequence of its own
                width = min(width, info.max_num_seqs)
            self.config.limits.max_beam_width = width
        if not self.model_name:
            self.model_name = info.model
        path = self.config.tokenizer or info.model_path or info.model
        log.info("loading tokenizer from %s", path)
        self.tokenizer = await asyncio.to_thread(Tokenizer.load, path)
        freeze_startup_heap()
        self.client.start()
        log.info(
            "serving %r (max_model_len %d) via executor %s",
            self.model_name,
            self.max_model_len,
            self.config.executor,
        )

    async def stop(self) -> None:
        if self._prepare_task is not None:
            self._prepare_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._prepare_task
        await self.client.close()
        if self.trace is not None:
            self.trace.close()
        if self.kvmanager is not None:
            await self.kvmanager.close()

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise invalid(
                f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                param="model",
                code="model_not_found",
            )


GATEWAY = web.AppKey("gateway", Gateway)


def _openai_error_for_http(exc: web.HTTPException) -> APIError:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    messages = {
        404: "Unknown request URL. Please check the URL and method.",
        405: "Method not allowed for this URL.",
        413: "The request body is too large.",
    }
    return APIError(messages.get(exc.status, exc.reason), status=exc.status, type=kind)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _openai_error_for_http(exc).response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return APIError(
            "The server had an error while processing your request.",
            status=500,
            type="server_error",
        ).response()


def auth_middleware(keys: list[str]) -> Middleware:
    encoded = [k.encode() for k in keys]

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if encoded and request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            token = header[7:].strip().encode() if header.startswith("Bearer ") else b""
            # Constant-time comparison: key checks must not leak a key through timing.
            if not any(hmac.compare_digest(token, k) for k in encoded):
                raise APIError(
                    "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                    status=401,
                    code="invalid_api_key",
                )
        return await handler(request)

    return middleware


async def _read_body(request: web.Request, limit: int) -> bytes:
    # Refuse on the declared length before reading anything; aiohttp enforces the real size.
    if request.content_length is not None and request.content_length > limit:
        raise APIError(f"The request body exceeds {limit} bytes.", status=413)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise APIError(f"The request body exceeds {limit} bytes.", status=413) from None


def _gateway(request: web.Request) -> Gateway:
    gw = request.app[GATEWAY]
    if not gw.ready:
        raise APIError(
            "The model is not ready yet; retry shortly.", status=503, type="server_error"
        )
    return gw


async def chat_completions(request: web.Request) -> web.StreamResponse:
    times = RequestTimes(entry=RequestTimes.now())
    gw = _gateway(request)
    await gw.turnstile.turn()
    body = parse_json(await _read_body(request, gw.config.max_body_bytes))
    req = parse_chat(body, gw.config.limits)
    gw.check_model(req.model)
    assert gw.tokenizer is not None
    times.parsed = RequestTimes.now()
    try:
        prompt_ids = await gw.tokenizer.encode_chat_async(req.messages)
    except PromptError as exc:
        raise invalid(str(exc), param="messages") from None
    times.encoded = RequestTimes.now()
    meta = ResponseMeta.new("chatcmpl", gw.model_name)
    fmt = ChatFormatter(meta, req.include_usage, req.options.logprobs)
    return await _generate(request, gw, "chat", req, prompt_ids, fmt, times)


async def completions(request: web.Request) -> web.StreamResponse:
    times = RequestTimes(entry=RequestTimes.now())
    gw = _gateway(request)
    await gw.turnstile.turn()
    body = parse_json(await _read_body(request, gw.config.max_body_bytes))
    req = parse_completion(body, gw.config.limits)
    gw.check_model(req.model)
    assert gw.tokenizer is not None
    times.parsed = RequestTimes.now()
    if isinstance(req.prompt, str):
        prompt_ids = await gw.tokenizer.encode_async(req.prompt, add_special_tokens=True)
        prompt_text = req.prompt
    else:
        prompt_ids = req.prompt
        prompt_text = gw.tokenizer.decode(prompt_ids) if req.echo else ""
    times.encoded = RequestTimes.now()
    meta = ResponseMeta.new("cmpl", gw.model_name)
    echo = prompt_text if req.echo else ""
    fmt = CompletionFormatter(meta, req.include_usage, req.options.logprobs, echo)
    return await _generate(request, gw, "completions", req, prompt_ids, fmt, times)


async def _generate(
    request: web.Request,
    gw: Gateway,
    endpoint: str,
    req: ChatRequest | CompletionRequest,
    prompt_ids: list[int],
    fmt: ChatFormatter | CompletionFormatter,
    times: RequestTimes,
) -> web.StreamResponse:
    if not prompt_ids:
        raise invalid("The prompt is empty after tokenization.", param="prompt")
    info = gw.client.info  # refreshed whenever the Serve stream reopens (executor restart)
    vocab = info.vocab_size if info else 0
    if max(prompt_ids) >= (vocab or 1 << 32):  # ids go to the executor as u32
        raise invalid(
            f"Token ids must be below the vocabulary size {vocab or 1 << 32}.", param="prompt"
        )
    max_model_len = info.max_model_len if info else gw.max_model_len
    capacity = info.num_blocks * info.block_size if info else 0
    max_tokens = check_context(req.options, len(prompt_ids), max_model_len, capacity)
    if gw.in_flight >= gw.config.max_concurrent:
        raise APIError(
            f"Too many requests in flight (limit {gw.config.max_concurrent}); retry shortly.",
            status=429,
            type="requests",
            code="rate_limit_exceeded",
        )
    request_id = gw.client.new_request_id(endpoint)
    grpc_req = build_request(request_id, prompt_ids, req.options, max_tokens)
    started = time.monotonic()
    assert gw.tokenizer is not None
    try:
        gen = Generation(gw.client, grpc_req, prompt_ids, gw.tokenizer, req.options.stop)
    except ExecutorUnavailable as exc:
        raise APIError(str(exc), status=503, type="server_error") from None
    times.submitted = RequestTimes.now()
    gw.in_flight += 1
    gw.metrics.in_flight.inc()
    status = "error"
    try:
        first = await gen.first_step()
        times.first_step = RequestTimes.now()
        gw.metrics.ttft.observe(time.monotonic() - started)
        if req.stream:
            response = await _stream(request, gen, first, fmt, times)
        else:
            response = await _collect(gen, first, fmt)
        status = "ok"
        return response
    except APIError as exc:
        status = str(exc.status)
        raise
    except ExecutorUnavailable as exc:
        status = "503"
        raise APIError(str(exc), status=503, type="server_error") from None
    except (asyncio.CancelledError, ConnectionResetError):
        status = "disconnected"
        gw.metrics.aborts.labels("client_disconnect").inc()
        raise
    finally:
        await gen.close()
        if gw.trace is not None:
            gw.trace.write(request_id, times)
        gw.in_flight -= 1
        gw.metrics.in_flight.dec()
        gw.metrics.requests.labels(endpoint, status).inc()
        gw.metrics.duration.observe(time.monotonic() - started)
        if status == "ok":
            gw.metrics.prompt_tokens.inc(gen.prompt_tokens)
            gw.metrics.cached_tokens.inc(gen.cached_tokens)
            gw.metrics.completion_tokens.inc(gen.completion_tokens)


async def _collect(
    gen: Generation, first: list[ChoiceDelta], fmt: ChatFormatter | CompletionFormatter
) -> web.Response:
    logprobs: list[list[TokenInfo]] = [[] for _ in range(gen.n)]
    for delta in first:
        logprobs[delta.index].extend(delta.logprobs)
    async for deltas in gen.steps():
        for delta in deltas:
            logprobs[delta.index].extend(delta.logprobs)
    return web.json_response(fmt.completion(gen, logprobs))


async def _stream(
    request: web.Request,
    gen: Generation,
    first: list[ChoiceDelta],
    fmt: ChatFormatter | CompletionFormatter,
    times: RequestTimes,
) -> web.StreamResponse:
    sse = SSEWriter(request)
    chunks = fmt.role_chunks(gen.n)
    for delta in first:
        chunks.extend(fmt.delta_chunks(delta))
    await sse.send_many(chunks)
    times.first_write = RequestTimes.now()
    try:
        async for deltas in gen.steps():
            await sse.send_many([c for d in deltas for c in fmt.delta_chunks(d)])
    except (APIError, ExecutorUnavailable) as exc:
        # Headers are gone already: report in-band the way OpenAI does, then end the stream.
        err = (
            exc
            if isinstance(exc, APIError)
            else APIError(str(exc), status=503, type="server_error")
        )
        await sse.response.write(encode_event(err.body()))
        await sse.response.write_eof()
        return sse.response
    if fmt.include_usage:
        await sse.send(fmt.usage_chunk(gen))
    await sse.done()
    return sse.response


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    data: list[dict[str, Any]] = []
    if gw.model_name:
        data.append(
            {
                "id": gw.model_name,
                "object": "model",
                "created": gw.created,
                "owned_by": "pagemesh",
                "max_model_len": gw.max_model_len,
            }
        )
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    """200 while this gateway can serve (tokenizer loaded, executor stream open), else 503. With
    `--kvmanager`, the body also says how kvmanager and its Redis link are: a Redis outage leaves
    the status 200 (serving goes on, kvmanager writes its state behind once Redis is back) but
    "degraded", and so does a kvmanager that does not answer the check."""
    gw = request.app[GATEWAY]
    body: dict[str, str]
    if gw.ready:
        body = {"status": "ok", "model": gw.model_name}
    else:
        body = {"status": "loading" if gw.tokenizer is None else "executor unavailable"}
    if gw.kvmanager is not None:
        parts = await gw.kvmanager.health()
        body.update(parts)
        if gw.ready and (parts["kvmanager"] != "serving" or parts["redis"] == "unreachable"):
            body["status"] = "degraded"
    return web.json_response(body, status=200 if gw.ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[GATEWAY].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


def create_app(config: GatewayConfig) -> web.Application:
    # client_max_size is aiohttp's own hard bound on a body; the handler checks it first.
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[error_middleware, auth_middleware(config.api_keys)],
    )
    gateway = Gateway(config)
    app[GATEWAY] = gateway

    async def on_startup(_: web.Application) -> None:
        await gateway.start()

    async def on_cleanup(_: web.Application) -> None:
        await gateway.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


def _log_prepare_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("gateway could not start serving", exc_info=task.exception())
