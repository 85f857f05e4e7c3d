"""The OpenAI-compatible HTTP front: a FastAPI app served by a Ray Serve ingress deployment.

Routes: POST /v1/chat/completions, POST /v1/completions (streaming or not), GET /v1/models,
GET /health, GET /metrics (Prometheus text: this replica's request metrics plus every engine
replica's, as vLLM serves them), GET /openapi.json (serving/openapi_doc.py). Errors are OpenAI
error JSON with a fitting 4xx/5xx status.

Per request: auth -> body limit -> parse and validate -> model -> tokenize once -> limits ->
orchestrator (unified or disaggregated) -> JSON or SSE. A client that disconnects cancels the
handler task; closing the orchestrator stream cancels the engine calls, which abort the request
and free its KV pages. An engine replica that dies under a request is failed over
(serving/failover.py); a draining ingress (serving/drain.py) refuses new requests with 503.
"""

# No `from __future__ import annotations` here: FastAPI reads route parameter types at runtime,
# and string annotations on Serve-wrapped methods do not resolve (every route then answers 422).
import asyncio
import dataclasses
import hmac
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serving import metrics, openapi_doc
from serving.config import ServingConfig
from serving.drain import Drain
from serving.errors import (
    InternalError,
    NotFound,
    OpenAIError,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    Unavailable,
    from_exception,
)
from serving.failover import FailoverPolicy
from serving.metrics_hub import MetricsPublisher
from serving.openai_adapter import Limits, check_model, parse, plan
from serving.openai_response import ChoiceResult, ResponseBuilder
from serving.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)
from serving.orchestrator import run_disaggregated, run_selective, run_unified
from serving.protocol import GenerateRequest, PrefillResponse
from serving.routing import own_request_id
from serving.streaming import RequestTimer, collect, merge, prompt_only, sse, sse_events

log = logging.getLogger(__name__)

