"""StoreAccounting: what tokens and requests cost in pages and bytes, and what slots hold.

Admission and budgets ask the store before they take pages: tokens per page of a format
(``tokens_per_page``, ``costs``), pages a request needs (``pages_for``, ``pages_to_admit``,
``pages_to_grow``) and bytes per token (``bytes_per_token``, ``residual_bytes``). Reports ask
what slots hold (``tier_usage``, ``bytes_in_use``, ``tokens_per_head``). Every byte count
includes the page-table entry of each page.
"""

from __future__ import annotations

import torch

from tierkv.kv.formats.quant import FULL, KVFormat
from tierkv.kv.policy.spec import KVPolicy
from tierkv.kv.policy.tiers import TierCosts
from tierkv.kv.store.tables import HIGH, LOW, RESIDUAL, PageTables


class StoreAccounting(PageTables):
    """Page and byte costs of formats and requests, and usage of slots (a mixin of
    ``KVStore``)."""

    # -- capacity ----------------------------------------------------------------------------------

    def costs(self, slot: int) -> TierCosts:
        """Tokens per page of a tiered slot's tiers and of fp16 (for budget decisions)."""
        per_page = self._tokens_per_page[self.slot_format[slot]]
        ring_pages = int(self.ring[slot]) // self.layouts[0].tokens_per_page
        return TierCosts(
            int(per_page[HIGH]), int(per_page[LOW]), self.fp16_tokens_per_page, ring_pages
        )

    def tokens_per_page(self, fmt: KVFormat) -> int:
        """Tokens of one (layer, head) a page holds in ``fmt``."""
        return self.layout(fmt).tokens_per_page

    def pages_for(self, num_tokens: int, fmt: KVFormat = FULL) -> int:
        """Pages one request of ``num_tokens`` tokens in ``fmt`` needs across layers and heads."""
        per_head = -(-num_tokens // self.tokens_per_page(fmt))
        return self.num_layers * self.num_kv_heads * per_head

    def pages_to_admit(self, num_tokens: int, policy: KVPolicy) -> int:
        """Pages admission reserves: the prompt at high precision, plus one low page per head
        (tiered) and the residual ring (with a residual window)."""
        per_head = int(policy.tiered) + self._ring_pages(policy.residual, policy.high)
        return (
            self.pages_for(num_tokens, policy.high) + self.num_layers * self.num_kv_heads * per_head
        )

    def residual_bytes(self, policy: KVPolicy) -> int:
        """Bytes a request's residual ring costs across layers and heads (0 without one)."""
        pages = self._ring_pages(policy.residual, policy.high)
        per_page = self.pool.page_bytes + self.tables.element_size()
        return self.num_layers * self.num_kv_heads * pages * per_page

    def pages_to_grow(self, slots: int | torch.Tensor, num_tokens: int | torch.Tensor) -> int:
        """Pages the slots (one or a tensor of them) still need to hold ``num_tokens`` tokens
        each (seen ones included), in total."""
        slots = torch.as_tensor(slots).reshape(-1)
        return int(self._need(slots, torch.as_tensor(num_tokens).reshape(-1)).sum())

    # -- usage -------------------------------------------------------------------------------------

    def bytes_per_token(self, fmt: KVFormat = FULL) -> float:
        """Analytic bytes one token in ``fmt`` costs across layers and heads.

        ``num_layers * num_kv_heads * (page_bytes + page-table entry) / tokens_per_page``: every
        per-token field (codes, scales, zeros, score, position) and the page's waste included.
        """
        per_page = self.pool.page_bytes + self.tables.element_size()
        return self.num_layers * self.num_kv_heads * per_page / self.tokens_per_page(fmt)

    def tokens_per_head(self, slots: torch.Tensor) -> torch.Tensor:
        """Tokens held by every (layer, head) of ``slots``, both tiers, flattened."""
        return self.num_tokens[slots].reshape(-1)

    def tier_usage(self, slots: torch.Tensor) -> dict[str, tuple[int, int]]:
        """``tier -> (tokens, pages)`` held by ``slots`` over all layers and heads; the
        ``residual`` ring's tokens are uncompressed copies of the newest high-tier ones."""
        usage = {
            name: (int(self.count[slots, ..., tier].sum()), int(self.held[slots, ..., tier].sum()))
            for name, tier in (("high", HIGH), ("low", LOW))
        }
        ring_tokens = torch.minimum(self.seen[slots], self.ring[slots, None]).sum()
        ring_pages = int(self.held[slots, ..., RESIDUAL].sum())
        usage["residual"] = (int(ring_tokens) * self.num_kv_heads, ring_pages)
        return usage

    def bytes_in_use(self, slots: torch.Tensor | None = None) -> int:
        """Bytes held by the pages of ``slots`` and their table entries. For all slots (the
        default) a page shared through the prefix cache counts once, and pages only the
        cache holds not at all; for given slots each counts its shared pages in full."""
        held = self.held if slots is None else self.held[slots]
        entries = int(held.sum())
        if slots is None:
            # Pages some request holds, each once (without a prefix cache: ``entries``).
            used = self.pool.num_pages - self.pool.num_available
            return used * self.pool.page_bytes + entries * self.tables.element_size()
        return entries * (self.pool.page_bytes + self.tables.element_size())
