"""PageLayout: how one format packs its tokens' per-token fields into a page's raw bytes."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

# Each field of a page starts on this boundary so typed views stay aligned for every dtype.
FIELD_ALIGN = 16


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
    return -(-n // FIELD_ALIGN) * FIELD_ALIGN
