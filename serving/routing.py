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

One fix to the base class's request matching: every handle call made while a replica serves a
request inherits that request's Serve internal request id, so the n engine calls of an `n`-choice
request (serving/ingress.py) share one id. The base class routes out of order (no FIFOMixin, unlike
Serve's default router, so each call gets the replica chosen for its own prompt): a routing task
gives its replica to the pending request indexed under its id, and that index holds one request
per id. The other calls were never fulfilled; their routing tasks (at most 2 per replica) retried
forever without backoff, and every later call through that handle waited behind them.
"""

from __future__ import annotations

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
    PrefixCacheAffinityRouter,
)

ROUTER_PATH = "serving.routing:TokenPrefixRouter"
_SURROGATES = 0xD800  # code points [0xD800, 0xE000) are not characters: shift ids past them
_SHIFT = 0xE000 - 0xD800


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
