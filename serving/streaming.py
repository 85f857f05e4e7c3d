"""Engine deltas -> an OpenAI JSON body or SSE events, with the request's latency metrics.

No Ray, no FastAPI. A request runs one engine stream per choice (n per prompt); the ingress awaits
every stream's first delta (so errors before the first token keep their HTTP status) and hands
them in with the streams; `merge` interleaves the choices as their deltas arrive. Tool calls are
parsed out of each choice's text (whole, or as each call completes when streaming).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from serving.errors import Unavailable, from_exception
from serving.metrics import Recorder
from serving.openai_response import ChoiceResult, ResponseBuilder
from serving.openai_schema import Usage
from serving.tool_calls import ToolFormat, ToolStreamParser

log = logging.getLogger(__name__)
_END = object()


def sse(data: dict[str, Any] | str) -> str:
    import json

    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


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


async def _aclose(stream) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def merge(firsts: list, streams: list) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, delta) from every stream as they arrive, each stream's first delta first.
    Closing it closes every stream (which aborts their engine requests)."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, d in enumerate(firsts):
        queue.put_nowait((i, d))
    live = [i for i, d in enumerate(firsts) if d.finish_reason is None]

    async def pump(i: int) -> None:
        try:
            async for d in streams[i]:
                await queue.put((i, d))
                if d.finish_reason is not None:
                    break
        except Exception as e:
            await queue.put((i, e))
        finally:
            # The pump closes its own stream: closing it from outside while the pump still
            # runs it would raise ("asynchronous generator is already running").
            await _aclose(streams[i])
            await queue.put((i, _END))

    tasks = [asyncio.get_running_loop().create_task(pump(i)) for i in live]
    done: set[int] = set()
    try:
        while len(done) < len(firsts):
            i, item = await queue.get()
            if item is _END:  # ended without a finish reason: nothing more will come
                done.add(i)
                continue
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                done.add(i)
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for i, s in enumerate(streams):
            if i not in live:  # no pump runs it
                await _aclose(s)
        if tasks:  # each cancelled pump closes its stream as it unwinds
            await asyncio.wait(tasks)


async def prompt_only(merged: AsyncIterator) -> AsyncIterator[tuple[int, Any]]:
    """max_tokens 0 with echo and logprobs: the engines ran one token to score the prompt; the
    answer is the prompt alone, so generated tokens, text and logprobs are dropped."""
    try:
        async for i, d in merged:
            reason = None if d.finish_reason is None else "length"
            yield (
                i,
                dataclasses.replace(d, token_ids=[], text="", logprobs=None, finish_reason=reason),
            )
    finally:
        await _aclose(merged)


async def collect(
    merged: AsyncIterator,
    builder: ResponseBuilder,
    n_prompt: int,
    timer: RequestTimer,
    choices: list,
    tool_format: ToolFormat | None = None,
) -> dict[str, Any]:
    """The whole response as one JSON body."""
    res = {c.index: ChoiceResult(c.index, echo=c.echo) for c in choices}
    texts: dict[int, list[str]] = {i: [] for i in res}
    n_gen = 0
    async for i, delta in merged:
        check_delta(delta)
        timer.tokens(len(delta.token_ids))
        r = res[choices[i].index]
        texts[r.index].append(delta.text)
        n_gen += len(delta.token_ids)
        if delta.logprobs is not None:
            r.logprobs = (r.logprobs or []) + list(delta.logprobs)
        if delta.prompt_logprobs is not None:
            r.prompt_logprobs = list(zip(choices[i].prompt_ids, delta.prompt_logprobs, strict=True))
        if delta.finish_reason is not None:
            r.finish_reason = delta.finish_reason
    timer.finished()
    for r in res.values():
        r.text = "".join(texts[r.index])
        if tool_format is not None:
            r.text, r.tool_calls = tool_format.parse(r.text)
    return builder.full(list(res.values()), Usage.of(n_prompt, n_gen))


async def sse_events(
    merged: AsyncIterator,
    builder: ResponseBuilder,
    n_prompt: int,
    include_usage: bool,
    timer: RequestTimer,
    choices: list,
    tool_format: ToolFormat | None = None,
) -> AsyncIterator[str]:
    """SSE events: each chat choice opens with the role; one event per delta with text; tool
    calls as each completes; the usage chunk when asked; an error after the status line went
    out becomes a `data: {"error": ...}` event (as vLLM does); always `data: [DONE]` last."""
    n_gen = 0
    parsers = {c.index: ToolStreamParser(tool_format) for c in choices} if tool_format else {}
    opened: set[int] = set()
    try:
        if builder.chat:
            for c in choices:
                yield sse(builder.chunk(c.index, "", role=True))
                opened.add(c.index)
        async for i, delta in merged:
            check_delta(delta)
            c = choices[i]
            timer.tokens(len(delta.token_ids))
            n_gen += len(delta.token_ids)
            final = delta.finish_reason is not None
            text, calls = delta.text, []
            p = parsers.get(c.index)
            if p is not None:
                text, calls = p.feed(delta.text, final)
            echo = c.echo if c.index not in opened else ""
            opened.add(c.index)
            plp = delta.prompt_logprobs
            if plp is not None:
                plp = list(zip(c.prompt_ids, plp, strict=True))
            if text or delta.logprobs or echo or plp:
                yield sse(
                    builder.chunk(
                        c.index, text, None, delta.logprobs, echo=echo, prompt_logprobs=plp
                    )
                )
            if calls:
                base = p.emitted - len(calls)
                payload = [t.openai(base + k) for k, t in enumerate(calls)]
                yield sse(builder.chunk(c.index, None, tool_calls=payload))
            if final:
                reason = "tool_calls" if p is not None and p.calls else delta.finish_reason
                yield sse(builder.chunk(c.index, None, reason))
        timer.finished()
        if include_usage:
            yield sse(builder.usage_chunk(Usage.of(n_prompt, n_gen)))
    except Exception as e:
        err = from_exception(e)
        log.warning("stream %s failed: %s", builder.id, err.message)
        yield sse(err.body())
    finally:
        await _aclose(merged)
    yield sse("[DONE]")
