"""Errors the server reports, each with its HTTP status and OpenAI error JSON:
`{"error": {"message", "type", "param", "code"}}` (types and codes as OpenAI's API uses them).

Raised anywhere in serving/ (ingress, orchestrator, replicas); the ingress turns them into
responses, and into a `data: {"error": ...}` event once a stream has started.
"""

from __future__ import annotations


class OpenAIError(Exception):
    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __reduce__(self):  # keep param/code when the error crosses a Ray handle
        return _rebuild, (type(self), self.message, self.param, self.code)


def _rebuild(cls, message, param, code):
    return cls(message, param=param, code=code)


class BadRequest(OpenAIError):
    status, type = 400, "invalid_request_error"


class Unauthorized(OpenAIError):
    status, type = 401, "authentication_error"


class NotFound(OpenAIError):
    status, type = 404, "not_found_error"


class PayloadTooLarge(OpenAIError):
    status, type = 413, "invalid_request_error"


class Unprocessable(OpenAIError):
    status, type = 422, "invalid_request_error"


class RateLimited(OpenAIError):
    status, type = 429, "rate_limit_error"


class Unavailable(OpenAIError):
    status, type = 503, "service_unavailable_error"


class ShuttingDown(Unavailable):
    """The server is draining (SIGTERM): it takes no new request; clients retry elsewhere."""

    retry_after_s = 5  # the Retry-After header of the 503


class KVTransferError(Unavailable):
    """The prefill->decode hand-off failed or timed out: the request fails, nothing hangs."""


class InternalError(OpenAIError):
    status, type = 500, "server_error"


def from_exception(e: BaseException) -> OpenAIError:
    """Map anything raised below the ingress to an OpenAIError (engine ValueErrors are the
    client's fault: the ingress validated what it could, the engine validates the rest)."""
    if isinstance(e, OpenAIError):
        return e
    cause = getattr(e, "cause", None) or e.__cause__  # Ray wraps remote errors
    if isinstance(cause, OpenAIError):
        return cause
    if isinstance(cause, ValueError) or isinstance(e, ValueError):
        return BadRequest(str(cause if isinstance(cause, ValueError) else e))
    name = type(e).__name__
    if name in ("BackPressureError",):
        return RateLimited("the server is at capacity; retry later", code="rate_limit_exceeded")
    if name in (
        "DeploymentUnavailableError",
        "ActorDiedError",
        "ActorUnavailableError",
        "RayActorError",
    ):
        return Unavailable(f"an engine replica is unavailable ({name}); retry later")
    return InternalError(f"{name}: {e}")
