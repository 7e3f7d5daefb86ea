"""What ``AsyncEngine``'s callers and its loop thread exchange: the errors a request can end
with, the statistics the loop reports, the commands coroutines hand the loop (adds, aborts,
cache resets) with the loop-side state of each request, and ``RequestStream``, the async
iterator a caller reads a request's outputs from."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tierkv.engine.request import RequestOutput
from tierkv.sampling import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop has stopped: no request can be served any more."""


class StepError(RuntimeError):
    """An engine step failed while this request was in it; the request was aborted."""


class RequestError(StepError):
    """The engine ended this request alone with an error (its sampling or post-processing
    raised); the other requests of its step went on."""


@dataclass(frozen=True)
class RequestStats:
    """What one request cost; ``finish_reasons`` has one entry per completion."""

    prompt_tokens: int
    generation_tokens: int
    finish_reasons: tuple[str, ...]
    ttft: float | None
    tpot: float | None
    e2e: float


class StatsSink(Protocol):
    """Receives statistics on the loop thread (implementations must be thread-safe)."""

    def record_request(self, stats: RequestStats) -> None: ...

    def record_engine(self, kv_stats: dict[str, Any]) -> None: ...


Item = RequestOutput | BaseException


@dataclass
class Tracked:
    """Loop-side state of one accepted request, and the way back to its coroutine."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[Item]
    prompt_tokens: int
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last: RequestOutput | None = None

    def push(self, item: Item) -> None:
        # A closed event loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


@dataclass
class Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    tracked: Tracked
    accepted: asyncio.Future[None]


@dataclass
class Abort:
    request_id: str


@dataclass
class ResetPrefixCache:
    done: asyncio.Future[None]


Command = Add | Abort | ResetPrefixCache | None  # None wakes the loop up to stop


def settle_future(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Resolve an asyncio future from the loop thread (unless its waiter gave up)."""

    def settle() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    with contextlib.suppress(RuntimeError):
        future.get_loop().call_soon_threadsafe(settle)


class RequestStream:
    """The outputs of one accepted request, as an async iterator.

    Each item is the request's cumulative state; a slow reader skips intermediate states
    rather than queueing them. Iteration ends after the finished output. ``abort()`` stops
    the request and returns its KV pages to the pool; it is a no-op once finished.
    """

    def __init__(
        self,
        request_id: str,
        submit: Callable[[Command], bool],
        outputs: asyncio.Queue[Item],
    ) -> None:
        self.request_id = request_id
        # The engine's inbox (``AsyncEngine._submit``), where ``abort`` sends its command.
        self._submit = submit
        self._outputs = outputs
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._outputs.get()
        while not isinstance(item, BaseException) and not self._outputs.empty():
            item = self._outputs.get_nowait()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def abort(self) -> None:
        """Stop the request now (safe to call from ``finally`` blocks and more than once)."""
        if not self._done:
            self._done = True
            self._submit(Abort(self.request_id))
