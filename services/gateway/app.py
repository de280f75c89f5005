"""The OpenAI-compatible HTTP API: routes, auth, limits and the request lifecycle.

Lifecycle of a generation request: read (bounded) → the model it names (served_models.py: 404
unknown, 503 not servable now) → validate → tokenize → check the context → route (router.py: one
executor of that model) → submit on that executor's Serve stream → wait for the first step (a
refusal still becomes a 400) → answer (SSE or one JSON body). Whatever ends the handler early
(client disconnect cancels it, a write fails, an error) aborts the request at the executor that
holds it in `finally`, which frees its blocks within one scheduler step. An executor that fails
under a request does not end it: Generation migrates it (migration.py).

Every response carries an `x-request-id` (the client's own when it sent a usable one); server
errors name it in their message and the logs name it next to what really failed, so a report
can be matched to the log without showing the client the mesh's insides. It also carries
`x-pagemesh-worker`, the gateway process that answered (workers.py restarts a dead one).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from pagemesh.services.gateway.chat import PromptError, Tokenizer
from pagemesh.services.gateway.errors import (
    EXECUTOR_UNAVAILABLE,
    GENERATION_FAILED,
    INTERNAL_ERROR,
    RETRY_AFTER_S,
    APIError,
    invalid,
)
from pagemesh.services.gateway.executor_client import ExecutorClient, ExecutorUnavailable
from pagemesh.services.gateway.fleet import FleetFollower, StaticFleet
from pagemesh.services.gateway.generation import ChoiceDelta, Generation, TokenInfo, build_request
from pagemesh.services.gateway.kvmanager_link import KVManagerLink
from pagemesh.services.gateway.metrics import CLIENT_CLOSED, GatewayMetrics
from pagemesh.services.gateway.migration import MigrationPolicy, Migrator
from pagemesh.services.gateway.openapi import build_openapi
from pagemesh.services.gateway.prompt_logprobs import PromptView
from pagemesh.services.gateway.responses import (
    ChatFormatter,
    CompletionFormatter,
    ResponseMeta,
    ToolMode,
    usage,
)
from pagemesh.services.gateway.router import FleetRouter, LocalRouter, Router
from pagemesh.services.gateway.served_models import ModelRegistry, ServedModel
from pagemesh.services.gateway.sse import SSEWriter, encode_event
from pagemesh.services.gateway.structured import refusal_error
from pagemesh.services.gateway.tool_parsers import parser_for_template
from pagemesh.services.gateway.tools import prepare_messages
from pagemesh.services.gateway.trace import RequestTimes, RequestTrace
from pagemesh.services.gateway.turnstile import Turnstile
from pagemesh.services.gateway.validation import (
    ChatRequest,
    CompletionRequest,
    Limits,
    check_context,
    check_logit_bias,
    parse_chat,
    parse_completion,
    parse_json,
)

log = logging.getLogger("pagemesh.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ParsedT = TypeVar("ParsedT", ChatRequest, CompletionRequest)


DEFAULT_EXECUTOR = "127.0.0.1:50052"  # cli.DEFAULT_EXECUTOR: neither executors nor kvmanager

RECONNECT_POLL_S = 0.1  # how often a request waiting for a restarting executor looks again
REQUEST_ID_HEADER = "X-Request-Id"
# The gateway process (its pid) that answered: with --workers N, which worker a response came
# from, so that a client whose stream a worker's death cut can tell it from other failures.
WORKER_HEADER = "X-Pagemesh-Worker"
REQUEST_ID = web.RequestKey("request_id", str)
# A client's own request id is echoed (as vLLM does) when it is a plain token of sane length;
# anything else is replaced, so that a header never carries what the logs can't hold.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass(slots=True)
class GatewayConfig:
    # Static mode: these executors (none and no kvmanager: DEFAULT_EXECUTOR). Fleet mode (none
    # and a kvmanager): whichever executors kvmanager's fleet has (fleet.py).
    executors: list[str] = field(default_factory=list)
    kvmanager: str | None = None
    model_name: str | None = None  # static mode; None: each executor's model name
    tokenizer: str | None = None  # static mode; None: the executor's model_path
    routing_policy: str = "kv"  # fleet mode: Route's policy (router.POLICIES)
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 << 20
    # Generations in flight at once; more get a 429 instead of queueing without bound.
    max_concurrent: int = 1024
    limits: Limits = field(default_factory=Limits)
    trace_requests: str = ""  # a JSON line per request there (trace.py)
    # Request migration (migration.py): how often a request may move, how long it waits for an
    # executor to take it.
    migration: MigrationPolicy = field(default_factory=MigrationPolicy)
    # The tool-call syntax parsed out of `auto` outputs (tool_parsers.PARSERS); empty: the one
    # the model's chat template teaches.
    tool_call_parser: str = ""
    # > 0: open the HTTP port only once a model can be served, or after this many seconds. A
    # worker that replaces a dead one (workers.py) shares the port with workers that serve:
    # listening before its tokenizer and Serve stream are up, it would take its share of new
    # connections only to answer them 503. 0: at once (health says 503 while executors load).
    listen_when_ready_s: float = 0.0

    @property
    def fleet_mode(self) -> bool:
        return not self.executors and bool(self.kvmanager)


class Gateway:
    """Process-wide state: the served models and their executors' streams, the router, the
    metrics."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.fleet_mode = config.fleet_mode
        self.turnstile = Turnstile()  # one request's ingest per loop iteration (turnstile.py)
        # kvmanager's stats (/metrics) and health (/health); it is not on the token path.
        self.kvmanager = KVManagerLink(config.kvmanager) if config.kvmanager else None
        self.metrics = GatewayMetrics(self.kvmanager)
        self.router: Router
        self.fleet: FleetFollower | StaticFleet
        if self.fleet_mode:
            assert config.kvmanager is not None
            if config.model_name or config.tokenizer:
                log.warning("--model-name and --tokenizer apply to --executor only: ignored")
            self.registry = ModelRegistry(config.limits)
            self.fleet = FleetFollower(config.kvmanager, self.registry)
            self.router = FleetRouter(config.kvmanager, config.routing_policy)
        else:
            self.registry = ModelRegistry(config.limits, config.tokenizer)
            executors = config.executors or [DEFAULT_EXECUTOR]
            self.fleet = StaticFleet(executors, self.registry, config.model_name)
            self.router = LocalRouter()
        self.in_flight = 0
        self.trace = RequestTrace(config.trace_requests) if config.trace_requests else None

    @property
    def ready(self) -> bool:
        return self.registry.ready

    @property
    def client(self) -> ExecutorClient:
        """The executor stream of the single-executor mode (tests and tools look at it)."""
        return next(iter(self.registry.members.values())).client

    async def start(self) -> None:
        # The HTTP port is open from the start (health says 503) while executors load, unless
        # listen_when_ready_s holds it back (create_app's on_startup runs before the bind).
        self.fleet.start()
        if self.config.listen_when_ready_s > 0:
            await self._wait_ready(self.config.listen_when_ready_s)

    async def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready:
            if time.monotonic() >= deadline:
                log.warning(
                    "no model servable after %.0fs: listening anyway (health says 503)", timeout_s
                )
                return
            await asyncio.sleep(RECONNECT_POLL_S)

    async def stop(self) -> None:
        await self.fleet.close()
        await self.registry.close()
        await self.router.close()
        if self.trace is not None:
            self.trace.close()
        if self.kvmanager is not None:
            await self.kvmanager.close()

    async def model_for(self, body: dict[str, Any]) -> ServedModel | None:
        """The model a request body names (404/503 when it can't be served), or None when it
        names none: the body's validation then says what is wrong. While the model's executors
        are only reconnecting (one restarting), the request waits for one, as long as a
        migrating request would (--migration-wait), instead of failing at once."""
        name = body.get("model")
        if not isinstance(name, str):
            return None
        wait_s = self.config.migration.wait_s
        deadline = time.monotonic() + wait_s
        while self.registry.reconnecting(name) and time.monotonic() < deadline:
            await asyncio.sleep(RECONNECT_POLL_S)
        return self.registry.resolve(name)


