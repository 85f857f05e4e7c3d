"""Failover: a request whose engine replica dies goes on on another replica.

`with_failover(req, attempt)` runs one attempt of the request flow (unified, or prefill ->
decode) and passes its deltas through, counting what the client has received. When the replica
behind the attempt is lost, it starts a new attempt for what is left:

- nothing streamed yet (a prefill replica died, or the KV payload's owner died before decode
  took it): the same request again, a plain retry;
- some tokens streamed (a decode or unified replica died mid-stream): the prompt plus the tokens
  generated so far are re-prefilled on another replica (`Resume`, serving/engine/resume.py) and
  the stream goes on where it broke. Greedy output equals a run without the fault.

"Lost" means Ray reports the replica's actor dead or unreachable, or the engine aborted the
request while shutting down (a replica being stopped). Anything else (bad input, a KV transfer
timeout that already waited its 30 s, the client going away) is not retried. Attempts are bounded
(`FailoverPolicy.max_restarts`) and spaced out, so a request never loops.

This module is pure async code: it knows Ray's errors by name only, as serving/errors.py does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from serving.errors import OpenAIError, Unavailable

log = logging.getLogger(__name__)

# Ray's errors for "the actor serving this call is gone" (ray.exceptions; RayActorError is the
# base of ActorDiedError and ActorUnavailableError; OwnerDiedError: the object's owner, here the
# prefill replica that put the KV payload, died before it was fetched).
_LOST = {"RayActorError", "ActorDiedError", "ActorUnavailableError", "OwnerDiedError"}
# Our own errors that mean the same: the engine aborted the request while shutting down, or the
# payload could not be fetched (its owner died).
_LOST_CODES = {"aborted", "kv_transfer_failed"}


@dataclass(frozen=True)
class FailoverPolicy:
    max_restarts: int = 3  # new attempts per request
    backoff_s: float = 0.2  # before attempt n: n * backoff_s (Serve drops a dead replica meanwhile)


def replica_lost(e: BaseException) -> bool:
    """Whether `e` says the replica behind a call died (possibly wrapped by Ray or by us)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OpenAIError):
            return e.code in _LOST_CODES
        if any(c.__name__ in _LOST for c in type(e).__mro__):
            return True
        e = getattr(e, "cause", None) or e.__cause__
    return False


def _resumed(req, tokens: list[int], chars: int, n: int):
    from serving.engine import Resume

    resume = Resume(tuple(tokens), chars) if tokens else None
    return dataclasses.replace(req, request_id=f"{req.request_id}~{n}", resume=resume)


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def with_failover(
    req,
    attempt: Callable[[Any], AsyncIterator[Any]],
    policy: FailoverPolicy,
    on_restart: Callable[[bool], None] | None = None,
) -> AsyncIterator[Any]:
    """`attempt(req)` -> TokenDeltas; yields them, restarting elsewhere when a replica is lost.
    `on_restart(migrated)` is told of every new attempt (migrated: tokens had been streamed)."""
    tokens: list[int] = []
    chars, restarts, finished = 0, 0, False
    while True:
        current = req if restarts == 0 else _resumed(req, tokens, chars, restarts)
        stream = attempt(current)
        try:
            async for delta in stream:
                if delta.finish_reason == "abort":  # the engine shut down under the request
                    raise Unavailable("the engine aborted the request", code="aborted")
                tokens.extend(delta.token_ids)
                chars += len(delta.text)
                finished = delta.finish_reason is not None
                yield delta
            return
        except Exception as e:
            if finished:  # the last token is out: the end of the stream is all that was lost
                return
            if not replica_lost(e) or restarts >= policy.max_restarts:
                raise
            restarts += 1
            migrated = bool(tokens)
            log.warning(
                "request %s: replica lost %s (%s); %s on another replica (attempt %d of %d)",
                req.request_id,
                f"after {len(tokens)} tokens" if migrated else "before its first token",
                type(e).__name__,
                "continuing" if migrated else "retrying",
                restarts + 1,
                policy.max_restarts + 1,
            )
            if on_restart is not None:
                on_restart(migrated)
        finally:
            await _aclose(stream)
        await asyncio.sleep(policy.backoff_s * restarts)