app = FastAPI(title="IndexCache Serve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
openapi_doc.install(app)  # the request models, as the routes read their bodies themselves
LIMITS_TTL_S = 30.0  # how long the engines' reported context length is trusted
LIMITS_TIMEOUT_S = 10.0  # how long a limits refresh waits for each engine role
LIMITS_RETRY_S = 1.0  # after a refresh that got no answer
# /health waits this long for each engine role: it must answer within a second, also (503)
# while a role has no replica that can answer.
HEALTH_TIMEOUT_S = 0.8


class _DisconnectOnCancelledReceive:
    """ASGI middleware: a client that disconnects mid-stream is a disconnect, not an error.

    Serve's replica-side `receive` fetches ASGI messages from the proxy with a remote call; when
    the client goes away the proxy cancels that call and `receive` raises TaskCancelledError
    (Ray 2.60 turns only a KeyError into `http.disconnect`). Starlette's streaming response then
    fails the request and Serve logs an ERROR traceback per dropped stream. Here it becomes the
    `http.disconnect` message the ASGI spec has for it, and the stream is cancelled as usual."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def receive_or_disconnect():
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await self.app(scope, receive_or_disconnect, send)


app.add_middleware(_DisconnectOnCancelledReceive)


def _error(e: OpenAIError, headers: dict | None = None) -> JSONResponse:
    retry = getattr(e, "retry_after_s", None)
    if retry is not None:
        headers = {**(headers or {}), "Retry-After": str(retry)}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@app.exception_handler(OpenAIError)
async def _openai_error(_request: Request, e: OpenAIError) -> JSONResponse:
    return _error(e)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
    cls = NotFound if e.status_code == 404 else OpenAIError
    err = cls(str(e.detail))
    err.status = e.status_code
    if e.status_code == 405:
        err.type = "invalid_request_error"
    return _error(err, getattr(e, "headers", None))  # 405 keeps its Allow header


@app.exception_handler(ClientDisconnect)
async def _client_gone(_request: Request, _e: ClientDisconnect) -> Response:
    # The client left while sending its body: no work started and nobody reads an answer (499,
    # nginx's "client closed request"); not an error of ours to log.
    return Response(status_code=499)


@app.exception_handler(Exception)
async def _unexpected(_request: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return _error(from_exception(e))


async def _cancel_on_exit(gen) -> AsyncIterator[Any]:
    """A Serve streaming response as an async generator whose closing cancels the remote call."""
    try:
        async for item in gen:
            yield item
    finally:
        gen.cancel()


@serve.deployment
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, config: dict, unified=None, prefill=None, decode=None):
        from model.tokenizer import Tokenizer

        self.config = ServingConfig.model_validate(config)
        self.model_name = self.config.model_name
        self.tokenizer = Tokenizer.from_pretrained(self.config.model)
        ic = self.config.ingress
        self.limits = Limits(
            ic.max_body_bytes,
            self.config.max_prompt_tokens(),
            self.config.max_model_len(),
            ic.max_tokens_limit,
            ic.default_max_tokens,
        )
        self.limits = dataclasses.replace(self.limits, max_choices=ic.max_choices)
        self._config_max_len = self.limits.max_model_len
        self._limits_at = float("-inf")
        self._limits_lock = asyncio.Lock()
        self._tool_setup(ic.tool_call_parser)
        self._keys = tuple(k.encode() for k in ic.api_keys)
        self._unified, self._prefill, self._decode = unified, prefill, decode
        # Requests in flight = live orchestrator streams. A weak set, not a counter: a stream
        # whose response is cancelled before its body starts is never iterated (no `finally`
        # runs), but it is dropped, and so leaves the set.
        self._live: weakref.WeakSet = weakref.WeakSet()
        replica = serve.get_replica_context().replica_id.unique_id
        self.recorder = metrics.Recorder(self.model_name, "ingress", replica)
        self.recorder.declare_failover()
        self.publisher = MetricsPublisher(
            self.config.app_name, f"ingress:{replica}", self.config.metrics_interval_s
        )
        self.drain_state = Drain()

    # -- clients of the engine deployments (orchestrator protocols) ------------------------------
    def generate(self, req: GenerateRequest):
        own_request_id()
        return _cancel_on_exit(self._unified.options(stream=True).generate.remote(req))

    def prefill(self, req: GenerateRequest):
        own_request_id()
        return _cancel_on_exit(self._prefill.options(stream=True).prefill.remote(req))

    def decode(self, req):
        own_request_id()
        return _cancel_on_exit(self._decode.options(stream=True).decode.remote(req))

    def generate_or_defer(self, req: GenerateRequest):
        own_request_id()
        return _cancel_on_exit(self._decode.options(stream=True).generate_or_defer.remote(req))

    def _tool_setup(self, parser: str) -> None:
        from serving.engine.grammar import ll_tokenizer
        from serving.tool_calls import tool_format

        cfg = json.loads((Path(self.config.model) / "config.json").read_text())
        eos = cfg.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos |= set(self.tokenizer.eos_token_ids)
        specials = self.tokenizer.special_tokens
        self.tool_format = tool_format(parser, cfg.get("model_type"), specials)
        # The engine's own view of the vocabulary: grammars are checked against it here.
        self.lltok = ll_tokenizer(self.tokenizer, cfg.get("vocab_size"), sorted(eos))
        self.hidden_ids = frozenset(specials.values()) | frozenset(eos)

    async def _limits_now(self) -> Limits:
        """Limits with the context length the deployed engines hold for one request (the model's
        limit or the KV pool, whichever is smaller), refreshed every LIMITS_TTL_S."""
        if time.monotonic() - self._limits_at < LIMITS_TTL_S:
            return self.limits
        async with self._limits_lock:
            if time.monotonic() - self._limits_at < LIMITS_TTL_S:
                return self.limits
            handles = [h for h in (self._unified, self._prefill, self._decode) if h is not None]
            checks = await asyncio.gather(*(self._check(h, LIMITS_TIMEOUT_S) for h in handles))
            lens = [c.get("max_model_len") if isinstance(c, dict) else None for c in checks]
            if all(lens):
                self.limits = dataclasses.replace(
                    self.limits, max_model_len=min(self._config_max_len, *lens)
                )
                self._limits_at = time.monotonic()
            else:  # engines still starting, or a role without a replica: the limit known so far
                pairs = zip(checks, lens, strict=True)
                why = [c if isinstance(c, str) else "loading" for c, n in pairs if not n]
                log.warning("engines did not report their context length: %s", why)
                # Ask again soon, not on every request (each would wait for the answer).
                self._limits_at = time.monotonic() - LIMITS_TTL_S + LIMITS_RETRY_S
        return self.limits

    # -- plumbing ------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if not self._keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not any(
            hmac.compare_digest(key.strip().encode(), k) for k in self._keys
        ):
            raise Unauthorized(
                "invalid or missing API key (send 'Authorization: Bearer KEY')",
                code="invalid_api_key",
            )

    async def _body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(
                f"request body is {declared} bytes; the limit is {limit}", code="request_too_large"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"request body exceeds the limit of {limit} bytes", code="request_too_large"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _deltas(self, req: GenerateRequest) -> AsyncIterator[Any]:
        failover = {"failover": FailoverPolicy(), "on_restart": self.recorder.count_failover}
        if self.config.mode == "unified":
            return run_unified(req, self, **failover)
        from serving.engine import TokenDelta

        def first(resp: PrefillResponse) -> TokenDelta:
            return TokenDelta(
                [resp.first_token],
                resp.text,
                resp.finish_reason,
                resp.logprobs,
                resp.prompt_logprobs,
            )

        # KV transfer time and bytes are recorded where they happen, on the decode replica.
        run = run_selective if self.config.routing.max_local_prefill_tokens else run_disaggregated
        return run(
            req,
            self,
            self,
            kv_timeout_s=self.config.kv_transfer.timeout_s,
            make_delta=first,
            **failover,
        )

    async def _handle(self, request: Request, cls: type) -> Response:
        start = time.monotonic()
        self.publisher.start()
        self.drain_state.refuse()
        self._auth(request)
        body = await self._body(request)
        limits = await self._limits_now()
        req = parse(body, cls, limits)
        check_model(req, self.model_name)
        chat = isinstance(req, ChatCompletionRequest)
        # Off the event loop: long prompts take milliseconds to template and tokenize (the Rust
        # tokenizer releases the GIL), and grammars compile here.
        p = await asyncio.to_thread(
            plan, req, self.tokenizer, limits, self.tool_format if chat else None, self.lltok
        )
        from serving.engine import SamplingParams

        try:
            params = [SamplingParams(**c.params) for c in p.choices]
        except ValueError as e:
            raise from_exception(e) from e
        if len(self._live) >= self.config.ingress.max_concurrent_requests:
            raise RateLimited(
                f"more than {self.config.ingress.max_concurrent_requests} requests "
                "in flight on this ingress replica; retry later",
                code="rate_limit_exceeded",
            )
        builder = ResponseBuilder(
            chat, self.model_name, self.tokenizer, self.lltok, self.hidden_ids
        )
        timer = RequestTimer(self.recorder, start)
        if p.no_engine:  # max_tokens 0: nothing to generate
            return self._empty(req, p, builder)
        streams = [
            self.drain_state.wrap(
                self._deltas(GenerateRequest(f"{builder.id}-{c.index}", tuple(c.prompt_ids), sp))
            )
            for c, sp in zip(p.choices, params, strict=True)
        ]
        for s in streams:
            self._live.add(s)
        # Every choice's first delta before the status line: errors keep their HTTP status.
        firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        failed = [f for f in firsts if isinstance(f, BaseException)]
        if failed:
            for s in streams:
                await s.aclose()
            e = failed[0]
            if isinstance(e, StopAsyncIteration):
                raise InternalError("the engine returned no output") from e
            if isinstance(e, Exception):
                raise from_exception(e) from e
            raise e
        merged = merge(list(firsts), streams)
        if p.prompt_only:
            merged = prompt_only(merged)
        fmt = p.tool_format
        if req.stream:
            return StreamingResponse(
                sse_events(
                    merged, builder, p.num_prompt_tokens, req.include_usage, timer, p.choices, fmt
                ),
                media_type="text/event-stream",
            )
        try:
            body = await collect(merged, builder, p.num_prompt_tokens, timer, p.choices, fmt)
            return JSONResponse(body)
        finally:
            await merged.aclose()

    def _empty(self, req, p, builder: ResponseBuilder) -> Response:
        results = [ChoiceResult(c.index, "", "length", echo=c.echo) for c in p.choices]
        usage = Usage.of(p.num_prompt_tokens, 0)
        if not req.stream:
            return JSONResponse(builder.full(results, usage))

        async def events():
            for r in results:
                yield sse(builder.chunk(r.index, "", "length", echo=r.echo))
            if req.include_usage:
                yield sse(builder.usage_chunk(usage))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- routes --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, CompletionRequest)

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        await self._limits_now()
        card = ModelCard(
            id=self.model_name, root=self.config.model, max_model_len=self.limits.max_model_len
        )
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request) -> dict[str, Any]:
        self._auth(request)
        if model != self.model_name:
            raise NotFound(
                f"The model `{model}` does not exist", param="model", code="model_not_found"
            )
        await self._limits_now()
        return ModelCard(
            id=self.model_name, root=self.config.model, max_model_len=self.limits.max_model_len
        ).model_dump()

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        """200 when every engine role has a replica that answers, else 503 naming the roles
        that cannot serve; always within about HEALTH_TIMEOUT_S."""
        self.drain_state.refuse()
        roles = {"unified": self._unified, "prefill": self._prefill, "decode": self._decode}
        roles = {r: h for r, h in roles.items() if h is not None}
        results = await asyncio.gather(*(self._check(h) for h in roles.values()))
        missing = {r: res for r, res in zip(roles, results, strict=True) if isinstance(res, str)}
        if missing:
            why = "; ".join(f"{r}: {res}" for r, res in missing.items())
            raise Unavailable(
                f"no {' and no '.join(missing)} engine can serve ({why})", code="unhealthy"
            )
        return {
            "status": "ok",
            "model": self.model_name,
            "mode": self.config.mode,
            "engines": results,
        }

    @staticmethod
    async def _check(handle, timeout_s: float = HEALTH_TIMEOUT_S) -> dict[str, Any] | str:
        """One replica's check() of a role, or why none answered."""
        resp = handle.check.remote()
        try:
            async with asyncio.timeout(timeout_s):
                return await resp
        except TimeoutError:
            resp.cancel()  # else it waits in Serve's queue for a replica to come up
            return f"no replica answered within {timeout_s:.1f}s"
        except Exception as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    # -- graceful shutdown (called on every replica by `indexcache serve`, serving/drain.py) ----
    async def drain(self, timeout_s: float) -> int:
        """Start draining; returns the requests in flight on this replica."""
        self.drain_state.start(timeout_s)
        return len(self._live)

    async def in_flight(self) -> int:
        return len(self._live)

    @app.get("/metrics")
    async def metrics_text(self) -> Response:
        self.publisher.start()
        try:
            async with asyncio.timeout(5):
                others = await self.publisher.others()
        except Exception:  # engine metrics missing beats no metrics (the publisher logs it)
            others = []
        return Response(
            metrics.render([*others, metrics.snapshot()]), media_type=CONTENT_TYPE_LATEST
        )
