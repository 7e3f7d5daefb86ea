"""Checks on every HTTP request before the app sees it: the API key, the body's size and how
long the client takes to send the body.

A pure ASGI middleware rather than a FastAPI dependency: a dependency runs after FastAPI has
read and parsed the body, so a keyless client could make the server read 100 MB, and a keyless
malformed body got a 400 instead of a 401. Here the key is checked on the headers alone; only a
request that may proceed has its body read, at most ``max_body_bytes`` of it and within
``read_timeout`` seconds, and the app then gets the body as if it had read it itself.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tierkv.server.protocol import ErrorResponse

# Reachable without the key. /metrics too, as in vLLM: Prometheus scrapers are rarely given
# a bearer token, and the page holds aggregate counters only, no prompt or output.
PUBLIC_PATHS = frozenset({"/health", "/metrics"})


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one HTTP request (and the shutdown) may cost the server.

    Attributes:
        max_body_bytes: largest request body. A larger one gets a 413: from its declared
            Content-Length before any of it is read, or as soon as a chunked body passes it.
        max_prompts: most prompts in one ``/v1/completions`` request (a 400 beyond).
        read_timeout: seconds a client has to send a request's headers (else the connection
            is closed, ``launcher.GuardedH11Protocol``) and then its body (else a 408).
        timeout_keep_alive: seconds an idle keep-alive connection stays open (uvicorn's).
        shutdown_timeout: seconds requests in flight at SIGTERM have to finish before they
            are aborted; 0 (vLLM's default) aborts them at once.
    """

    max_body_bytes: int = 8 * 2**20
    max_prompts: int = 128
    read_timeout: float = 30.0
    timeout_keep_alive: float = 5.0
    shutdown_timeout: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerLimits:
        """The limits ``tierkv serve``'s flags set (``server/serve_args.py``)."""
        return cls(
            max_body_bytes=args.max_request_body_bytes,
            max_prompts=args.max_prompts_per_request,
            read_timeout=args.read_timeout,
            timeout_keep_alive=args.timeout_keep_alive,
            shutdown_timeout=args.shutdown_timeout,
        )

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompts", "read_timeout", "timeout_keep_alive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout!r}")


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


def _reject(status: int, message: str, type: str, code: str | None = None) -> Response:
    """An OpenAI error response. The body may be unread: the connection then discards what
    follows for a moment and closes (``launcher.GuardedH11Protocol``)."""
    headers = {"www-authenticate": "Bearer"} if status == 401 else {}
    body = ErrorResponse.of(message, type, code=code).model_dump_json()
    return Response(body, status_code=status, headers=headers, media_type="application/json")


class RequestGuard:
    """ASGI middleware: the API key (before any body is read), then the body within limits.

    With ``api_key`` set, every path but ``PUBLIC_PATHS`` needs ``Authorization: Bearer
    <api_key>`` (401 otherwise). The body is then read here: 413 past ``max_body_bytes``, 408
    past ``read_timeout``.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, limits: ServerLimits) -> None:
        self.app = app
        self.api_key = api_key
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.api_key is not None and scope["path"] not in PUBLIC_PATHS:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            key = self.api_key.encode()
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), key):
                reply = _reject(
                    401, "Invalid or missing API key.", "authentication_error", "invalid_api_key"
                )
                await reply(scope, receive, send)
                return
        limit = self.limits.max_body_bytes
        too_large = _reject(
            413,
            f"the request body exceeds the server's limit of {limit} bytes",
            "invalid_request_error",
            "request_too_large",
        )
        # h11 has already refused a Content-Length that is not a number.
        if int(headers.get("content-length", "0")) > limit:
            await too_large(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.limits.read_timeout)
        except _TooLarge:
            await too_large(scope, receive, send)
            return
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            reply = _reject(
                408,
                f"the request body was not received within {self.limits.read_timeout:g} s",
                "invalid_request_error",
                "request_timeout",
            )
            await reply(scope, receive, send)
            return
        except _Disconnected:
            return  # nobody to answer
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:  # a chunked body declares no length
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body already read, then the client's later messages (the
    disconnect that aborts a request)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
