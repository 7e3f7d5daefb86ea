"""TokenIO: the store's byte I/O, between a tier's pages and tensors.

Reads hand attention a tier's pages: ``gather`` decodes the high tier densely, ``read_tier``
returns any tier's raw fields (``TierRead``) and ``tier_pages`` its page ids. Decisions move
single tokens with ``take``/``put``/``put_tokens`` and store scores with ``write_scores``. Every
encode of new tokens, the step's own (``KVStore.write``) and a decision's, goes through
``_encode_into``: the writer a backend has for the format (``writer_for``), else
``KVFormat.encode``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tierkv.kv.store.tables import HIGH, PageTables
from tierkv.kv.store.views import TierRead

# Per-token fields that attention does not read: the policy's score and the token's position.
_METADATA = ("score", "pos")


class TokenIO(PageTables):
    """Reads and writes of the bytes of tokens in the store's tiers (a mixin of ``KVStore``)."""

    # Format index -> what encodes (quantizes, or copies uncompressed rows) and writes new
    # tokens of that format in one call (``KVBackend.write``; set by ``PagedAttention`` from
    # its chain), or None: then ``KVFormat.encode`` and one store per field. A function, not a
    # table: formats register as requests arrive. A class default: a store starts without.
    writer_for: Callable[[int], Callable[..., None] | None] | None = None

    def gather(
        self,
        layer: int,
        slots: torch.Tensor,
        length: int,
        dtype: torch.dtype,
        f: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``length`` high-tier tokens, decoded to ``dtype``.

        Returns two [B, heads, length', head_dim] with ``length' >= length``; entries past a
        slot's own count are finite garbage the caller masks. ``f``: the format index all
        ``slots`` share, when the caller knows it (else it is read from the tables).
        """
        parts = self.by_format(slots) if f is None else [(f, None)]
        if len(parts) == 1:
            return self._gather(parts[0][0], layer, slots, length, dtype)
        shape = (slots.numel(), self.num_kv_heads, length, self.head_dim)
        keys = torch.empty(shape, dtype=dtype)
        values = torch.empty(shape, dtype=dtype)
        for f, rows in parts:
            k, v = self._gather(f, layer, slots[rows], length, dtype)
            keys[rows], values[rows] = k[:, :, :length], v[:, :, :length]
        return keys, values

    def tier_pages(
        self,
        layer: int | None,
        slots: torch.Tensor,
        tier: int,
        host: tuple[int, int] | None = None,
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """One tier of ``slots`` at ``layer`` (every layer when None, as ``read_tier``): its
        format index, the tokens each head holds ``[B, H]`` and the page ids ``[B, H, P]`` of
        the pages covering the largest count (columns past a head's own pages are stale).
        ``host`` is ``(format index, P)`` when the caller worked them out on the host."""
        count = self._units(self.count, layer)[slots, :, tier]
        if host is not None:
            f, num = host
        else:
            f = int(self.slot_format[slots[0], tier])
            per_page = self.layouts[f].tokens_per_page
            num = -(-int(count.max()) // per_page) if count.numel() else 0
        return f, count, self._units(self.tables, layer)[slots, :, tier, :num]

    def read_tier(
        self,
        layer: int | None,
        slots: torch.Tensor,
        tier: int,
        names: tuple[str, ...] | None = None,
        host: tuple[int, int] | None = None,
    ) -> TierRead:
        """The fields ``names`` (all by default) of every token one tier of ``slots`` holds at
        ``layer``, or at every layer when None (its heads then index layer * H + head).

        All ``slots`` must store that tier in the same format. ``host``: as ``tier_pages``.
        """
        f, count, pages = self.tier_pages(layer, slots, tier, host)
        per_page, num = self.layouts[f].tokens_per_page, pages.shape[-1]
        pages = pages.reshape(-1)
        b, h = count.shape
        fields = {
            name: view.index_select(0, pages).view(b, h, num * per_page, view.shape[-1])
            for name, view in self._views[f].items()
            if names is None or name in names
        }
        return TierRead(fields=fields, count=count)

    def take(
        self,
        layer: int | None,
        tier: int,
        slots: torch.Tensor,
        heads: torch.Tensor,
        index: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Every field (``[M, numel]``) of the tokens at ``index`` of (``slots``, ``heads``) of
        one tier: the inverse of ``put``. All ``slots`` must store that tier in one format."""
        f, pages, offset = self._locate(layer, tier, slots, heads, index)
        return {name: view[pages, offset] for name, view in self._views[f].items()}

    def put(
        self,
        layer: int | None,
        tier: int,
        slots: torch.Tensor,
        heads: torch.Tensor,
        index: torch.Tensor,
        fields: dict[str, torch.Tensor],
    ) -> None:
        """Store ``fields`` (some or all of the layout's, each ``[M, numel]``) of tokens at
        ``index`` of (``slots``, ``heads``) of one tier.

        All ``slots`` must store that tier in the same format; their pages must be held.
        """
        if not index.numel():
            return
        f, pages, offset = self._locate(layer, tier, slots, heads, index)
        views = self._views[f]
        for name, value in fields.items():
            views[name][pages, offset] = value

    def put_tokens(
        self,
        layer: int | None,
        tier: int,
        slots: torch.Tensor,
        heads: torch.Tensor,
        index: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        scores: torch.Tensor,
    ) -> None:
        """Encode keys and values ``k``/``v`` [M, D] (with their ``positions`` and ``scores``
        [M]) in the tier's format and store them like ``put``: by a backend's writer when one
        serves the format (the same bytes), else by ``KVFormat.encode``."""
        if not index.numel():
            return
        f, pages, offset = self._locate(layer, tier, slots, heads, index)
        self._encode_into(
            f, pages[:, None], offset[:, None], k[:, None], v[:, None], positions, scores
        )

    def _locate(
        self,
        layer: int | None,
        tier: int,
        slots: torch.Tensor,
        heads: torch.Tensor,
        index: torch.Tensor,
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The tier's format index, and the page and row of each token at ``index`` (``heads``
        as ``read_tier`` numbers them)."""
        f = int(self.slot_format[slots[0], tier])
        per_page = self.layouts[f].tokens_per_page
        pages = self._units(self.tables, layer)[slots, heads, tier, index // per_page]
        return f, pages, index % per_page

    def write_scores(
        self,
        layer: int,
        slots: torch.Tensor,
        tier: int,
        scores: torch.Tensor,
        f: int | None = None,
    ) -> None:
        """Store the scores [B, H, W] of every column ``read_tier`` returned for one tier of
        ``slots`` (the pages they hold now), one page-sized copy per held page. ``f``: the
        tier's format index when the caller knows it."""
        f = int(self.slot_format[slots[0], tier]) if f is None else f
        per_page = self.layouts[f].tokens_per_page
        num = scores.shape[-1] // per_page
        if not num:
            return
        held = torch.arange(num) < self.held[slots, layer, :, tier][..., None]
        pages = self.tables[slots, layer, :, tier, :num][held]
        rows = scores.reshape(*held.shape, per_page, 1)[held]
        self._views[f]["score"].index_copy_(0, pages, rows.to(torch.float32))

    def by_format(self, slots: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        """The high formats of ``slots`` with the rows of each; rows is None when all share one."""
        formats = self.slot_format[slots, HIGH]
        present = formats.unique()
        if present.numel() == 1:
            return [(int(present), None)]
        return [(int(f), torch.nonzero(formats == f).flatten()) for f in present]

    def _encode_into(
        self,
        f: int,
        pages: torch.Tensor,
        offset: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        scores: torch.Tensor | None = None,
    ) -> None:
        """Encode ``k``/``v`` [N, H, D] in format index ``f`` and store token ``n``, head ``h``
        at row ``offset[n, h]`` of page ``pages[n, h]``, with ``positions`` [N] and ``scores``
        [N] (0 when None): by a backend's writer when one serves the format (the same bytes),
        else by ``KVFormat.encode``."""
        views = self._views[f]
        writer = None if self.writer_for is None else self.writer_for(f)
        if writer is not None:
            writer(self, f, pages, offset, k, v, positions)
            if scores is not None and self.formats[f].quantized:
                views["score"][pages, offset] = scores[:, None, None].to(torch.float32)
            return
        encoded = self.formats[f].encode(k, v, positions=positions, scores=scores, dtype=self.dtype)
        for name, value in encoded.items():
            views[name][pages, offset] = value

    def _gather(
        self, f: int, layer: int, slots: torch.Tensor, length: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_page = self.layouts[f].tokens_per_page
        num = -(-length // per_page)
        pages = self.tables[slots, layer, :, HIGH, :num]
        b, h = pages.shape[:2]
        # Columns past a head's own pages hold stale ids, maybe of pages now holding another
        # format's bytes (which could read as NaN here): point them at the head's first page.
        valid = torch.arange(num) < self.held[slots, layer, :, HIGH][..., None]
        pages = torch.where(valid, pages, pages[..., :1])
        # index_select on the flat page list is several times faster than advanced indexing
        # of the strided arena view.
        flat = pages.reshape(-1)
        fields = {
            name: view.index_select(0, flat).view(b, h, num * per_page, -1)
            for name, view in self._views[f].items()
            if name not in _METADATA
        }
        return self.formats[f].decode(fields, dtype)
