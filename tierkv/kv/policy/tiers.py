"""Tier decisions of differentiated policies: per-slot parameters and the keep/demote/prune rule.

Everything here is vectorised over a group of requests, their KV heads and their tokens (high
tier first, then low, as ``[B, H, T]`` tensors); the rules are documented in ``policy.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierkv.kv.policy.spec import KVPolicy


@dataclass
class TierCosts:
    """Pages one token costs in each tier, tokens per page of fp16 (the budget's unit), and
    the pages of a head's residual ring (a fixed cost the budget pays first)."""

    high_per_page: int
    low_per_page: int
    fp16_per_page: int
    ring_pages: int = 0


class SlotTiers:
    """The tier parameters of every store slot, as tensors indexed by slot."""

    def __init__(self, max_seqs: int) -> None:
        self.tiered = torch.zeros(max_seqs, dtype=torch.bool)
        self.alpha_high = torch.zeros(max_seqs)
        self.alpha_low = torch.zeros(max_seqs)
        # 0 means threshold mode.
        self.budget = torch.zeros(max_seqs)
        self.recent = torch.zeros(max_seqs, dtype=torch.int64)
        self.pool = torch.ones(max_seqs, dtype=torch.int64)
        # Queries at or past this position count towards scores.
        self.score_start = torch.zeros(max_seqs, dtype=torch.int64)
        # Decisions start once this many tokens are seen (the prompt at admission), then
        # come every ``interval`` tokens.
        self.decide_from = torch.zeros(max_seqs, dtype=torch.int64)
        self.interval = torch.ones(max_seqs, dtype=torch.int64)

    def assign(self, slot: int, policy: KVPolicy | None, prompt_len: int) -> None:
        """Give ``slot`` the parameters of ``policy`` for a prompt of ``prompt_len`` tokens."""
        tiered = policy is not None and policy.tiered
        self.tiered[slot] = tiered
        if not tiered:
            return
        assert policy is not None
        self.alpha_high[slot] = policy.alpha_high
        self.alpha_low[slot] = policy.alpha_low
        self.budget[slot] = policy.budget or 0.0
        self.recent[slot] = policy.recent
        self.pool[slot] = policy.pool
        self.score_start[slot] = prompt_len - policy.score_window
        self.decide_from[slot] = prompt_len
        self.interval[slot] = policy.interval

    def deciding(self, slots: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Which of ``slots`` [B] decide now, having seen ``seen`` [B] tokens."""
        since = seen - self.decide_from[slots]
        return (since >= 0) & (since % self.interval[slots] == 0)

    def received(
        self,
        probs: torch.Tensor,
        slots: torch.Tensor,
        query_pos: torch.Tensor,
        pool: int | None = None,
        summed: bool = False,
    ) -> torch.Tensor:
        """Attention each token received from the counting queries: ``[B, H, T]``.

        ``probs`` is ``[B, H, G, nq, T]`` (G query heads per KV head), ``query_pos`` ``[B, nq]``;
        ``pool`` the slots' pooling kernel when the caller knows it on the host. ``summed``:
        ``probs`` is ``[B, H, G, 1, T]``, already summed over the queries at ``query_pos``,
        all of which count (``partial.flash_scores``).
        """
        if not summed:
            counts = query_pos >= self.score_start[slots][:, None]
            probs = probs * counts[:, None, None, :, None]
        total = probs.sum(3).amax(2)
        if query_pos.shape[1] == 1:
            return total  # a decode step: never pooled
        kernel = int(self.pool[slots].max()) if pool is None else pool
        if kernel == 1:
            return total
        # A prefill chunk (tiered chunks run one request at a time, whose tokens are still in
        # position order): a token also gets the largest score among its kernel // 2
        # neighbours on each side, so the tokens around an attended one (the value after a
        # key, the rest of a name) survive with it, as SnapKV's pooling does.
        flat = total.reshape(-1, 1, total.shape[-1])
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
        return pooled.view_as(total)

    def decide(
        self,
        slots: torch.Tensor,
        seen: torch.Tensor,
        score: torch.Tensor,
        pos: torch.Tensor,
        valid: torch.Tensor,
        low: torch.Tensor,
        costs: TierCosts,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tier of every token after this step: masks ``(to_high, to_low)``, ``[B, H, T]``.

        ``seen`` [B] is N, the tokens each request has seen; ``low`` [T] marks low-tier columns.
        Tokens in neither mask are pruned. Only requests that decide now (``deciding``) are
        passed.
        """
        n = seen[:, None, None]
        arrived = torch.maximum(self.score_start[slots][:, None, None], pos)
        mean = score / (n - arrived).clamp(min=1)
        recent = pos >= n - self.recent[slots][:, None, None]
        wants_high = ~low & (recent | (mean * n >= self.alpha_high[slots][:, None, None]))
        to_high = valid & wants_high
        to_low = valid & ~wants_high & (mean * n >= self.alpha_low[slots][:, None, None])
        budget = self.budget[slots]
        if bool((budget > 0).any()):
            kept = _within_budget(mean, recent & ~low, wants_high, valid, seen, budget, costs)
            in_budget = (budget > 0)[:, None, None]
            to_high = torch.where(in_budget, kept & wants_high, to_high)
            to_low = torch.where(in_budget, kept & ~wants_high, to_low)
        return to_high, to_low


def _within_budget(
    mean: torch.Tensor,
    protected: torch.Tensor,
    wants_high: torch.Tensor,
    valid: torch.Tensor,
    seen: torch.Tensor,
    budget: torch.Tensor,
    costs: TierCosts,
) -> torch.Tensor:
    """Tokens kept by budget mode: the best-ranked ones whose page costs fit the head's pages."""
    pages = torch.floor(budget * seen / costs.fp16_per_page)[:, None, None] - costs.ring_pages
    cost = torch.where(wants_high, 1.0 / costs.high_per_page, 1.0 / costs.low_per_page)
    cost = torch.where(valid, cost, 0.0)
    rank_key = torch.where(protected, torch.inf, mean)
    rank_key = torch.where(valid, rank_key, -torch.inf)
    order = rank_key.argsort(dim=-1, descending=True, stable=True)
    spent = cost.gather(-1, order).cumsum(-1)
    # One page of the limit is left for the two partly filled last pages of the tiers.
    fits = torch.empty_like(valid).scatter_(-1, order, spent <= pages - 1)
    return valid & (fits | protected)
