"""Failover with scripted fake replicas: a replica lost before the first token is a retry, one
lost mid-stream a migration that resumes after what the client has; other errors, exhausted
attempts and a loss after the last token are not retried."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, OwnerDiedError, RayTaskError

from serving.engine import SamplingParams, TokenDelta
from serving.errors import BadRequest, KVTransferError, Unavailable
from serving.failover import FailoverPolicy, replica_lost
from serving.orchestrator import run_disaggregated, run_selective, run_unified
from serving.protocol import GenerateRequest, KVReceived, PrefillResponse, PrefillRoute

REQ = GenerateRequest("r1", (1, 2, 3), SamplingParams(max_tokens=6, temperature=0))
FAST = FailoverPolicy(max_restarts=2, backoff_s=0.0)
TOKENS = [(10, "a"), (11, ""), (12, "bc"), (13, "d"), (14, "e"), (15, "f")]  # 11's text held


def deltas(start: int, stop: int) -> list[TokenDelta]:
    out = []
    for i in range(start, stop):
        tok, text = TOKENS[i]
        finish = "length" if i == len(TOKENS) - 1 else None
        if i == 2:  # the held-back text of token 11 comes out with token 12
            text = "?" + text
        out.append(TokenDelta([tok], text, finish))
    return out


class FakeKV:
    released = False

    def release(self):
        self.released = True


class Replicas:
    """Prefill and decode pools whose n-th call follows `script[n]` (a failure, or None)."""

    def __init__(self, prefill_script=(), decode_script=()):
        self.prefill_script, self.decode_script = list(prefill_script), list(decode_script)
        self.prefills: list[GenerateRequest] = []
        self.decodes = []
        self.closed = 0

    def _seen(self, req) -> int:  # tokens the client already has
        return len(req.resume.token_ids) if req.resume else 0

    async def prefill(self, req):  # a stream: the response, then held until closed
        self.prefills.append(req)
        fail = self.prefill_script.pop(0) if self.prefill_script else None
        if fail is not None:
            raise fail
        d = deltas(self._seen(req), self._seen(req) + 1)[0]
        yield PrefillResponse(req.request_id, d.token_ids[0], d.text, None, 3, FakeKV(), "p")
        await asyncio.sleep(3600)

    def decode(self, req):
        self.decodes.append(req)
        fail = self.decode_script.pop(0) if self.decode_script else None
        return self._stream(self._seen(req) + 1, fail)

    async def _stream(self, start, fail):
        try:
            yield KVReceived(1, 0.0, "p")
            ds = deltas(start, len(TOKENS))
            for i, d in enumerate(ds):
                if fail is not None and i == fail[0]:
                    raise fail[1]
                yield d
            if fail is not None and fail[0] == len(ds):  # lost after the last token
                raise fail[1]
        finally:
            self.closed += 1

    def generate(self, req):  # unified: the first token comes from the same stream
        self.prefills.append(req)
        fail = self.decode_script.pop(0) if self.decode_script else None
        return self._unified(self._seen(req), fail)

    async def _unified(self, start, fail):
        for i, d in enumerate(deltas(start, len(TOKENS))):
            if fail is not None and i == fail[0]:
                raise fail[1]
            yield d


class LocalReplicas(Replicas):
    """Decode replicas that prefill locally while `local` says so (selective disaggregation)."""

    def __init__(self, local: list[bool], **script):
        super().__init__(**script)
        self.local, self.routed = list(local), []

    def generate_or_defer(self, req):
        self.routed.append(req)
        return self._route(req, self.local.pop(0))

    async def _route(self, req, local):
        yield PrefillRoute(local, 0, len(req.prompt_token_ids))
        if local:
            async for d in self.generate(req):
                yield d


def first(resp):
    return TokenDelta([resp.first_token], resp.text, resp.finish_reason)


def disagg(reps: Replicas, policy=FAST, restarts=None):
    return run_disaggregated(
        REQ,
        reps,
        reps,
        kv_timeout_s=1.0,
        make_delta=first,
        failover=policy,
        on_restart=(restarts.append if restarts is not None else None),
    )


async def drain(stream) -> list[TokenDelta]:
    return [d async for d in stream]


def text(ds) -> str:
    return "".join(d.text for d in ds)


FULL = asyncio.run(drain(disagg(Replicas())))


def test_no_fault_streams_everything():
    assert [d.token_ids[0] for d in FULL] == [t for t, _ in TOKENS]
    assert FULL[-1].finish_reason == "length"


@pytest.mark.parametrize(
    "error",
    [
        ActorDiedError(),
        ActorUnavailableError("gone", None),
        RayTaskError("f", "tb", ActorDiedError()),
    ],
)
def test_prefill_replica_lost_is_retried(error):
    reps, restarts = Replicas(prefill_script=[error]), []
    out = asyncio.run(drain(disagg(reps, restarts=restarts)))
    assert out == FULL and restarts == [False]
    assert [r.resume for r in reps.prefills] == [None, None]  # a plain retry
    assert reps.prefills[1].request_id == "r1~1"


def test_payload_owner_lost_before_decode_is_retried():
    lost = KVTransferError("owner died", code="kv_transfer_failed")
    reps = Replicas(decode_script=[(0, lost)])
    assert asyncio.run(drain(disagg(reps))) == FULL


@pytest.mark.parametrize("after", [0, 1, 3])
def test_decode_replica_lost_mid_stream_migrates(after):
    """The client saw the first token and `after` decode tokens; the new attempt re-prefills
    prompt + those tokens and its stream continues the text without a repeat or a gap."""
    reps, restarts = Replicas(decode_script=[(after, ActorDiedError())]), []
    out = asyncio.run(drain(disagg(reps, restarts=restarts)))
    assert [d.token_ids for d in out] == [d.token_ids for d in FULL]
    assert text(out) == text(FULL) and restarts == [True]
    resume = reps.prefills[1].resume
    assert list(resume.token_ids) == [t for t, _ in TOKENS[: 1 + after]]
    assert resume.text_chars == len(text(FULL[: 1 + after]))
    assert reps.decodes[1].resume == resume  # the decode side rebuilds the same state
    assert reps.closed == 2  # the dead stream was closed too


def test_abort_by_a_stopping_engine_migrates():
    reps = Replicas(decode_script=[(2, Unavailable("stopping", code="aborted"))])
    assert asyncio.run(drain(disagg(reps))) == FULL


def test_unified_replica_lost_mid_stream_migrates():
    reps, restarts = Replicas(decode_script=[(2, ActorDiedError())]), []
    out = asyncio.run(drain(run_unified(REQ, reps, failover=FAST, on_restart=restarts.append)))
    assert out == FULL and restarts == [True]
    assert list(reps.prefills[1].resume.token_ids) == [10, 11]


@pytest.mark.parametrize("local", [[True, True], [True, False], [False, True]])
def test_selective_flow_migrates_through_the_route_again(local):
    """Selective disaggregation under failover: whichever path each attempt takes (local
    prefill on the decode replica, or prefill -> decode), the new attempt asks a decode replica
    again with the resumed tokens and the stream continues exactly."""
    lost = (2, ActorDiedError())
    reps = LocalReplicas(local, decode_script=[lost])
    out = asyncio.run(
        drain(run_selective(REQ, reps, reps, kv_timeout_s=1.0, make_delta=first, failover=FAST))
    )
    assert [d.token_ids for d in out] == [d.token_ids for d in FULL] and text(out) == text(FULL)
    assert [r.resume for r in reps.routed][0] is None
    seen = 2 if local[0] else 3  # the lost decode stream had already sent the first token
    assert list(reps.routed[1].resume.token_ids) == [t for t, _ in TOKENS[:seen]]


def test_attempts_are_bounded():
    reps = Replicas(prefill_script=[ActorDiedError()] * 3)
    with pytest.raises(ActorDiedError):
        asyncio.run(drain(disagg(reps)))
    assert len(reps.prefills) == 3  # the first attempt + max_restarts


@pytest.mark.parametrize(
    "error",
    [
        BadRequest("bad"),
        KVTransferError("nobody took it", code="kv_transfer_timeout"),
        RuntimeError("bug"),
    ],
)
def test_other_errors_are_not_retried(error):
    reps = Replicas(decode_script=[(1, error)])
    with pytest.raises(type(error)):
        asyncio.run(drain(disagg(reps)))
    assert len(reps.prefills) == 1


def test_a_loss_after_the_last_token_ends_the_stream_cleanly():
    reps = Replicas(decode_script=[(len(TOKENS) - 1, ActorDiedError())])
    out = asyncio.run(drain(disagg(reps)))
    assert out == FULL and len(reps.prefills) == 1


def test_replica_lost_classification():
    assert replica_lost(ActorDiedError()) and replica_lost(OwnerDiedError.__new__(OwnerDiedError))
    assert replica_lost(Unavailable("x", code="aborted"))
    assert not replica_lost(Unavailable("x", code="shutting_down"))
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = ActorDiedError()
    assert replica_lost(wrapped) and not replica_lost(ValueError("x"))
