"""Serving the app with uvicorn: the socket bound before the model loads, a deadline on request
headers, a bounded drain on SIGTERM, logging, and the startup banner.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import logging.config
import socket
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from tierkv.engine.engine import Engine
from tierkv.server.guard import ServerLimits

logger = logging.getLogger("tierkv.server")


# How long, and for how many bytes, the rest of a refused request's body is discarded before
# the connection closes: closing on unread data resets the connection, and the client may then
# lose the answer it was sent.
LINGER_S = 1.0
LINGER_BYTES = 1 << 20


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers and a bounded discard of a
    body the app refused unread.

    uvicorn closes idle keep-alive connections, but not one whose request headers never
    complete: a slowloris client that opens many connections and sends a header byte now and
    then holds them all. Here a connection has ``header_timeout`` seconds from its opening, or
    from the first byte of its next request, to complete the headers, or it is closed.

    And uvicorn reads and discards, without limit, a body still arriving after the app
    answered (as ``guard.RequestGuard`` does to a keyless 100 MB upload); here it is
    discarded for ``LINGER_S`` seconds and ``LINGER_BYTES`` bytes at most.
    """

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._discarded = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self._close()
                return
        super().data_received(data)
        if self._linger is not None and self.conn.their_state is not h11.SEND_BODY:
            self._cancel(self._linger)  # the body has ended: the connection goes on
            self._linger = None
        if self.conn.their_state is h11.IDLE:
            self._arm()  # headers still incomplete: the deadline runs (it is not reset)
        else:
            self._cancel(self._header_deadline)
            self._header_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self._discarded = 0
            self._linger = self.loop.call_later(LINGER_S, self._close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel(self._header_deadline)
        self._cancel(self._linger)
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_deadline is None and not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(self.header_timeout, self._expire)

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    def _expire(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE:
            self._close()

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


# Once the shutdown timeout has passed and the engine is stopped, responses end at once (with a
# 503 or an in-band error); uvicorn cancels any still open (a client not reading) this much later.
ABORT_GRACE_S = 3.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a bounded drain, where a second SIGTERM exits as a second SIGINT.

    On the first signal uvicorn stops accepting connections and waits for the requests in
    flight; after ``drain_timeout`` seconds ``abort`` (stopping the engine) ends those still
    running, each with an error of its own, and the server exits.
    """

    def __init__(
        self, config: uvicorn.Config, drain_timeout: float, abort: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.abort = abort

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            logger.warning("second signal: exiting without waiting for requests in flight")
            self.force_exit = True
        else:
            logger.info(
                "shutting down: requests in flight have %g s to finish (--shutdown-timeout); "
                "signal again to exit at once",
                self.drain_timeout,
            )
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        deadline = asyncio.ensure_future(self._abort_after_timeout())
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    async def _abort_after_timeout(self) -> None:
        await asyncio.sleep(self.drain_timeout)
        if self.server_state.tasks:
            logger.warning(
                "shutdown timeout: aborting %d request(s) still in flight",
                len(self.server_state.tasks),
            )
        await self.abort()


def configure_logging(level: str = "info") -> None:
    """uvicorn's log format for uvicorn's loggers and for tierkv's own (the banner, the
    ignored request fields...), which nothing else would print at INFO."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["tierkv"] = {"handlers": ["default"], "level": level.upper()}
    logging.config.dictConfig(config)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, so a busy port fails before the model loads; uvicorn
    listens on it later. Raises ``ValueError`` with the reason when it cannot be bound."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        # As uvicorn does: a restart need not wait for the old connections' TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = " (is another server running there? pick another --port)"
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from exc
    return sock


def make_server(app: FastAPI, limits: ServerLimits, **kwargs: Any) -> DrainingServer:
    """The uvicorn server of ``app`` (from ``create_app``) under ``limits``; ``kwargs`` go to
    ``uvicorn.Config``."""
    config = uvicorn.Config(
        app,
        http=functools.partial(GuardedH11Protocol, header_timeout=limits.read_timeout),
        timeout_keep_alive=limits.timeout_keep_alive,  # type: ignore[arg-type]
        timeout_graceful_shutdown=limits.shutdown_timeout + ABORT_GRACE_S,  # type: ignore[arg-type]
        **kwargs,
    )
    engine = app.state.engine

    async def abort() -> None:
        # Stopping the engine ends every request it still runs with an error of its own.
        await asyncio.to_thread(engine.stop)

    return DrainingServer(config, limits.shutdown_timeout, abort)


def banner(engine: Engine, model_name: str, address: str) -> str:
    """One line with what is served and how: model, dtype, KV policy and pool, length limit."""
    pool = engine.pool_counters()
    pages, page_bytes = int(pool["total_pages"]), int(pool["page_bytes"])
    per_token = float(pool["kv_bytes_per_token"])
    tokens = int(pages * page_bytes // per_token) if per_token else 0
    dtype = str(engine.dtype).removeprefix("torch.")
    return (
        f"serving {model_name!r} ({engine.config.model}) on {address}: dtype {dtype}, "
        f"kv_policy {engine.config.kv_policy}, KV pool {pages} pages x {page_bytes} B = "
        f"{pages * page_bytes / 2**20:.1f} MiB (about {tokens} tokens at "
        f"{per_token:.0f} B/token), max_model_len {engine.max_model_len}"
    )


def serve_app(app: FastAPI, sock: socket.socket, limits: ServerLimits) -> None:
    """Serve ``app`` on the bound ``sock`` until a signal, then drain within the limits."""
    server = make_server(app, limits, log_config=None, log_level="info")
    # uvicorn re-raises a caught SIGINT once it has shut down: not an error here.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
