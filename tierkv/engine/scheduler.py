"""Scheduler: continuous batching under a token budget, chunked prefill, admission by pages.

Each step, running requests come first (decodes and unfinished prefill chunks, oldest first),
then waiting requests are admitted in arrival order while the token budget, ``max_num_seqs``
and the pool allow. Admission reserves the pages of the whole prompt in the request's own KV
format (its policy's high tier, plus the spare low pages of a tiered policy), so a running
prefill never stalls for memory; a decode that needs a new page and finds none preempts the newest
running request, whose pages return to the pool and whose tokens are recomputed later.

With a ``prefix_cache``, an admitted request whose policy stores its prompt as written (see
``prefix_namespace``) starts from the longest cached prefix of its prompt: those pages join its
page table shared, it computes from the first token after them, and the pages it fills are
cached in turn after each step (``cache_computed``). Cached pages no request uses count as
available: taking them evicts them.

With ``chunk`` set (the engine's batch-invariant mode), a prompt is split at the same
positions whatever else runs: every chunk ends at a multiple of ``chunk`` tokens (or at the
prompt's end), and a chunk the step's budget cannot hold waits for a later step instead of
being cut short. Under a compressing KV policy a chunk sees its own tokens uncompressed and
earlier chunks through the cache, so where a prompt is cut changes its logits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from tierkv.engine.request import Request, RequestStatus
from tierkv.kv import KVStore, PrefixCache, PrefixHit, namespace_key


@dataclass
class SchedulerOutput:
    """The requests of one step and how many new tokens each computes."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, req: Request, n: int) -> None:
        self.requests.append(req)
        self.num_new_tokens.append(n)


class Scheduler:
    """Decides, each step, which requests run and how many tokens each computes."""

    def __init__(
        self,
        store: KVStore,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        chunk: int | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.store = store
        self.prefix_cache = prefix_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk = chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.max_running = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work and reserve the pages it needs."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        remaining = [self._wanted(r) for r in self.running]
        if self.running and sum(remaining) <= budget and self._reserve_all():
            # The common step: every running request fits the budget and the pool, so their
            # pages are reserved in one call instead of one per request.
            for req, n in zip(self.running, remaining, strict=True):
                out.add(req, n)
            budget -= sum(remaining)
        i = len(out.requests)
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(self._wanted(req), budget)
            if self.chunk is not None and n < self._wanted(req):
                i += 1  # its aligned chunk waits for a step with room for all of it
                continue
            if not self._ensure_pages(req):
                break  # `req` itself was preempted: every later request is gone too
            out.add(req, n)
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            namespace = self.prefix_namespace(req)
            hit = self._lookup(req, namespace)
            need = self.store.pages_to_admit(req.num_tokens, req.kv_policy)
            available = self.store.pool.num_available
            if hit is not None:
                saved, evictable = self.prefix_cache.pages_reused(hit)
                need, available = need - saved, available - evictable
            if need > available:
                break  # first come, first served: nothing jumps the queue
            if self.chunk is not None and min(req.num_tokens, self.chunk) > budget:
                break  # its first aligned chunk does not fit this step
            self.waiting.popleft()
            req.slot = self.store.acquire_slot(req.kv_policy, req.num_tokens)
            req.status = RequestStatus.RUNNING
            if hit is not None:
                self.prefix_cache.attach(req.slot, namespace, hit, req.num_tokens)
                req.num_computed_tokens = hit.num_tokens
            self._reserve(req)
            self.running.append(req)
            n = min(self._wanted(req), budget)
            out.add(req, n)
            budget -= n
        self.max_running = max(self.max_running, len(self.running))
        return out

    def prefix_namespace(self, req: Request) -> bytes | None:
        """The prefix-cache namespace of ``req``'s pages, or None when it does not share.

        Only uncompressed uniform policies share today: their pages hold exactly what a
        chunk's attention sees of its own tokens, so a request that reuses cached pages
        computes what it would have computed alone. A quantized format's chunk sees its
        own tokens uncompressed and a residual ring holds uncompressed copies no block
        describes, so sharing them would change outputs (docs/prefix_caching.md).
        """
        policy = req.kv_policy
        if (
            self.prefix_cache is None
            or not req.params.prefix_caching
            or policy.tiered
            or policy.high.quantized
        ):
            return None
        return namespace_key(policy.high.name, str(self.store.dtype), req.params.cache_salt)

    def _lookup(self, req: Request, namespace: bytes | None) -> PrefixHit | None:
        if namespace is None:
            return None
        tokens = req.token_ids(0, req.num_tokens)
        block = self.store.tokens_per_page(req.kv_policy.high)
        return self.prefix_cache.lookup(namespace, tokens, block)

    def cache_computed(self, step: SchedulerOutput) -> None:
        """Offer the blocks the step's requests filled to the prefix cache (after the step's
        model run, before any of them is released)."""
        if self.prefix_cache is None:
            return
        for req in step.requests:
            if req.slot is not None:
                block = self.store.tokens_per_page(req.kv_policy.high)
                self.prefix_cache.register(req.slot, req.token_ids, req.num_computed_tokens, block)

    def _wanted(self, req: Request) -> int:
        """The tokens ``req`` would compute this step given room: all it has left, or with
        ``chunk``, up to the next multiple of ``chunk``."""
        left = req.num_tokens - req.num_computed_tokens
        if self.chunk is None:
            return left
        return min(left, self.chunk - req.num_computed_tokens % self.chunk)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request and free its pages at once."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED

    def _ensure_pages(self, req: Request) -> bool:
        """Reserve pages for ``req``'s tokens, preempting newer requests while short.

        Returns False when ``req`` itself had to be preempted.
        """
        while self.store.pages_to_grow(req.slot, req.num_tokens) > self.store.pool.num_available:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        self._reserve(req)
        return True

    def _reserve_all(self) -> bool:
        """Reserve the pages of every running request at once, if the pool has them all."""
        slots = torch.tensor([r.slot for r in self.running])
        tokens = torch.tensor([r.num_tokens for r in self.running])
        return self.store.try_reserve(slots, tokens)

    def _reserve(self, req: Request) -> None:
        self.store.reserve(torch.tensor([req.slot]), torch.tensor([req.num_tokens]))

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _release(self, req: Request) -> None:
        self.store.release_slot(req.slot)
        req.slot = None
