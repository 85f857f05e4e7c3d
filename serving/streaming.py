"""Engine deltas -> an OpenAI JSON body or SSE events, with the request's latency metrics.

No Ray, no FastAPI: the ingress hands in the first delta (already awaited, so errors before the
first token keep their HTTP status) and the rest of the orchestrator stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from serving.errors import Unavailable, from_exception
from serving.metrics import Recorder
from serving.openai_adapter import ResponseBuilder, sse
from serving.openai_schema import Usage

log = logging.getLogger(__name__)


class RequestTimer:
    """TTFT, inter-token latency and end-to-end latency of one request, seen from the ingress."""

    def __init__(self, recorder: Recorder, start: float):
        self.recorder, self.start, self.last = recorder, start, None

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.monotonic()
        if self.last is None:
            self.recorder.observe_ttft(now - self.start)
            n -= 1
        for _ in range(n):  # tokens that arrived together share the gap
            self.recorder.observe_itl((now - (self.last or now)) / max(n, 1))
        self.last = now

    def finished(self) -> None:
        self.recorder.observe_e2e(time.monotonic() - self.start)


def check_delta(delta) -> None:
    if delta.finish_reason == "abort":
        raise Unavailable(
            "the request was aborted by the engine (shutdown or plan swap); retry", code="aborted"
        )


async def collect(
    first, deltas: AsyncIterator[Any], builder: ResponseBuilder, n_prompt: int, timer: RequestTimer
) -> dict[str, Any]:
    """The whole response as one JSON body."""
    text, n_gen, finish, logprobs = [], 0, None, None
    delta = first
    while True:
        check_delta(delta)
        timer.tokens(len(delta.token_ids))
        text.append(delta.text)
        n_gen += len(delta.token_ids)
        if delta.logprobs:
            logprobs = (logprobs or []) + list(delta.logprobs)
        if delta.finish_reason is not None:
            finish = delta.finish_reason
            break
        try:
            delta = await anext(deltas)
        except StopAsyncIteration:
            break
    timer.finished()
    return builder.full("".join(text), finish, Usage.of(n_prompt, n_gen), logprobs)


async def sse_events(
    first,
    deltas: AsyncIterator[Any],
    builder: ResponseBuilder,
    n_prompt: int,
    include_usage: bool,
    timer: RequestTimer,
) -> AsyncIterator[str]:
    """SSE events: chat opens with the role; one event per delta with text; the usage chunk when
    asked; an error after the status line went out becomes a `data: {"error": ...}` event (as
    vLLM does); always `data: [DONE]` last. Closing this generator closes `deltas`."""
    n_gen, delta, is_first = 0, first, True
    try:
        if builder.chat:
            yield sse(builder.chunk("", first=True))
            is_first = False
        while True:
            check_delta(delta)
            timer.tokens(len(delta.token_ids))
            n_gen += len(delta.token_ids)
            if delta.text or delta.finish_reason is not None or delta.logprobs:
                yield sse(
                    builder.chunk(delta.text, delta.finish_reason, delta.logprobs, first=is_first)
                )
                is_first = False
            if delta.finish_reason is not None:
                break
            try:
                delta = await anext(deltas)
            except StopAsyncIteration:
                break
        timer.finished()
        if include_usage:
            yield sse(builder.usage_chunk(Usage.of(n_prompt, n_gen)))
    except Exception as e:
        err = from_exception(e)
        log.warning("stream %s failed: %s", builder.id, err.message)
        yield sse(err.body())
    finally:
        await deltas.aclose()
    yield sse("[DONE]")
