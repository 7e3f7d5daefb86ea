"""KVStore: per (request slot, layer, KV head) page tables over the shared PagePool.

Every (slot, layer, head) owns its own list of pages, so heads can later hold different numbers
of tokens. Each slot stores its tokens in one ``KVFormat`` (its request's policy), so requests
under different precisions share one batch: every format has its own typed views of the same
arena (``PagePool.fields``), and the page size is the same for all of them, so a page freed by
one format is reused by any other.

Growing and freeing are batched over all slots, layers and heads at once: the pages each head
needs are counted, one ``PagePool.alloc`` hands them out, and a prefix sum over the counts tells
each head which slice of the allocation is its own.
"""

from __future__ import annotations

import torch

from tierkv.kv.pool import PageLayout, PagePool
from tierkv.kv.quant import FULL, KVFormat

# Per-token fields that attention does not read: the policy's score and the token's position.
_METADATA = ("score", "pos")


class KVStore:
    """Page tables for up to ``max_seqs`` requests of ``max_model_len`` tokens, any format."""

    def __init__(
        self,
        pool: PagePool,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        max_seqs: int,
        max_model_len: int,
    ) -> None:
        self.pool = pool
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.max_model_len = max_model_len
        # Formats used so far; a slot's format is an index into this list.
        self._formats: list[KVFormat] = []
        self._layouts: list[PageLayout] = []
        self._views: list[dict[str, torch.Tensor]] = []
        self._tokens_per_page = torch.zeros(0, dtype=torch.int64)
        # The uncompressed format has the fewest tokens per page of the usual formats, so it
        # sizes the page tables; a format needing more columns is refused by `register`.
        full_layout = FULL.layout(head_dim, dtype, pool.page_bytes)
        self.max_pages = -(-max_model_len // full_layout.tokens_per_page)
        shape = (max_seqs, num_layers, num_kv_heads)
        self.page_table = torch.zeros(*shape, self.max_pages, dtype=torch.int64)
        self.num_pages = torch.zeros(shape, dtype=torch.int64)
        # Tokens each (slot, layer, head) holds: equal across heads until a policy prunes.
        self.num_tokens = torch.zeros(shape, dtype=torch.int64)
        self.slot_format = torch.zeros(max_seqs, dtype=torch.int64)
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self.register(FULL)

    # -- formats -------------------------------------------------------------------------------

    def register(self, fmt: KVFormat) -> int:
        """Make ``fmt`` storable (idempotent); returns its index.

        Raises ``ValueError`` when the format does not fit this model (its group size does not
        divide the head dim, its codes do not fill whole bytes, or too few tokens fit a page).
        """
        if fmt.quantized and fmt.group_size > self.head_dim:
            # Every group larger than the head is one group per row: one format, not many.
            fmt = fmt.with_group_size(self.head_dim)
        if fmt in self._formats:
            return self._formats.index(fmt)
        layout = fmt.layout(self.head_dim, self.dtype, self.pool.page_bytes)
        if -(-self.max_model_len // layout.tokens_per_page) > self.max_pages:
            raise ValueError(
                f"format {fmt.name} (group size {fmt.group_size}) holds only "
                f"{layout.tokens_per_page} tokens per {self.pool.page_bytes}-byte page, fewer "
                "than the uncompressed format"
            )
        self._formats.append(fmt)
        self._layouts.append(layout)
        self._views.append(self.pool.fields(layout))
        self._tokens_per_page = torch.tensor([lay.tokens_per_page for lay in self._layouts])
        return len(self._formats) - 1

    def layout(self, fmt: KVFormat) -> PageLayout:
        """The page layout of ``fmt`` in this store."""
        return self._layouts[self.register(fmt)]

    def format_of(self, slot: int) -> KVFormat:
        """The format the slot stores its tokens in."""
        return self._formats[int(self.slot_format[slot])]

    # -- slots -------------------------------------------------------------------------------

    def acquire_slot(self, fmt: KVFormat = FULL) -> int:
        """Take a free request slot (its tables are empty) that stores tokens in ``fmt``."""
        if not self._free_slots:
            raise RuntimeError("no free request slot: max_num_seqs requests are already held")
        index = self.register(fmt)
        slot = self._free_slots.pop()
        self.slot_format[slot] = index
        return slot

    def release_slot(self, slot: int) -> None:
        """Free every page the slot holds and return the slot."""
        held = self.num_pages[slot]
        mask = torch.arange(self.max_pages) < held[..., None]
        self.pool.free(self.page_table[slot][mask])
        self.num_pages[slot] = 0
        self.num_tokens[slot] = 0
        self._free_slots.append(slot)

    # -- capacity ------------------------------------------------------------------------------

    def tokens_per_page(self, fmt: KVFormat) -> int:
        """Tokens of one (layer, head) a page holds in ``fmt``."""
        return self.layout(fmt).tokens_per_page

    def pages_for(self, num_tokens: int, fmt: KVFormat = FULL) -> int:
        """Pages one request of ``num_tokens`` tokens in ``fmt`` needs across layers and heads."""
        per_head = -(-num_tokens // self.tokens_per_page(fmt))
        return self.num_layers * self.num_kv_heads * per_head

    def pages_to_grow(self, slot: int, num_tokens: int) -> int:
        """Pages the slot still needs to hold ``num_tokens`` tokens."""
        want = -(-num_tokens // int(self._tokens_per_page[self.slot_format[slot]]))
        return int((want - self.num_pages[slot]).clamp(min=0).sum())

    def reserve(self, slots: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """Grow each slot in ``slots`` to hold ``num_tokens`` tokens, in one allocation.

        New pages are zeroed: the unwritten tail of a page then decodes to finite values in any
        format, whatever format last used the page (attention masks those values, but a NaN
        from stale bytes would survive the mask).
        """
        per_page = self._tokens_per_page[self.slot_format[slots]]
        want = -(-num_tokens // per_page)
        need = (want[:, None, None] - self.num_pages[slots]).clamp(min=0).reshape(-1)
        total = int(need.sum())
        if total == 0:
            return
        pages = self.pool.alloc(total)
        self.pool.arena.index_fill_(0, pages, 0)
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
        """Store token ``index`` of each slot: ``k``/``v`` are [N, heads, head_dim].

        Each slot's tokens are encoded in its own format (one vectorised write per format).
        """
        for f, rows in self._by_format(slots):
            if rows is None:
                self._write(f, layer, slots, index, k, v)
            else:
                self._write(f, layer, slots[rows], index[rows], k[rows], v[rows])
        added = torch.bincount(slots, minlength=self.num_tokens.shape[0])
        self.num_tokens[:, layer] += added[:, None]

    def gather(
        self, layer: int, slots: torch.Tensor, length: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``length`` tokens, decoded to ``dtype``.

        Returns two [B, heads, length', head_dim] with ``length' >= length``; entries past a
        slot's own count are finite garbage the caller masks.
        """
        parts = self._by_format(slots)
        if len(parts) == 1:
            return self._gather(parts[0][0], layer, slots, length, dtype)
        shape = (slots.numel(), self.num_kv_heads, length, self.head_dim)
        keys = torch.empty(shape, dtype=dtype)
        values = torch.empty(shape, dtype=dtype)
        for f, rows in parts:
            k, v = self._gather(f, layer, slots[rows], length, dtype)
            keys[rows], values[rows] = k[:, :, :length], v[:, :, :length]
        return keys, values

    def _by_format(self, slots: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        """The formats of ``slots`` with the rows of each; rows is None when all share one."""
        formats = self.slot_format[slots]
        present = formats.unique()
        if present.numel() == 1:
            return [(int(present), None)]
        return [(int(f), torch.nonzero(formats == f).flatten()) for f in present]

    def _write(
        self,
        f: int,
        layer: int,
        slots: torch.Tensor,
        index: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        per_page = self._layouts[f].tokens_per_page
        heads = torch.arange(self.num_kv_heads)
        pages = self.page_table[slots[:, None], layer, heads, (index // per_page)[:, None]]
        offset = (index % per_page)[:, None]
        views = self._views[f]
        encoded = self._formats[f].encode(k, v, positions=index, dtype=self.dtype)
        for name, value in encoded.items():
            views[name][pages, offset] = value

    def _gather(
        self, f: int, layer: int, slots: torch.Tensor, length: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_page = self._layouts[f].tokens_per_page
        num = -(-length // per_page)
        pages = self.page_table[slots, layer, :, :num]
        b, h = pages.shape[:2]
        # Columns past a head's own pages hold stale ids, maybe of pages now holding another
        # format's bytes (which could read as NaN here): point them at the head's first page.
        valid = torch.arange(num) < self.num_pages[slots, layer][..., None]
        pages = torch.where(valid, pages, pages[..., :1])
        # index_select on the flat page list is several times faster than advanced indexing
        # of the strided arena view.
        flat = pages.reshape(-1)
        fields = {
            name: view.index_select(0, flat).view(b, h, num * per_page, -1)
            for name, view in self._views[f].items()
            if name not in _METADATA
        }
        return self._formats[f].decode(fields, dtype)

    # -- accounting ----------------------------------------------------------------------------

    def bytes_per_token(self, fmt: KVFormat = FULL) -> float:
        """Analytic bytes one token in ``fmt`` costs across layers and heads.

        ``num_layers * num_kv_heads * (page_bytes + page-table entry) / tokens_per_page``: every
        per-token field (codes, scales, zeros, score, position) and the page's waste included.
        """
        per_page = self.pool.page_bytes + self.page_table.element_size()
        return self.num_layers * self.num_kv_heads * per_page / self.tokens_per_page(fmt)

    def tokens_per_head(self, slots: torch.Tensor) -> torch.Tensor:
        """Tokens held by every (layer, head) of ``slots``, flattened."""
        return self.num_tokens[slots].reshape(-1)

    def bytes_in_use(self) -> int:
        """Bytes held by all slots' pages and their page-table entries."""
        pages = int(self.num_pages.sum())
        return pages * (self.pool.page_bytes + self.page_table.element_size())
