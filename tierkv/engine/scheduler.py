"""Scheduler: continuous batching under a token budget, chunked prefill, admission by pages.

Each step, running requests come first (decodes and unfinished prefill chunks, oldest first),
then waiting requests are admitted in arrival order while the token budget, ``max_num_seqs``
and the pool allow. Admission reserves the pages of the whole prompt in the request's own KV
format (its policy's high tier, plus the spare low pages of a tiered policy), so a running
prefill never stalls for memory; a decode that needs a new page and finds none preempts the newest
running request, whose pages return to the pool and whose tokens are recomputed later.

With a ``prefix_cache``, an admitted request whose pages can be shared (see ``sharing``)
starts from the longest usable cached prefix of its prompt: those pages join its page table
(shared, or copied for a tiered policy), it computes from the first token after them, and the
pages it fills are cached in turn after each step (``cache_computed``). Cached pages no request
uses count as available: taking them evicts them.

With ``chunk`` set (the engine's batch-invariant mode), a prompt is split at the same
positions whatever else runs: every chunk ends at a multiple of ``chunk`` tokens (rounded down
to whole pages for a quantized format: ``cut``) or at the prompt's end, and a chunk the step's
budget cannot hold waits for a later step instead of being cut short. Under a compressing KV
policy a chunk sees its own tokens uncompressed and earlier chunks through the cache, so where
a prompt is cut changes its logits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from tierkv.engine.request import Request, RequestStatus
from tierkv.kv import KVStore, PrefixCache, PrefixHit, Sharing, namespace_key


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
            if self.cut(req) is not None and n < self._wanted(req):
                i += 1  # its aligned chunk waits for a step with room for all of it
                continue
            if not self._ensure_pages(req):
                break  # `req` itself was preempted: every later request is gone too
            out.add(req, n)
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            sharing = self.sharing(req)
            hit = self._lookup(req, sharing)
            need = self.store.pages_to_admit(req.num_tokens, req.kv_policy)
            available = self.store.pool.num_available
            if hit is not None:
                saved, evictable = self.prefix_cache.pages_reused(sharing, hit)
                need, available = need - saved, available - evictable
            if need > available:
                break  # first come, first served: nothing jumps the queue
            grid = self.cut(req)
            if grid is not None and min(req.num_tokens, grid) > budget:
                break  # its first aligned chunk does not fit this step
            self.waiting.popleft()
            req.slot = self.store.acquire_slot(req.kv_policy, req.num_tokens)
            req.status = RequestStatus.RUNNING
            if sharing is not None:
                self.prefix_cache.attach(req.slot, sharing, hit, req.num_tokens)
                req.num_computed_tokens = hit.num_tokens
            self._reserve(req)
            if hit is not None:
                self.prefix_cache.restore_ring(req.slot, hit)
            self.running.append(req)
            n = min(self._wanted(req), budget)
            out.add(req, n)
            budget -= n
        self.max_running = max(self.max_running, len(self.running))
        return out

    def sharing(self, req: Request) -> Sharing | None:
        """How ``req`` shares pages through the prefix cache, or None when it does not.

        A request reusing cached pages must compute what it computes alone. Uncompressed
        uniform policies share at any page: their pages hold exactly what a chunk's attention
        sees of its own tokens. A quantized format's chunk sees its own tokens uncompressed
        and earlier chunks through the cache, so its outputs depend on where its prompt is
        cut: uniform quantized policies share only where prompts are cut at fixed positions
        (``chunk``, batch-invariant mode), their prompt's pages, and hits end on those cuts
        with a copy of the residual ring there. Tiered policies do the same by copy (their
        scores and decisions rewrite their pages), and hits end before the prompt's scoring
        queries (docs/prefix_caching.md).
        """
        policy = req.kv_policy
        if self.prefix_cache is None or not req.params.prefix_caching:
            return None
        block = self.store.tokens_per_page(policy.high)
        salt = req.params.cache_salt
        if not policy.high.quantized and not policy.tiered:
            namespace = namespace_key(policy.high.name, str(self.store.dtype), salt)
            return Sharing(namespace, block, block)
        step = self.cut(req)
        if step is None:
            return None
        namespace = namespace_key(policy.name, policy.residual, str(self.store.dtype), salt, step)
        prompt = len(req.prompt_token_ids)
        ring = policy.residual > 0
        if not policy.tiered:
            return Sharing(namespace, block, step, prompt, ring=ring)
        # A hit ends before the prompt's scoring queries, which the request computes itself.
        horizon = prompt - policy.score_window
        return Sharing(namespace, block, step, prompt, horizon, ring, copy=True)

    def cut(self, req: Request) -> int | None:
        """Where ``req``'s prompt is cut (multiples of it), or None (wherever a step's budget
        ends). A compressing policy's cuts are whole pages of its high format, so that cached
        blocks end on them."""
        policy = req.kv_policy
        if self.chunk is None or not (policy.high.quantized or policy.tiered):
            return self.chunk
        per_page = self.store.tokens_per_page(req.kv_policy.high)
        return max(per_page, self.chunk // per_page * per_page)

    def _lookup(self, req: Request, sharing: Sharing | None) -> PrefixHit | None:
        if sharing is None:
            return None
        return self.prefix_cache.lookup(sharing, req.token_ids(0, req.num_tokens))

    def cache_computed(self, step: SchedulerOutput) -> None:
        """Offer the blocks the step's requests filled to the prefix cache (after the step's
        model run, before any of them is released)."""
        if self.prefix_cache is None:
            return
        for req in step.requests:
            if req.slot is not None:
                self.prefix_cache.register(req.slot, req.token_ids, req.num_computed_tokens)

    def _wanted(self, req: Request) -> int:
        """The tokens ``req`` would compute this step given room: all it has left, or with
        ``chunk``, up to the next multiple of ``chunk``."""
        left = req.num_tokens - req.num_computed_tokens
        grid = self.cut(req)
        if grid is None:
            return left
        return min(left, grid - req.num_computed_tokens % grid)

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
