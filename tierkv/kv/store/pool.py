"""PagePool: one arena of fixed-size pages shared by every layer, head, request and precision.

Allocation and freeing are batched: ``alloc(n)`` pops ``n`` page ids off a free stack held in a
tensor and ``free(ids)`` pushes them back, so the per-step path never loops over pages in
Python. Pages are reference-counted: the prefix cache and every request whose page table holds a
shared page each hold one reference (``share``), and ``free`` returns a page to the stack only
when its last reference goes. Pages only the prefix cache holds are *reclaimable*: an ``alloc``
that finds too few free pages asks the ``reclaimer`` (the cache) to evict some first.

A page is raw bytes; a ``PageLayout`` says how one precision format packs its tokens'
fields (codes, scales, positions...) into those bytes, and ``PagePool.fields`` returns typed
views of the arena for that layout.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tierkv.kv.formats.layout import FIELD_ALIGN, PageLayout


class Reclaimer(Protocol):
    """Something holding pages it can give back on demand (the prefix cache)."""

    @property
    def reclaimable_pages(self) -> int:
        """Pages that evicting everything evictable would return to the pool."""
        ...

    def reclaim(self, num_pages: int) -> None:
        """Evict until at least ``num_pages`` more pages are free (or nothing is left)."""
        ...


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
        # References held on each page: 0 on the free stack, 1 for a private page.
        self.refs = torch.zeros(num_pages, dtype=torch.int32)
        self.reclaimer: Reclaimer | None = None

    @property
    def num_used(self) -> int:
        """Pages off the free stack (reclaimable cached pages included)."""
        return self.num_pages - self.num_free

    @property
    def num_available(self) -> int:
        """Pages an ``alloc`` can hand out: the free ones and the reclaimable cached ones."""
        extra = self.reclaimer.reclaimable_pages if self.reclaimer is not None else 0
        return self.num_free + extra

    def alloc(self, n: int) -> torch.Tensor:
        """Take ``n`` pages; returns their ids (int64). Evicts reclaimable cached pages when
        the free ones are short; raises ``MemoryError`` if still short."""
        if n > self.num_free and self.reclaimer is not None:
            self.reclaimer.reclaim(n - self.num_free)
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV pages, only {self.num_free} free")
        self.num_free -= n
        pages = self._free[self.num_free : self.num_free + n].flip(0).clone()
        self.refs[pages] = 1
        return pages

    def share(self, pages: torch.Tensor) -> None:
        """Take one more reference on each of ``pages`` (allocated ones)."""
        self.refs.index_add_(
            0, pages.reshape(-1), torch.ones_like(pages.reshape(-1), dtype=torch.int32)
        )

    def free(self, pages: torch.Tensor) -> None:
        """Drop one reference on each of ``pages``; pages left without any go back on the free
        stack. Raises on a page that holds no reference (a double free)."""
        pages = pages.reshape(-1)
        if pages.numel() == 0:
            return
        self.refs.index_add_(0, pages, torch.full_like(pages, -1, dtype=torch.int32))
        left = self.refs[pages]
        if bool((left < 0).any()):
            self.refs.index_add_(0, pages, torch.ones_like(pages, dtype=torch.int32))
            raise RuntimeError("freeing a KV page that holds no reference: double free")
        released = pages[left == 0]
        if released.numel() > 1:
            # A page listed twice in one call reaches zero once.
            released = released.unique()
        n = released.numel()
        self._free[self.num_free : self.num_free + n] = released.flip(0)
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
