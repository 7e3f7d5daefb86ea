"""AsyncEngine: one thread steps the engine while asyncio coroutines await their outputs.

The engine is not thread-safe, so it is touched only by the loop thread. Coroutines hand it
requests and aborts through a thread-safe inbox, which the loop drains before every step; all
requests in flight are batched by the same ``Engine.step()``. Outputs travel back through one
asyncio queue per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from tierkv.engine.async_protocol import (
    Abort,
    Add,
    Command,
    EngineDeadError,
    RequestError,
    RequestStats,
    RequestStream,
    ResetPrefixCache,
    StatsSink,
    StepError,
    Tracked,
    settle_future,
)
from tierkv.engine.engine import Engine
from tierkv.engine.request import RequestOutput
from tierkv.sampling import SamplingParams

logger = logging.getLogger(__name__)

# A step can fail for reasons tied to its batch; failing this many steps in a row means the
# engine itself is broken, and pretending otherwise would only fail every request slowly.
MAX_CONSECUTIVE_FAILURES = 3


class AsyncEngine:
    """Serves an ``Engine`` to asyncio code from a background loop thread.

    Call ``start()`` once, then ``add_request``/``generate`` from coroutines; ``stop()`` ends
    the loop. ``is_running`` turns false for good when the loop dies; a failing step fails only
    the requests that were running in it.
    """

    def __init__(self, engine: Engine, stats: StatsSink | None = None) -> None:
        self.engine = engine
        self._stats = stats
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        # Guards the inbox against the loop's death, so no command is queued after the
        # final drain and left unanswered.
        self._lock = threading.Lock()
        self._error: EngineDeadError | None = None
        self._stopping = False
        self._failures = 0
        self._tracked: dict[str, Tracked] = {}  # loop thread only
        self._thread = threading.Thread(target=self._run, name="tierkv-engine-loop", daemon=True)

    # -- asyncio side ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine loop thread."""
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop after its current step; requests still in flight fail."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        """Whether the loop is alive and accepting requests."""
        return self._thread.is_alive() and self._error is None

    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        """Queue a request and wait until the engine accepted it.

        Raises the engine's ``ValueError`` for an invalid prompt and ``EngineDeadError`` when
        the loop has stopped. ``request_id`` must be unique among requests in flight.
        """
        loop = asyncio.get_running_loop()
        prompt_tokens = len(prompt) if isinstance(prompt, list) else 0
        tracked = Tracked(loop, asyncio.Queue(), prompt_tokens)
        accepted: asyncio.Future[None] = loop.create_future()
        if not self._submit(Add(request_id, prompt, params, tracked, accepted)):
            raise EngineDeadError("the engine loop has stopped") from self._error
        try:
            await accepted
        except asyncio.CancelledError:
            # The caller gave up; the add may still be accepted, so abort right behind it.
            self._submit(Abort(request_id))
            raise
        return RequestStream(request_id, self._submit, tracked.outputs)

    async def reset_prefix_cache(self) -> None:
        """Evict every cached prefix page no running request uses, on the engine's thread
        between two steps (vLLM's ``reset_prefix_cache``). Raises ``EngineDeadError`` when
        the loop has stopped."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._submit(ResetPrefixCache(done)):
            raise EngineDeadError("the engine loop has stopped") from self._error
        await done

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative outputs until it finishes.

        Closing the iterator early (or cancelling the task that reads it, as a client
        disconnect does) aborts the request.
        """
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def _submit(self, command: Command) -> bool:
        with self._lock:
            if self._error is not None:
                return False
            self._inbox.put(command)
            return True

    # -- loop thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished() and not self._stopping:
                    self._step()
                self._record_engine()
            error = EngineDeadError("the engine was shut down")
        except BaseException as exc:
            logger.exception("the engine loop died")
            error = EngineDeadError(f"the engine loop died: {exc!r}")
            error.__cause__ = exc
        self._close(error)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                command = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if isinstance(command, Add):
                self._add(command)
            elif isinstance(command, Abort):
                self._abort(command.request_id)
            elif isinstance(command, ResetPrefixCache):
                self.engine.reset_prefix_cache()
                settle_future(command.done, None)
            else:
                return

    def _add(self, command: Add) -> None:
        try:
            self.engine.add_request(command.prompt, command.params, command.request_id)
        except Exception as exc:  # a bad request is its caller's problem, not the loop's
            settle_future(command.accepted, exc)
            return
        self._tracked[command.request_id] = command.tracked
        settle_future(command.accepted, None)

    def _abort(self, request_id: str) -> None:
        tracked = self._tracked.pop(request_id, None)
        if tracked is not None:
            self.engine.abort(request_id)
            # Pool gauges first: whoever sees the request counted as ended sees its pages freed.
            self._record_engine()
            self._record(tracked, "abort")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self._step_failed(exc)
            return
        self._failures = 0
        self._record_engine()
        now = time.monotonic()
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue
            if tracked.first_token is None and any(c.token_ids for c in output.outputs):
                tracked.first_token = now
            tracked.last = output
            if output.error is not None:
                del self._tracked[output.request_id]
                tracked.push(RequestError(f"generating this request failed: {output.error}"))
                self._record(tracked, "error")
                continue
            tracked.push(output)
            if output.finished:
                del self._tracked[output.request_id]
                self._record(tracked, None)

    def _record_engine(self) -> None:
        if self._stats is not None:
            self._stats.record_engine(self.engine.pool_counters())

    def _step_failed(self, exc: Exception) -> None:
        # Only a failure of the whole step (the model's forward pass, the scheduler) lands
        # here: a failure of one request's sampling or output ends that request in the engine.
        self._failures += 1
        if self._failures >= MAX_CONSECUTIVE_FAILURES:
            raise EngineDeadError(f"{self._failures} engine steps failed in a row") from exc
        logger.exception("an engine step failed; aborting the requests it was running")
        running = self.engine.running_request_ids()
        victims = [rid for rid in self._tracked if rid in running] or list(self._tracked)
        error = StepError(f"the engine failed while running this request: {exc!r}")
        for request_id in victims:
            tracked = self._tracked.pop(request_id)
            self.engine.abort(request_id)
            tracked.push(error)
            self._record(tracked, "error")

    def _close(self, error: EngineDeadError) -> None:
        with self._lock:
            self._error = error
            while True:
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(command, Add):
                    settle_future(command.accepted, error)
                elif isinstance(command, ResetPrefixCache):
                    settle_future(command.done, error)
        for request_id, tracked in self._tracked.items():
            # Free the pages too, so the pool counters stay true after the loop has died
            # (best effort: the engine may be what broke).
            with contextlib.suppress(Exception):
                self.engine.abort(request_id)
            tracked.push(error)
        self._tracked.clear()

    def _record(self, tracked: Tracked, reason: str | None) -> None:
        """Report a request that ended; ``reason`` overrides the completions' own."""
        if self._stats is None:
            return
        now = time.monotonic()
        completions = tracked.last.outputs if tracked.last is not None else []
        if reason is not None:
            reasons = (reason,) * max(1, len(completions))
        else:
            reasons = tuple(c.finish_reason or "abort" for c in completions)
        longest = max((len(c.token_ids) for c in completions), default=0)
        first = tracked.first_token
        prompt_tokens = tracked.prompt_tokens
        if tracked.last is not None:
            prompt_tokens = len(tracked.last.prompt_token_ids)
        self._stats.record_request(
            RequestStats(
                prompt_tokens=prompt_tokens,
                generation_tokens=sum(len(c.token_ids) for c in completions),
                finish_reasons=reasons,
                ttft=None if first is None else first - tracked.arrival,
                tpot=None if first is None or longest < 2 else (now - first) / (longest - 1),
                e2e=now - tracked.arrival,
            )
        )
