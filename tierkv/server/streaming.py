"""Server-sent events from engine outputs: text deltas, held-back stop strings, ``[DONE]``.

The engine reports each request's cumulative state; a stream sends what is new since the
last event. Text that might be the start of a stop string is held back (a stop string is
never sent), and the engine's detokenizer already holds back incomplete UTF-8 characters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from pydantic import BaseModel

from tierkv.engine.async_protocol import EngineDeadError, RequestStream, StepError
from tierkv.engine.request import CompletionOutput, RequestOutput
from tierkv.server.errors import APIError, describe_error

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {payload.model_dump_json()}\n\n"


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the beginning of a stop string.

    That text may still grow into a stop string, which must never reach the client, so a
    stream holds it back until the next tokens settle it.
    """
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


@dataclass
class Delta:
    """New text of one choice, and the range of its tokens that produced it."""

    index: int
    text: str
    completion: CompletionOutput
    start: int
    end: int


@dataclass
class _Progress:
    """How much of one choice has been sent; ``prefix`` goes before its first text."""

    prefix: str = ""
    chars: int = 0
    tokens: int = 0
    done: bool = False

    def advance(self, index: int, c: CompletionOutput, stops: Sequence[str]) -> Delta | None:
        """The next delta of ``c``, or None while nothing new can be sent."""
        if self.done:
            return None
        self.done = c.finish_reason is not None
        visible = c.text if self.done else c.text[: len(c.text) - stop_prefix_len(c.text, stops)]
        if len(visible) <= self.chars and not self.done:
            return None
        delta = Delta(index, self.prefix + visible[self.chars :], c, self.tokens, len(c.token_ids))
        self.prefix = ""
        self.chars = max(self.chars, len(visible))
        self.tokens = len(c.token_ids)
        return delta


async def merge(streams: list[RequestStream]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Outputs of several streams as they come, tagged with the stream's position."""
    items: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                items.put_nowait((i, output))
            items.put_nowait((i, None))
        except Exception as exc:
            items.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await items.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                live -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def event_stream(
    streams: list[RequestStream],
    n: int,
    stops: Sequence[str],
    prefixes: Sequence[str],
    head: Sequence[BaseModel],
    render: Callable[[list[Delta]], BaseModel],
    usage: Callable[[list[RequestOutput]], BaseModel] | None,
) -> AsyncIterator[str]:
    """The events of ``streams`` (one per prompt, ``n`` choices each), already started.

    ``head`` goes first, then ``render`` turns each step's deltas into a chunk, then ``usage``
    turns the final outputs into a last chunk. The first event is awaited here: a started
    generator aborts its requests whenever it is closed, even by garbage collection, while
    one never started (the client left before the response began) would not.
    """
    events = _events(streams, n, stops, prefixes, head, render, usage)
    first = await anext(events)

    async def started() -> AsyncIterator[str]:
        async with aclosing(events):
            yield first
            async for event in events:
                yield event

    return started()


async def _events(
    streams: list[RequestStream],
    n: int,
    stops: Sequence[str],
    prefixes: Sequence[str],
    head: Sequence[BaseModel],
    render: Callable[[list[Delta]], BaseModel],
    usage: Callable[[list[RequestOutput]], BaseModel] | None,
) -> AsyncGenerator[str, None]:
    finals: dict[int, RequestOutput] = {}
    progress: dict[int, _Progress] = {}
    try:
        for chunk in head:
            yield sse(chunk)
        async with aclosing(merge(streams)) as merged:
            async for p, output in merged:
                finals[p] = output
                deltas = []
                for c in output.outputs:
                    index = p * n + c.index
                    state = progress.setdefault(index, _Progress(prefixes[p]))
                    delta = state.advance(index, c, stops)
                    if delta is not None:
                        deltas.append(delta)
                if deltas:
                    yield sse(render(deltas))
        if usage is not None:
            yield sse(usage([finals[p] for p in sorted(finals)]))
    except Exception as exc:
        # Once the response has begun, an error can only be reported in-band.
        if not isinstance(exc, (APIError, EngineDeadError, StepError)):
            logger.exception("a streamed request failed")
        yield sse(describe_error(exc)[1])
    finally:
        for stream in streams:
            stream.abort()
    yield DONE
