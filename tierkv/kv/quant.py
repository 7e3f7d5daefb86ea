"""KV storage formats: how one token of one KV head is stored in a page.

Each format is one entry of ``FORMATS``. The uncompressed format keeps keys and values in the
model's compute dtype; quantized formats (group-wise asymmetric, packed codes) plug in here as
further entries with their own page fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierkv.kv.pool import PageField, PageLayout


@dataclass(frozen=True)
class KVFormat:
    """Precision of one stored token: ``key_bits``/``value_bits`` of 16 mean "uncompressed"."""

    name: str
    key_bits: int
    value_bits: int

    def layout(self, head_dim: int, dtype: torch.dtype, page_bytes: int) -> PageLayout:
        """The page layout of this format for a head dim and compute dtype."""
        if self.key_bits != 16 or self.value_bits != 16:
            raise NotImplementedError(f"format {self.name} is not implemented yet")
        fields = (PageField("k", dtype, head_dim), PageField("v", dtype, head_dim))
        return PageLayout(fields=fields, page_bytes=page_bytes)


FULL = KVFormat("full", 16, 16)
FORMATS: dict[str, KVFormat] = {FULL.name: FULL}


def default_page_bytes(head_dim: int) -> int:
    """Page size: 16 uncompressed tokens at 2 bytes per element (64 * head_dim bytes).

    One page holds one (request, layer, KV head) slice, so a small page keeps the partly
    filled last page of each head cheap: at head dim 64 a page is 4 KiB, 16 bf16 tokens or
    8 float32 tokens, with no waste for the uncompressed format.
    """
    return 64 * head_dim
