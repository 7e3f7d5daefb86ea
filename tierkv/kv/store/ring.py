"""ResidualRing: each uniform slot's ring of its newest tokens, uncompressed.

Uniform slots of a policy with a residual window (``KVPolicy.residual``) also write every new
token, uncompressed, into a third table row per (slot, layer, head): a ring of FULL-format pages
holding the newest ``ring`` tokens at index ``position % ring``. Attention reads it *before* a
step's write (``read_residual``), so the ring then holds exactly the positions just below the
step's first new token, which is what the residual window of the step's queries needs.

The ring's pages are held like a tier's (``PageTables``, row ``RESIDUAL``); the step's write
(``KVStore.write``) copies tokens into it where ``_ring_targets`` says.
"""

from __future__ import annotations

import torch

from tierkv.kv.formats.quant import FULL
from tierkv.kv.store.tables import RESIDUAL, PageTables
from tierkv.kv.store.views import Residual


class ResidualRing(PageTables):
    """Reads of the slots' residual rings, and where a step's tokens go in them (a mixin of
    ``KVStore``)."""

    def read_residual(
        self, layer: int, slots: torch.Tensor, num_pages: int | None = None
    ) -> Residual:
        """The ring entries of ``slots`` at ``layer``: their newest tokens before this step.

        Call it before the step's ``write``: the ring then holds the ``ring`` positions just
        below each slot's first new token. Slots without a ring give only empty entries.
        ``num_pages`` is the pages of the largest ring when the caller knows it on the host.
        """
        per_page = self.layouts[0].tokens_per_page
        ring = self.ring[slots]
        num = max(int(ring.max()) // per_page, 1) if num_pages is None else num_pages
        pages = self.tables[slots, layer, :, RESIDUAL, :num]
        held = self.held[slots, layer, :, RESIDUAL]
        # Slots without a ring (or with a smaller one) have stale ids in these columns.
        pages = torch.where(torch.arange(num) < held[..., None], pages, 0).reshape(-1)
        b, h = held.shape
        fields = {
            name: view.index_select(0, pages).view(b, h, num * per_page, view.shape[-1])
            for name, view in self._views[0].items()
        }
        # Entry i holds the one position p of the newest ``ring`` (p < seen) with p % ring == i.
        seen = self.seen[slots, layer][:, None]
        width = ring[:, None].clamp(min=1)
        index = torch.arange(num * per_page)
        pos = seen - width + (index - (seen - width)) % width
        live = (pos >= 0) & (index < ring[:, None])
        keys, values = FULL.decode(fields, self.dtype)
        zero = torch.zeros((), dtype=self.dtype)
        hold = live[:, None, :, None]
        return Residual(
            keys=torch.where(hold, keys, zero),
            values=torch.where(hold, values, zero),
            pos=torch.where(live, pos, -1),
            window=self.residual[slots],
        )

    def _ring_targets(
        self, slots: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which of a step's tokens (``index`` of ``slots``) are copied into residual rings:
        their rows ``[K]`` among the step's tokens, their FULL pages ``[K, layers, heads]`` and
        their rows in those pages ``[K, 1]``.

        Only a slot's newest ``ring`` tokens of the step are kept: the ring holds no more. A
        slot's tokens of a step are consecutive positions, so the newest are those within
        ``ring`` of its last one (the same at every layer, whichever layers were written).
        """
        layers = torch.arange(self.num_layers)[:, None]
        heads = torch.arange(self.num_kv_heads)
        ring = self.ring[slots]
        last = torch.full((self.seen.shape[0],), -1, dtype=index.dtype)
        last = last.scatter_reduce(0, slots, index, "amax")
        fresh = index > last[slots] - ring
        ring_keep = torch.nonzero((ring > 0) & fresh).flatten()
        at = index[ring_keep] % ring[ring_keep]
        per_page = self.layouts[0].tokens_per_page
        ring_pages = self.tables[
            slots[ring_keep][:, None, None],
            layers,
            heads,
            RESIDUAL,
            (at // per_page)[:, None, None],
        ]
        ring_offset = (at % per_page)[:, None]
        return ring_keep, ring_pages, ring_offset
