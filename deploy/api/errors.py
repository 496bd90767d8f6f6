"""What a client sees when something fails: `APIError` (an OpenAI error body and an HTTP status), and
the one mapping from any failure to it (`to_api_error`), which gRPC maps on to its status codes.

Errors follow vLLM: the HTTP status in the body's `code`, the `type` named as openai-python's
exception classes. Never a stack trace: an unexpected failure is a logged 500 naming its class.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import BaseModel

from moray.actors.faults import busy, unavailable
from moray.model.errors import QueueFullError, RequestError

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
# HTTP status -> OpenAI error `type`, named as openai-python's exception classes (vLLM's convention).
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error the client sees as `{"error": {...}}` with HTTP `status` (and `headers`, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Serve handles intact
        return (APIError, (self.status, self.message, self.param, self.headers))

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=ERROR_TYPES.get(self.status, "APIError"),
                         param=self.param, code=self.status)
        return ErrorResponse(error=info).model_dump()


def unwrap(e: BaseException) -> BaseException:
    """The exception a remote replica raised, not Ray's wrapper (whose str() holds a traceback)."""
    cause = getattr(e, "cause", None)
    if type(e).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
        return unwrap(cause)
    return e


def to_api_error(e: BaseException) -> APIError:
    """Map any failure to what the client sees; never a stack trace."""
    e = unwrap(e)
    name = type(e).__name__
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestError):
        return APIError(400, str(e))
    if isinstance(e, QueueFullError) or busy(e):
        return APIError(429, "the server is overloaded; retry later", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(e, asyncio.TimeoutError):
        return APIError(504, "the request timed out")
    if unavailable(e):  # the one classifier of Ray's, Serve's and moray's errors (actors/faults.py)
        return APIError(503, f"the model is unavailable ({name}); retry later",
                        headers={"Retry-After": RETRY_AFTER_S})
    log.error("internal error: %s", name, exc_info=e)
    return APIError(500, f"internal server error ({name})")