GATEWAY = web.AppKey("gateway", Gateway)


def _openai_error_for_http(exc: web.HTTPException) -> APIError:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    messages = {
        404: "Unknown request URL. Please check the URL and method.",
        405: "Method not allowed for this URL.",
        413: "The request body is too large.",
    }
    return APIError(messages.get(exc.status, exc.reason), status=exc.status, type=kind)


def _route_label(request: web.Request) -> str:
    """The route template a request matched ("/v1/models/{model}"), so that ids and unknown
    URLs never become label values of their own."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "other"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts every request once by route and status code, whatever answered it: a handler, a
    4xx/5xx from the middlewares inside this one (auth, errors), or a client that went away."""
    counter = request.app[GATEWAY].metrics.requests
    code = "500"
    try:
        response = await handler(request)
        code = str(response.status)
        return response
    except web.HTTPException as exc:
        code = str(exc.status)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        code = CLIENT_CLOSED
        raise
    finally:
        counter.labels(_route_label(request), code).inc()


def request_id_of(request: web.Request) -> str:
    return request.get(REQUEST_ID, "")


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Gives the request its id (the client's X-Request-Id when usable, else a new one); every
    response, a stream's included, carries it back (on_response_prepare)."""
    sent = request.headers.get(REQUEST_ID_HEADER, "")
    request[REQUEST_ID] = sent if _CLIENT_REQUEST_ID.fullmatch(sent) else f"req-{uuid.uuid4().hex}"
    return await handler(request)


async def _send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rid = request_id_of(request)
    if rid:
        response.headers[REQUEST_ID_HEADER] = rid
    response.headers[WORKER_HEADER] = str(os.getpid())


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request_id_of(request)
    try:
        return await handler(request)
    except APIError as exc:
        return exc.with_request_id(rid).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _openai_error_for_http(exc).with_request_id(rid).response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("request %s: unhandled error on %s %s", rid, request.method, request.path)
        return (
            APIError(INTERNAL_ERROR, status=500, type="server_error")
            .with_request_id(rid)
            .response()
        )


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


def _check_content_type(request: web.Request) -> None:
    """A body declared as anything but JSON (a form, plain text) is a 415, as vLLM answers: it
    would otherwise be parsed as JSON it never claimed to be. No Content-Type at all is let
    through (aiohttp would call it application/octet-stream), so bare clients keep working."""
    if "Content-Type" in request.headers and request.content_type != "application/json":
        raise APIError(
            f"Unsupported Content-Type {request.content_type!r}; send the body as"
            " 'application/json'.",
            status=415,
            code="unsupported_media_type",
        )


async def _ingest(
    request: web.Request, parse: Callable[[dict[str, Any], Limits], ParsedT]
) -> tuple[Gateway, ServedModel, ParsedT]:
    """The request's turn, its body, the model it names (404 unknown, 503 not servable now) and
    the body validated against that model's limits (its executors' beam width)."""
    gw = request.app[GATEWAY]
    _check_content_type(request)
    await gw.turnstile.turn()
    body = parse_json(await _read_body(request, gw.config.max_body_bytes))
    model = await gw.model_for(body)
    req = parse(body, model.limits if model is not None else gw.config.limits)
    if model is None:  # not reached: a body without a model string fails validation
        model = gw.registry.resolve(req.model)
    return gw, model, req


async def chat_completions(request: web.Request) -> web.StreamResponse:
    times = RequestTimes(entry=RequestTimes.now())
    gw, model, req = await _ingest(request, parse_chat)
    tokenizer = model.tokenizer
    assert tokenizer is not None  # resolve() returns ready models only
    times.parsed = RequestTimes.now()
    template = tokenizer.chat_template
    messages, tools = prepare_messages(req.messages, req.tools, template)
    try:
        prompt_ids = await tokenizer.encode_chat_async(messages, tools)
    except PromptError as exc:
        raise invalid(str(exc), param="messages") from None
    times.encoded = RequestTimes.now()
    meta = ResponseMeta.new("chatcmpl", model.name)
    tool_mode = None
    if req.tools is not None and req.tools.choice != "none":
        parser = parser_for_template(template, gw.config.tool_call_parser)
        tool_mode = ToolMode(req.tools.choice, parser, req.tools.function)
    fmt = ChatFormatter(meta, req.include_usage, req.options.logprobs, tool_mode)
    return await _generate(request, gw, model, "chat", req, prompt_ids, fmt, times)


async def completions(request: web.Request) -> web.StreamResponse:
    times = RequestTimes(entry=RequestTimes.now())
    gw, model, req = await _ingest(request, parse_completion)
    tokenizer = model.tokenizer
    assert tokenizer is not None  # resolve() returns ready models only
    times.parsed = RequestTimes.now()
    if isinstance(req.prompt, str):
        prompt_ids = await tokenizer.encode_async(req.prompt, add_special_tokens=True)
        prompt_text = req.prompt
    else:
        prompt_ids = req.prompt
        # Before echo decodes them: an id past the vocabulary (or u64) made decode raise, a 500.
        _check_token_ids(model, prompt_ids)
        prompt_text = tokenizer.decode(prompt_ids) if req.echo else ""
    times.encoded = RequestTimes.now()
    meta = ResponseMeta.new("cmpl", model.name)
    echo = prompt_text if req.echo else ""
    fmt = CompletionFormatter(meta, req.include_usage, req.options.logprobs, echo)
    return await _generate(request, gw, model, "completions", req, prompt_ids, fmt, times)


async def _generate(
    request: web.Request,
    gw: Gateway,
    model: ServedModel,
    endpoint: str,
    req: ChatRequest | CompletionRequest,
    prompt_ids: list[int],
    fmt: ChatFormatter | CompletionFormatter,
    times: RequestTimes,
) -> web.StreamResponse:
    if not prompt_ids:
        raise invalid("The prompt is empty after tokenization.", param="prompt")
    _check_token_ids(model, prompt_ids)
    bounds = model.bounds()  # the tightest of its executors': any of them can take the request
    if bounds.vocab_size:
        check_logit_bias(req.options, bounds.vocab_size)
    max_tokens = check_context(req.options, len(prompt_ids), bounds.max_model_len, bounds.capacity)
    if gw.in_flight >= gw.config.max_concurrent:
        raise APIError(
            f"Too many requests in flight (limit {gw.config.max_concurrent}); retry shortly.",
            status=429,
            type="requests",
            code="rate_limit_exceeded",
        )
    grpc_req = build_request("", prompt_ids, req.options, max_tokens)
    # One choice per request, n > 1 and beams included: they are one GenerateRequest.
    route = await gw.router.route(model, grpc_req.prompt_token_data, req.options.cache_salt)
    member = route.member
    times.routed = RequestTimes.now()
    times.executor = member.executor_id
    times.route_reason = route.reason
    gw.metrics.routed.labels(member.executor_id, route.reason).inc()
    # Aborts and choice aborts (Generation) go up the stream of the executor holding it.
    request_id = grpc_req.request_id = member.client.new_request_id(endpoint)
    started = time.monotonic()
    tokenizer = model.tokenizer
    assert tokenizer is not None
    http_id = request_id_of(request)
    log.debug("request %s is %s on executor %s", http_id, request_id, member.executor_id)
    migrator = Migrator(
        gw.config.migration,
        gw.router,
        gw.registry,
        gw.metrics,
        model.name,
        req.options.cache_salt,
        member,
        label=http_id,
    )
    try:
        gen = Generation(member.client, grpc_req, prompt_ids, tokenizer, req.options.stop, migrator)
    except ExecutorUnavailable as exc:
        raise _unavailable(exc, http_id) from None
    times.submitted = RequestTimes.now()
    gw.in_flight += 1
    gw.metrics.in_flight.inc()
    ok = False
    try:
        first = await gen.first_step()
        times.first_step = RequestTimes.now()
        _extensions(fmt, req, gen, prompt_ids, tokenizer)
        gw.metrics.ttft.observe(time.monotonic() - started)
        if req.stream:
            response = await _stream(request, gen, first, fmt, times, http_id)
        else:
            response = await _collect(gen, first, fmt)
        ok = True
        member.note_result(failed=False)
        return response
    except APIError as exc:
        if exc.status >= 500:  # the executor failed it (a refusal is the request's fault)
            member.note_result(failed=True)
        if req.options.guide is not None:  # a grammar the executor could not compile
            raise refusal_error(exc, req.options.guide) from None
        raise
    except ExecutorUnavailable as exc:
        member.note_result(failed=True)
        raise _unavailable(exc, http_id) from None
    except (asyncio.CancelledError, ConnectionResetError):
        gw.metrics.aborts.labels("client_disconnect").inc()
        raise
    finally:
        await gen.close()
        if gw.trace is not None:
            times.http_id = http_id
            gw.trace.write(request_id, times)
        gw.in_flight -= 1
        gw.metrics.in_flight.dec()
        gw.metrics.duration.observe(time.monotonic() - started)
        if ok:
            gw.metrics.prompt_tokens.inc(gen.prompt_tokens)
            gw.metrics.cached_tokens.inc(gen.cached_tokens)
            gw.metrics.completion_tokens.inc(gen.completion_tokens)


def _extensions(
    fmt: ChatFormatter | CompletionFormatter,
    req: ChatRequest | CompletionRequest,
    gen: Generation,
    prompt_ids: list[int],
    tokenizer: Tokenizer,
) -> None:
    """What the formatter shows beyond OpenAI's fields (responses._Extensions): known once the
    first step is in, which carries the prompt's logprobs."""
    o = req.options
    if o.tokens_as_ids or o.prompt_logprobs is not None or o.echo_logprobs:
        fmt.prompt = PromptView(
            prompt_ids,
            tokenizer.token_text,
            tokenizer.token_bytes,
            gen.prompt_logprobs,
            as_ids=o.tokens_as_ids,
            field_wanted=o.prompt_logprobs is not None,
            echo_logprobs=o.echo_logprobs,
        )
    if req.stream and req.continuous_usage:
        fmt.live_usage = lambda: usage(gen)


def _check_token_ids(model: ServedModel, prompt_ids: list[int]) -> None:
    limit = model.bounds().vocab_size or 1 << 32  # ids go to the executor as u32
    if prompt_ids and max(prompt_ids) >= limit:
        raise invalid(f"Token ids must be below the vocabulary size {limit}.", param="prompt")


def _unavailable(exc: ExecutorUnavailable, request_id: str) -> APIError:
    log.warning("request %s failed: %s", request_id, exc)
    return APIError(EXECUTOR_UNAVAILABLE, status=503, type="server_error")


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
    request_id: str = "",
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
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client is gone: nothing to end
    except Exception as exc:
        # Headers are gone already: report in-band the way OpenAI does, then end the stream.
        if isinstance(exc, APIError):
            err = exc
        elif isinstance(exc, ExecutorUnavailable):
            err = _unavailable(exc, request_id)
        else:  # a bug: its traceback for the log, a plain error event for the client
            log.exception("request %s: the stream failed", request_id)
            err = APIError(GENERATION_FAILED, status=500, type="server_error")
        await sse.response.write(encode_event(err.with_request_id(request_id).body()))
        # The terminator still follows, and the body's end: clients stop reading at [DONE],
        # and an HTTP client reads a complete (chunked) body, not a connection cut short.
        await sse.done()
        return sse.response
    if fmt.include_usage:
        await sse.send(fmt.usage_chunk(gen))
    await sse.done()
    return sse.response


def _model_object(model: ServedModel) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": "pagemesh",
        "max_model_len": model.max_model_len,
    }


