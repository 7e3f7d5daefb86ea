"""PagePool: one arena of fixed-size pages shared by every layer, head, request and precision.

Allocation and freeing are batched: ``alloc(n)`` pops ``n`` page ids off a free stack held in a
tensor and ``free(ids)`` pushes them back, so the per-step path never loops over pages in
Python. A page is raw bytes; a ``PageLayout`` says how one precision format packs its tokens'
fields (codes, scales, positions...) into those bytes, and ``PagePool.fields`` returns typed
views of the arena for that layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

# Each field of a page starts on this boundary so typed views stay aligned for every dtype.
_FIELD_ALIGN = 16


@dataclass(frozen=True)
class PageField:
    """One per-token field of a page: ``numel`` elements of ``dtype`` for every token."""

    name: str
    dtype: torch.dtype
    numel: int

    @property
    def token_bytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class PageLayout:
    """How one page format lays out ``tokens_per_page`` tokens inside ``page_bytes``.

    Fields are stored structure-of-arrays (all tokens' keys, then all values...), each field
    aligned, which is what vectorised gathers want.
    """

    fields: tuple[PageField, ...]
    page_bytes: int

    # Cached: the per-step paths ask for these many times per layer, and a layout never changes.
    @cached_property
    def token_bytes(self) -> int:
        """Bytes one token occupies in a page, all its fields together."""
        return sum(f.token_bytes for f in self.fields)

    @cached_property
    def tokens_per_page(self) -> int:
        tokens = self.page_bytes // self.token_bytes
        while tokens > 0 and self._span(tokens) > self.page_bytes:
            tokens -= 1
        if tokens == 0:
            raise ValueError(
                f"page of {self.page_bytes} bytes cannot hold one token of {self.token_bytes} bytes"
            )
        return tokens

    @property
    def waste_bytes(self) -> int:
        """Bytes of a full page that hold no token data (alignment and the tail)."""
        return self.page_bytes - self.tokens_per_page * self.token_bytes

    def offsets(self) -> dict[str, int]:
        """Byte offset of each field inside a page."""
        return dict(self._offsets)

    @cached_property
    def _offsets(self) -> dict[str, int]:
        out, offset, tokens = {}, 0, self.tokens_per_page
        for f in self.fields:
            out[f.name] = offset
            offset = _align(offset + tokens * f.token_bytes)
        return out

    def _span(self, tokens: int) -> int:
        offset = 0
        for f in self.fields:
            offset = _align(offset + tokens * f.token_bytes)
        return offset


def _align(n: int) -> int:
    return -(-n // _FIELD_ALIGN) * _FIELD_ALIGN


class PagePool:
    """A fixed arena of ``num_pages`` pages of ``page_bytes`` each, with a batched free list."""

    def __init__(self, num_pages: int, page_bytes: int) -> None:
        if num_pages < 1:
            raise ValueError(f"a pool needs at least one page, got {num_pages}")
        if page_bytes % _FIELD_ALIGN:
            raise ValueError(f"page_bytes must be a multiple of {_FIELD_ALIGN}, got {page_bytes}")
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
