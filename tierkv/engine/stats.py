"""Counters of the engine: where step time goes, and the KV pool and scheduler accounting
behind ``Engine.kv_stats`` and ``Engine.pool_counters``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # annotations only: the engine passes its own scheduler and policy in
    from tierkv.engine.scheduler import Scheduler
    from tierkv.kv import KVPolicy


@dataclass
class StepTimes:
    """Wall time spent in ``Engine.step``, by kind of step: steps that compute prompt tokens
    (prefill chunks and recomputation after a preemption, with any decodes batched beside
    them) and steps of decodes only. ``decode_rows`` sums the requests of the decode steps, so
    ``decode_rows / decode_steps`` is their mean batch. Benchmarks read the difference of two
    snapshots (``snapshot``): where a run's time goes, and at what batch it decodes."""

    prefill_steps: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0
    decode_rows: int = 0

    def record(self, decode_only: bool, rows: int, seconds: float) -> None:
        """Count one step of ``rows`` requests that took ``seconds``."""
        if decode_only:
            self.decode_steps += 1
            self.decode_s += seconds
            self.decode_rows += rows
        else:
            self.prefill_steps += 1
            self.prefill_s += seconds

    def snapshot(self) -> StepTimes:
        """A copy of the counters as they are now."""
        return StepTimes(**vars(self))

    def since(self, earlier: StepTimes) -> StepTimes:
        """The steps recorded after ``earlier`` (a ``snapshot`` of this one)."""
        return StepTimes(**{k: v - getattr(earlier, k) for k, v in vars(self).items()})


def histogram(values: torch.Tensor, bins: int = 8) -> dict[str, list[float] | list[int]]:
    """Counts of ``values`` in ``bins`` equal-width bins over [0, max]: ``edges`` has bins + 1."""
    top = int(values.max()) if values.numel() else 0
    edges = torch.linspace(0, max(top, 1), bins + 1)
    counts = torch.histc(values.float(), bins=bins, min=0, max=float(edges[-1]))
    return {"edges": [round(float(e), 1) for e in edges], "counts": counts.int().tolist()}


def kv_stats(scheduler: Scheduler, policy: KVPolicy) -> dict[str, Any]:
    """KV pool and scheduler counters under the engine's ``policy``; bytes per token include
    all metadata.

    ``kv_bytes_per_token`` is the engine policy's analytic cost of a kept token (of its high
    tier: an upper bound for a tiered policy), ``kv_bytes_per_token_by_tier`` the analytic
    cost of each tier, ``kv_bytes_per_token_measured`` the pool bytes held per token
    computed by the running requests (pruned tokens count as computed, so this is the
    effective cost), ``tiers`` the tokens and pages the running requests hold per tier,
    ``tokens_per_head`` a histogram of the tokens each running (request, layer, KV head)
    holds, and ``max_running`` the most requests held running at once.
    """
    store = scheduler.store
    running = scheduler.running
    held = sum(r.num_computed_tokens for r in running)
    slots = torch.tensor([r.slot for r in running], dtype=torch.int64)
    by_tier = {"high": store.bytes_per_token(policy.high)}
    if policy.low is not None:
        by_tier["low"] = store.bytes_per_token(policy.low)
    usage = store.tier_usage(slots)
    counters = pool_counters(scheduler, policy)
    in_use = counters["kv_bytes_in_use"]
    return {
        "policy": policy.name,
        **counters,
        "tokens_per_page": store.tokens_per_page(policy.high),
        "kv_bytes_per_token_by_tier": by_tier,
        "kv_bytes_per_token_measured": in_use / held if held else None,
        "tiers": {t: {"tokens": n, "pages": p} for t, (n, p) in usage.items()},
        "tokens_per_head": histogram(store.tokens_per_head(slots)),
    }


def pool_counters(scheduler: Scheduler, policy: KVPolicy) -> dict[str, int | float]:
    """The plain counters of ``kv_stats`` (pages, bytes, requests), cheap enough to read
    after every step, as the server's metrics do."""
    store = scheduler.store
    pool = store.pool
    cache = scheduler.prefix_cache
    available = pool.num_available
    return {
        "total_pages": pool.num_pages,
        # Cached pages no request uses are free: taking them evicts them.
        "free_pages": available,
        "used_pages": pool.num_pages - available,
        "prefix_cache_pages": cache.num_pages if cache is not None else 0,
        "prefix_cache_queries": cache.queries if cache is not None else 0,
        "prefix_cache_hits": cache.hits if cache is not None else 0,
        "page_bytes": pool.page_bytes,
        "kv_bytes_per_token": store.bytes_per_token(policy.high),
        "kv_bytes_in_use": store.bytes_in_use(),
        "preemptions": scheduler.num_preemptions,
        "running": len(scheduler.running),
        "waiting": len(scheduler.waiting),
        "max_running": scheduler.max_running,
    }
