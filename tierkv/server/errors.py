"""Errors as clients see them: an HTTP status and OpenAI's error body."""

from __future__ import annotations

from tierkv.engine.async_protocol import EngineDeadError, StepError
from tierkv.server.protocol import ErrorResponse


class APIError(Exception):
    """An error the client receives as an OpenAI error body with HTTP status ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse.of(message, type, param, code)


def describe_error(exc: BaseException) -> tuple[int, ErrorResponse]:
    """The HTTP status and OpenAI error body for an exception raised while serving."""
    if isinstance(exc, APIError):
        return exc.status, exc.body
    if isinstance(exc, EngineDeadError):
        return 503, ErrorResponse.of(str(exc), "service_unavailable", code="engine_dead")
    if isinstance(exc, StepError):
        return 500, ErrorResponse.of(str(exc), "internal_error")
    return 500, ErrorResponse.of("internal server error", "internal_error")
