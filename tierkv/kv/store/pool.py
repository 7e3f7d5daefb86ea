"""PagePool: one arena of fixed-size pages shared by every layer, head, request and precision.

Allocation and freeing are batched: ``alloc(n)`` pops ``n`` page ids off a free stack held in a
tensor and ``free(ids)`` pushes them back, so the per-step path never loops over pages in
Python. A page is raw bytes; a ``PageLayout`` says how one precision format packs its tokens'
fields (codes, scales, positions...) into those bytes, and ``PagePool.fields`` returns typed
views of the arena for that layout.
"""

from __future__ import annotations

import torch

from tierkv.kv.formats.layout import FIELD_ALIGN, PageLayout


class PagePool:
    """A fixed arena of ``num_pages`` pages of ``page_bytes`` each, with a batched free list."""

    def __init__(self, num_pages: int, page_bytes: int) -> None:
        if num_pages < 1:
            raise ValueError(f"a pool needs at least one page, got {num_pages}")
        if page_bytes % FIELD_ALIGN:
            raise ValueError(f"page_bytes must be a multiple of {FIELD_ALIGN}, got {page_bytes}")
        self.num_pages = num_pages
        self.page_bytes = page_bytes
        self.arena = torch.zeros(num_pages, page_bytes, dtype=torch.uint8)
        # A stack of free page ids: the top `num_free` entries are free. Freed pages go on top,
        # so they are the first reused.
        self._free = torch.arange(num_pages - 1, -1, -1, dtype=torch.int64)
        self.num_free = num_pages

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def alloc(self, n: int) -> torch.Tensor:
        """Take ``n`` pages; returns their ids (int64). Raises ``MemoryError`` if short."""
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV pages, only {self.num_free} free")
        self.num_free -= n
        return self._free[self.num_free : self.num_free + n].flip(0).clone()

    def free(self, pages: torch.Tensor) -> None:
        """Give pages back. Every id must be currently allocated (checked only in count)."""
        n = pages.numel()
        if self.num_free + n > self.num_pages:
            raise RuntimeError("freeing more pages than are allocated: double free")
        self._free[self.num_free : self.num_free + n] = pages.reshape(-1).flip(0)
        self.num_free += n

    def fields(self, layout: PageLayout) -> dict[str, torch.Tensor]:
        """Typed views of the arena: ``name -> [num_pages, tokens_per_page, numel]``."""
        if layout.page_bytes != self.page_bytes:
            raise ValueError("layout and pool disagree on the page size")
        tokens = layout.tokens_per_page
        views = {}
        for f in layout.fields:
            start = layout.offsets()[f.name]
            raw = self.arena[:, start : start + tokens * f.token_bytes]
            views[f.name] = raw.view(f.dtype).unflatten(1, (tokens, f.numel))
        return views
