"""The OpenAI-compatible HTTP front: a FastAPI app served by a Ray Serve ingress deployment.

Routes: POST /v1/chat/completions, POST /v1/completions (streaming or not), GET /v1/models,
GET /health, GET /metrics (Prometheus text: this replica's request metrics plus every engine
replica's, as vLLM serves them). Errors are OpenAI error JSON with a fitting 4xx/5xx status.

Per request: auth -> body limit -> parse and validate -> model -> tokenize once -> limits ->
orchestrator (unified or disaggregated) -> JSON or SSE. A client that disconnects cancels the
handler task; closing the orchestrator stream cancels the engine calls, which abort the request
and free its KV pages.
"""

# No `from __future__ import annotations` here: FastAPI reads route parameter types at runtime,
# and string annotations on Serve-wrapped methods do not resolve (every route then answers 422).
import asyncio
import hmac
import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import metrics
from serving.config import ServingConfig
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
from serving.metrics_hub import MetricsPublisher
from serving.openai_adapter import (
    Limits,
    ResponseBuilder,
    check_model,
    parse,
    sampling_kwargs,
    tokenize,
)
from serving.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from serving.orchestrator import run_disaggregated, run_selective, run_unified
from serving.protocol import GenerateRequest, PrefillResponse
from serving.streaming import RequestTimer, collect, sse_events

log = logging.getLogger(__name__)

app = FastAPI(title="IndexCache Serve", docs_url=None, redoc_url=None, openapi_url=None)


def _error(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@app.exception_handler(OpenAIError)
async def _openai_error(_request: Request, e: OpenAIError) -> JSONResponse:
    return _error(e)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
    cls = NotFound if e.status_code == 404 else OpenAIError
    err = cls(str(e.detail))
    err.status = e.status_code
    return _error(err)


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
        self._keys = tuple(k.encode() for k in ic.api_keys)
        self._unified, self._prefill, self._decode = unified, prefill, decode
        # Requests in flight = live orchestrator streams. A weak set, not a counter: a stream
        # whose response is cancelled before its body starts is never iterated (no `finally`
        # runs), but it is dropped, and so leaves the set.
        self._live: weakref.WeakSet = weakref.WeakSet()
        replica = serve.get_replica_context().replica_id.unique_id
        self.recorder = metrics.Recorder(self.model_name, "ingress", replica)
        self.publisher = MetricsPublisher(
            self.config.app_name, f"ingress:{replica}", self.config.metrics_interval_s
        )

    # -- clients of the engine deployments (orchestrator protocols) ------------------------------
    def generate(self, req: GenerateRequest):
        return _cancel_on_exit(self._unified.options(stream=True).generate.remote(req))

    async def prefill(self, req: GenerateRequest) -> PrefillResponse:
        resp = self._prefill.prefill.remote(req)
        try:
            return await resp
        except asyncio.CancelledError:
            resp.cancel()
            raise

    def decode(self, req):
        return _cancel_on_exit(self._decode.options(stream=True).decode.remote(req))

    def generate_or_defer(self, req: GenerateRequest):
        return _cancel_on_exit(self._decode.options(stream=True).generate_or_defer.remote(req))

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
        if self.config.mode == "unified":
            return run_unified(req, self)
        from serving.engine import TokenDelta

        def first(resp: PrefillResponse) -> TokenDelta:
            return TokenDelta([resp.first_token], resp.text, resp.finish_reason, resp.logprobs)

        # KV transfer time and bytes are recorded where they happen, on the decode replica.
        run = run_selective if self.config.routing.max_local_prefill_tokens else run_disaggregated
        return run(
            req, self, self, kv_timeout_s=self.config.kv_transfer.timeout_s, make_delta=first
        )

    async def _handle(self, request: Request, cls: type) -> Response:
        start = time.monotonic()
        self.publisher.start()
        self._auth(request)
        body = await self._body(request)
        req = parse(body, cls, self.limits)
        check_model(req, self.model_name)
        # Off the event loop: long prompts take milliseconds to template and tokenize, and the
        # Rust tokenizer releases the GIL.
        ids = await asyncio.to_thread(tokenize, req, self.tokenizer)
        from serving.engine import SamplingParams

        try:
            params = SamplingParams(**sampling_kwargs(req, len(ids), self.limits))
        except ValueError as e:
            raise from_exception(e) from e
        if len(self._live) >= self.config.ingress.max_concurrent_requests:
            raise RateLimited(
                f"more than {self.config.ingress.max_concurrent_requests} requests "
                "in flight on this ingress replica; retry later",
                code="rate_limit_exceeded",
            )
        echo = ""
        if isinstance(req, CompletionRequest) and req.echo:
            p = req.single_prompt()
            echo = p if isinstance(p, str) else self.tokenizer.decode(p)
        builder = ResponseBuilder(
            isinstance(req, ChatCompletionRequest), self.model_name, self.tokenizer, echo
        )
        greq = GenerateRequest(builder.id, tuple(ids), params)
        timer = RequestTimer(self.recorder, start)
        deltas = self._deltas(greq)
        self._live.add(deltas)
        try:
            first = await anext(deltas)  # errors before the first token keep their HTTP status
        except BaseException as e:
            await deltas.aclose()
            if isinstance(e, StopAsyncIteration):
                raise InternalError("the engine returned no output") from e
            if isinstance(e, Exception):
                raise from_exception(e) from e
            raise
        if req.stream:
            return StreamingResponse(
                sse_events(first, deltas, builder, len(ids), req.include_usage, timer),
                media_type="text/event-stream",
            )
        try:
            return JSONResponse(await collect(first, deltas, builder, len(ids), timer))
        finally:
            await deltas.aclose()

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
        return ModelCard(
            id=self.model_name, root=self.config.model, max_model_len=self.limits.max_model_len
        ).model_dump()

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        handles = [h for h in (self._unified, self._prefill, self._decode) if h is not None]
        try:
            checks = await asyncio.wait_for(
                asyncio.gather(*(h.check.remote() for h in handles)), timeout=10
            )
        except Exception as e:
            raise Unavailable(
                f"engine deployments are not healthy: {type(e).__name__}: {e}", code="unhealthy"
            ) from e
        return {
            "status": "ok",
            "model": self.model_name,
            "mode": self.config.mode,
            "engines": checks,
        }

    @app.get("/metrics")
    async def metrics_text(self) -> Response:
        self.publisher.start()
        try:
            others = await asyncio.wait_for(self.publisher.others(), timeout=5)
        except Exception:  # engine metrics missing beats no metrics at all
            log.exception("metrics hub unavailable")
            others = []
        return Response(
            metrics.render([*others, metrics.snapshot()]), media_type=CONTENT_TYPE_LATEST
        )
