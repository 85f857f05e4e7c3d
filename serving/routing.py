"""Prefix-affinity routing of engine calls: Ray Serve's own PrefixCacheAffinityRouter, fed with
token ids.

Serve's router keeps a prefix tree of the prompts each replica was sent (a detached actor per
deployment) and sends a request to the replica whose prompts share the longest prefix with it,
falling back to the least loaded replicas when the match is short or the load is imbalanced.
It reads the prompt from a `prompt` or `messages` attribute of the call's argument and matches
characters. Our calls carry token ids (`GenerateRequest`, `DecodeRequest`: the ingress tokenizes
once), so this subclass only changes how the prompt is read: one character per token, so the
tree matches token prefixes, the same prefixes the engines' prefix caches reuse.

It is configured per engine deployment as Serve intends, through `request_router_config`
(serving/app.py), so every handle calling that deployment routes this way.

The class is imported from its defining module: `ray.serve.llm.request_router` re-exports it
unchanged, but importing that package pulls in Ray LLM's engine dependencies (pyarrow, vLLM's
configs), which this project does not install. Ray is pinned to an exact version.

Ray 2.60's router talks to its prefix-tree actor with blocking `ray.get` calls on the handle's
router event loop (a prefix match, a smallest-tenant lookup and an insert per request), which
stalls every call the ingress routes meanwhile. This subclass makes the same decisions with
awaited calls and inserts without waiting. Measured with 240 short disaggregated requests, 48 at
once, and no failover: with Ray's blocking calls decode replicas found 43 KV payloads already
freed by Ray's reference counting while the ingress still held them; with awaited calls 12; with
no tree calls at all 0. The remaining frees are a Ray-side race this module does not remove;
the ingress's failover (serving/failover.py) retries those requests.

A second fix, to the base class's request matching: every handle call made while a replica serves a
request inherits that request's Serve internal request id, so the n engine calls of an `n`-choice
request (serving/ingress.py) share one id. The base class routes out of order (no FIFOMixin, unlike
Serve's default router, so each call gets the replica chosen for its own prompt): a routing task
gives its replica to the pending request indexed under its id, and that index holds one request
per id. The other calls were never fulfilled; their routing tasks (at most 2 per replica) retried
forever without backoff, and every later call through that handle waited behind them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
    PrefixCacheAffinityRouter,
)
from ray.serve._private.common import ReplicaID

log = logging.getLogger(__name__)

ROUTER_PATH = "serving.routing:TokenPrefixRouter"
_SURROGATES = 0xD800  # code points [0xD800, 0xE000) are not characters: shift ids past them
_SHIFT = 0xE000 - 0xD800


def own_request_id() -> None:
    """Give the next engine call made from this task an internal request id of its own.

    Serve stamps every handle call made while serving a request with that request's internal id,
    and a request router without FIFO assignment (PrefixCacheAffinityRouter) hands the replica
    it picked to the pending call with the routed call's id: of n calls made at once (n choices,
    a retry beside a running call) only one is indexed under the shared id, and the others
    wait forever. Serve also cancels children pending assignment by that id when the parent is
    cancelled; the ingress cancels its calls itself when it stops waiting for them."""
    import dataclasses

    from ray.serve import context
    from ray.serve._private.utils import generate_request_id

    ctx = context._get_serve_request_context()
    fresh = dataclasses.replace(ctx, _internal_request_id=generate_request_id())
    context._serve_request_context.set(fresh)


def tokens_to_text(token_ids) -> str:
    """One character per token id, distinct ids -> distinct characters (ids < 0x10F800)."""
    return "".join(chr(t if t < _SURROGATES else t + _SHIFT) for t in token_ids)


class TokenPrefixRouter(PrefixCacheAffinityRouter):
    def _extract_text_from_request(self, pending_request) -> str | None:
        """None (the base class then routes by load alone) for calls without a prompt."""
        for arg in pending_request.args:
            ids = getattr(arg, "prompt_token_ids", None)
            if ids:
                return tokens_to_text(ids)
        return None

    async def _queue_lens_spread(self, replicas) -> float:
        """Largest minus smallest known queue length of `replicas` (probing uncached ones)."""
        lens, probe = [], []
        for r in replicas:
            q = self._replica_queue_len_cache.get(r.replica_id)
            if self._use_replica_queue_len_cache and q is not None and q < r.max_ongoing_requests:
                lens.append(q)
            else:
                probe.append(r)
        if probe:
            lens += [q for _, q in await self._probe_queue_lens(probe, 0) if q is not None]
        return max(lens) - min(lens) if lens else 0.0

    async def _prefix_match_best_replicas(self, pending_request, candidate_replicas):
        """The base class's choice (best prefix match while load is balanced, else the replica
        holding the fewest prefixes), with the tree actor awaited instead of ray.get."""
        text = None
        if pending_request is not None and pending_request.args:
            text = self._extract_text_from_request(pending_request)
        chosen: list[str] = []
        if text and await self._queue_lens_spread(candidate_replicas) <= self._imbalanced_threshold:
            try:
                chosen = await self._tree_choice(text, candidate_replicas)
            except Exception as e:
                # A tree call made for a request whose caller went away is cancelled with it
                # (TaskCancelledError); the tree actor may be restarting. Load decides then.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError() from None
                log.debug("prefix tree unavailable (%s); routing by load", type(e).__name__)
        return [[self._replicas[ReplicaID.from_full_id_str(c)] for c in chosen]]

    async def _tree_choice(self, text: str, candidate_replicas) -> list[str]:
        ids = [r.replica_id.to_full_id_str() for r in candidate_replicas]
        matched, tenants = await self._tree_actor.prefix_match.remote(text, ids)
        if len(matched) / len(text) < self._match_rate_threshold:
            return await self._tree_actor.get_smallest_tenants.remote() or []
        return tenants or []

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        """Record the prompt for the replica that took it, without waiting for the tree."""
        if pending_request is not None and pending_request.args:
            text = self._extract_text_from_request(pending_request)
            if text is not None:
                self._tree_actor.insert.remote(text, replica_id.to_full_id_str(), time.time())

    def _get_pending_request_matching_internal_request_id(self, request_metadata=None):
        """The pending request this routing task chose a replica for: the one indexed under its
        id if it is that call (the metadata object is per call), else a scan of the pending
        queue for it (only calls sharing an id reach the scan; the queue is the in-flight set)."""
        pr = super()._get_pending_request_matching_internal_request_id(request_metadata)
        if request_metadata is None or (pr is not None and pr.metadata is request_metadata):
            return pr
        for pr in self._pending_requests_to_fulfill:
            if pr.metadata is request_metadata and not pr.future.done():
                return pr
        return None
