"""KVStore: per (request slot, layer, KV head) page tables over the shared PagePool.

Every (slot, layer, head) owns its own list of pages, so heads can later hold different numbers
of tokens. Growing and freeing are batched over all slots, layers and heads at once: the pages
each head needs are counted, one ``PagePool.alloc`` hands them out, and a prefix sum over the
counts tells each head which slice of the allocation is its own.
"""

from __future__ import annotations

import torch

from tierkv.kv.pool import PageLayout, PagePool


class KVStore:
    """Page tables and token counts for up to ``max_seqs`` requests of ``max_model_len`` tokens."""

    def __init__(
        self,
        pool: PagePool,
        layout: PageLayout,
        num_layers: int,
        num_kv_heads: int,
        max_seqs: int,
        max_model_len: int,
    ) -> None:
        self.pool = pool
        self.layout = layout
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.tokens_per_page = layout.tokens_per_page
        self.max_pages = -(-max_model_len // self.tokens_per_page)
        shape = (max_seqs, num_layers, num_kv_heads)
        self.page_table = torch.zeros(*shape, self.max_pages, dtype=torch.int64)
        self.num_pages = torch.zeros(shape, dtype=torch.int64)
        self.fields = pool.fields(layout)
        self._free_slots = list(range(max_seqs - 1, -1, -1))

    # -- slots -------------------------------------------------------------------------------

    def acquire_slot(self) -> int:
        """Take a free request slot (its tables are empty)."""
        if not self._free_slots:
            raise RuntimeError("no free request slot: max_num_seqs requests are already held")
        return self._free_slots.pop()

    def release_slot(self, slot: int) -> None:
        """Free every page the slot holds and return the slot."""
        held = self.num_pages[slot]
        mask = torch.arange(self.max_pages) < held[..., None]
        self.pool.free(self.page_table[slot][mask])
        self.num_pages[slot] = 0
        self._free_slots.append(slot)

    # -- capacity ------------------------------------------------------------------------------

    def pages_for(self, num_tokens: int) -> int:
        """Pages one request of ``num_tokens`` tokens needs across all layers and heads."""
        return self.num_layers * self.num_kv_heads * -(-num_tokens // self.tokens_per_page)

    def pages_to_grow(self, slot: int, num_tokens: int) -> int:
        """Pages the slot still needs to hold ``num_tokens`` tokens."""
        want = -(-num_tokens // self.tokens_per_page)
        return int((want - self.num_pages[slot]).clamp(min=0).sum())

    def reserve(self, slots: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """Grow each slot in ``slots`` to hold ``num_tokens`` tokens, in one allocation."""
        want = -(-num_tokens // self.tokens_per_page)
        need = (want[:, None, None] - self.num_pages[slots]).clamp(min=0).reshape(-1)
        total = int(need.sum())
        if total == 0:
            return
        pages = self.pool.alloc(total)
        heads = self.num_layers * self.num_kv_heads
        rows = (slots[:, None] * heads + torch.arange(heads)).reshape(-1)
        owner = torch.repeat_interleave(torch.arange(need.numel()), need)
        start = torch.cumsum(need, 0) - need
        held = self.num_pages.view(-1)
        column = held[rows[owner]] + torch.arange(total) - start[owner]
        self.page_table.view(-1, self.max_pages)[rows[owner], column] = pages
        held[rows] += need

    # -- tokens --------------------------------------------------------------------------------

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        index: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Store token ``index`` of each slot: ``k``/``v`` are [N, heads, head_dim]."""
        heads = torch.arange(self.num_kv_heads)
        pages = self.page_table[
            slots[:, None], layer, heads, (index // self.tokens_per_page)[:, None]
        ]
        offset = (index % self.tokens_per_page)[:, None]
        self.fields["k"][pages, offset] = k.to(self.fields["k"].dtype)
        self.fields["v"][pages, offset] = v.to(self.fields["v"].dtype)

    def gather(
        self, layer: int, slots: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``length`` tokens: two [B, heads, length', head_dim].

        ``length'`` is ``length`` rounded up to whole pages; entries past a slot's own count are
        garbage the caller masks.
        """
        num = -(-length // self.tokens_per_page)
        pages = self.page_table[slots, layer, :, :num]
        b, h = pages.shape[:2]
        # index_select on the flat page list is several times faster than advanced indexing
        # of the strided arena view.
        flat = pages.reshape(-1)
        k = self.fields["k"].index_select(0, flat).view(b, h, num * self.tokens_per_page, -1)
        v = self.fields["v"].index_select(0, flat).view(b, h, num * self.tokens_per_page, -1)
        return k, v

    # -- accounting ----------------------------------------------------------------------------

    def bytes_per_token(self) -> float:
        """Analytic bytes one token costs across layers and heads, page-table entry included."""
        per_page = self.layout.page_bytes + self.page_table.element_size()
        return self.num_layers * self.num_kv_heads * per_page / self.tokens_per_page

    def bytes_in_use(self) -> int:
        """Bytes held by all slots' pages and their page-table entries."""
        pages = int(self.num_pages.sum())
        return pages * (self.layout.page_bytes + self.page_table.element_size())
