"""SSE events and JSON bodies from engine deltas, without Ray: framing, usage, mid-stream errors,
and the metrics each request records."""

from __future__ import annotations

import asyncio
import json

from serving.engine import TokenDelta
from serving.errors import KVTransferError
from serving.metrics import REGISTRY, Recorder
from serving.openai_adapter import Choice
from serving.openai_response import ResponseBuilder
from serving.streaming import RequestTimer, collect, merge, sse_events

ONE = [Choice(0, [], {})]


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


async def stream(items):
    for it in items:
        await asyncio.sleep(0)
        if isinstance(it, Exception):
            raise it
        yield it


def events(lines: list[str]) -> list:
    assert all(ln.startswith("data: ") and ln.endswith("\n\n") for ln in lines)
    return [ln[6:-2] if ln[6:-2] == "[DONE]" else json.loads(ln[6:-2]) for ln in lines]


def run_sse(first, rest, chat=True, usage=True, replica="s1"):
    timer = RequestTimer(Recorder("stream-test", "ingress", replica), 0.0)
    builder = ResponseBuilder(chat, "stream-test", Tok())

    async def go():
        merged = merge([first], [stream(rest)])
        return [e async for e in sse_events(merged, builder, 5, usage, timer, ONE)]

    return events(asyncio.run(go()))


def count(name: str, replica: str) -> float:
    return (
        REGISTRY.get_sample_value(
            name, {"model": "stream-test", "role": "ingress", "replica": replica}
        )
        or 0.0
    )


def test_chat_stream_framing_and_usage():
    out = run_sse(TokenDelta([1], "a"), [TokenDelta([2, 3], "bc"), TokenDelta([4], "d", "stop")])
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"].get("content") for e in out[1:4]] == ["a", "bc", "d"]
    assert out[4]["choices"][0]["finish_reason"] == "stop" and out[4]["choices"][0]["delta"] == {}
    assert out[5]["choices"] == [] and out[5]["usage"]["completion_tokens"] == 4
    assert out[6] == "[DONE]"
    assert count("indexcache_time_to_first_token_seconds_count", "s1") == 1
    assert count("indexcache_inter_token_latency_seconds_count", "s1") == 3
    assert count("indexcache_e2e_request_latency_seconds_count", "s1") == 1


def test_error_mid_stream_is_an_error_event_then_done():
    out = run_sse(
        TokenDelta([1], "a"),
        [KVTransferError("no decode replica took it")],
        chat=False,
        usage=True,
        replica="s2",
    )
    assert out[0]["choices"][0]["text"] == "a"
    assert out[1]["error"]["message"] == "no decode replica took it"
    assert out[1]["error"]["type"] == "service_unavailable_error"
    assert out[2] == "[DONE]" and len(out) == 3  # no usage chunk for a failed request
    assert count("indexcache_e2e_request_latency_seconds_count", "s2") == 0


def test_engine_abort_is_reported_not_passed_off_as_a_finish():
    out = run_sse(TokenDelta([1], "a"), [TokenDelta([], "", "abort")], chat=False, replica="s3")
    assert out[1]["error"]["code"] == "aborted" and out[-1] == "[DONE]"


def test_collect_joins_text_and_counts_tokens():
    timer = RequestTimer(Recorder("stream-test", "ingress", "s4"), 0.0)
    builder = ResponseBuilder(False, "stream-test", Tok())
    merged = merge([TokenDelta([1], "a")], [stream([TokenDelta([2], "b", "length")])])
    body = asyncio.run(collect(merged, builder, 3, timer, ONE))
    assert body["choices"][0]["text"] == "ab" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_choices_interleave_and_each_finishes():
    timer = RequestTimer(Recorder("stream-test", "ingress", "s5"), 0.0)
    builder = ResponseBuilder(True, "stream-test", Tok())
    firsts = [TokenDelta([1], "a"), TokenDelta([2], "b", "stop")]
    rests = [stream([TokenDelta([3], "c", "length")]), stream([])]
    choices = [Choice(0, [], {}), Choice(1, [], {})]
    body = asyncio.run(collect(merge(firsts, rests), builder, 3, timer, choices))
    got = {c["index"]: (c["message"]["content"], c["finish_reason"]) for c in body["choices"]}
    assert got == {0: ("ac", "length"), 1: ("b", "stop")}
    assert body["usage"]["completion_tokens"] == 3  # summed over choices, prompt counted once
    assert all(c["message"]["refusal"] is None for c in body["choices"])


def test_closing_the_merge_closes_every_stream_without_error():
    """A client that goes away mid-stream: closing the merge while its pumps wait inside their
    streams ends every stream (its cleanup runs: the engine call is cancelled) and raises
    nothing (a stream is never closed from outside while its pump runs it)."""
    closed = []

    async def slow(i):
        try:
            yield TokenDelta([i], "x", "stop" if i == 2 else None)  # choice 2 ends at once
            while True:
                await asyncio.sleep(0.01)
                yield TokenDelta([i], "x")
        finally:
            closed.append(i)

    async def go():
        streams = [slow(i) for i in range(3)]
        firsts = [await anext(s) for s in streams]
        merged = merge(firsts, streams)
        seen = [await anext(merged) for _ in range(5)]
        await merged.aclose()
        return seen

    assert len(asyncio.run(go())) == 5
    assert sorted(closed) == [0, 1, 2]


def test_prompt_only_streams_the_echo_and_prompt_logprobs_alone():
    """max_tokens 0 with echo + logprobs: the engines' one token is dropped; the stream is the
    echoed prompt with its logprobs, then finish_reason length, and no completion tokens."""
    from serving.engine import Logprob
    from serving.streaming import prompt_only

    timer = RequestTimer(Recorder("stream-test", "ingress", "s6"), 0.0)
    builder = ResponseBuilder(False, "stream-test", Tok())
    choices = [Choice(0, [0, 1], {}, echo="ab")]
    plp = [None, Logprob(1, -0.25)]
    first = TokenDelta([7], "h", "length", [Logprob(7, -1.0)], plp)

    async def go():
        merged = prompt_only(merge([first], [stream([])]))
        return [e async for e in sse_events(merged, builder, 2, True, timer, choices)]

    out = events(asyncio.run(go()))
    ch = out[0]["choices"][0]
    assert ch["text"] == "ab" and ch["finish_reason"] is None
    assert ch["logprobs"]["tokens"] == ["a", "b"]
    assert ch["logprobs"]["token_logprobs"] == [None, -0.25]
    assert out[1]["choices"][0]["finish_reason"] == "length"
    assert out[2]["usage"]["completion_tokens"] == 0 and out[3] == "[DONE]"