def _listed(gw: Gateway) -> list[ServedModel]:
    # Known and loaded: not a name that would 503 "loading".
    models = sorted(gw.registry.models.values(), key=lambda m: m.name)
    return [m for m in models if m.tokenizer is not None]


async def list_models(request: web.Request) -> web.Response:
    """Each served model once, whichever number of executors serve it (OpenAI's list)."""
    data = [_model_object(m) for m in _listed(request.app[GATEWAY])]
    return web.json_response({"object": "list", "data": data})


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: the model object the list holds, or OpenAI's 404."""
    name = request.match_info["model"]
    for model in _listed(request.app[GATEWAY]):
        if model.name == name:
            return web.json_response(_model_object(model))
    raise APIError(
        f"The model '{name}' does not exist or you do not have access to it.",
        status=404,
        param="model",
        code="model_not_found",
    )


async def health(request: web.Request) -> web.Response:
    """200 while this gateway can serve (a model's tokenizer loaded, an executor stream open
    whose executor is not failing every request: served_models.FAILING_AFTER), else 503. Static mode names its model ("model"), fleet mode lists those it can serve now
    ("models") and counts the executors it follows. With `--kvmanager`, the body also says how
    kvmanager and its Redis link are: a Redis outage leaves the status 200 (serving goes on,
    kvmanager writes its state behind once Redis is back) but "degraded", and so does a
    kvmanager that does not answer the check."""
    gw = request.app[GATEWAY]
    registry = gw.registry
    body: dict[str, Any]
    can_serve = gw.ready and any(m.routable and not m.failing for m in registry.members.values())
    if not gw.ready:
        body = {"status": "loading" if registry.loading else "executor unavailable"}
    elif not can_serve:
        body = {"status": "executor failing"}
    elif gw.fleet_mode:
        serving = sorted(m.name for m in registry.models.values() if m.ready)
        body = {"status": "ok", "models": serving}
    else:
        body = {"status": "ok", "model": next(m.name for m in registry.models.values() if m.ready)}
    if gw.fleet_mode:
        members = registry.members.values()
        body["executors"] = {
            "total": len(members),
            "routable": sum(1 for m in members if m.routable),
        }
    if gw.kvmanager is not None:
        parts = await gw.kvmanager.health()
        body.update(parts)
        if can_serve and (parts["kvmanager"] != "serving" or parts["redis"] == "unreachable"):
            body["status"] = "degraded"
    headers = None if can_serve else {"Retry-After": str(RETRY_AFTER_S)}
    return web.json_response(body, status=200 if can_serve else 503, headers=headers)


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[GATEWAY].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


def openapi_handler(document: dict[str, Any]) -> Handler:
    """GET /openapi.json: the document for this gateway's limits, no key needed (as /health)."""

    async def handler(_: web.Request) -> web.Response:
        return web.json_response(document)

    return handler


def create_app(config: GatewayConfig) -> web.Application:
    # client_max_size is aiohttp's own hard bound on a body; the handler checks it first.
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[
            request_id_middleware,
            metrics_middleware,
            error_middleware,
            auth_middleware(config.api_keys),
        ],
    )
    app.on_response_prepare.append(_send_request_id)
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
    # {model:.+}: ids may hold slashes ("org/name"), as OpenAI's fine-tune ids hold colons.
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_handler(build_openapi(config.limits)))
    return app
