"""PageTables: per (request slot, layer, KV head, tier) page tables over the shared PagePool.

Every (slot, layer, head) owns its own pages in each of two tiers, so heads can hold different
numbers of tokens. A slot stores its high tier in one ``KVFormat`` and, under a differentiated
policy, its low tier in another; requests under different precisions share one batch: every
format has its own typed views of the same arena (``PagePool.fields``), and the page size is the
same for all of them, so a page freed by one format is reused by any other. A third table row
per (slot, layer, head) holds a uniform slot's residual ring (``ring``).

Growing and freeing are batched over all slots, layers, heads and tiers at once: the pages each
table row needs are counted, one ``PagePool.alloc`` hands them out, and a prefix sum over the
counts tells each row which slice of the allocation is its own.

This is the state every other part of ``KVStore`` reads and writes (its mixins subclass it):
the tables, the token counts, the slots' formats, and the slots themselves.
"""

from __future__ import annotations

from typing import Any

import torch

from tierkv.kv.formats.layout import PageLayout
from tierkv.kv.formats.quant import FULL, KVFormat
from tierkv.kv.policy.spec import KVPolicy
from tierkv.kv.policy.tiers import SlotTiers
from tierkv.kv.store.pool import PagePool

HIGH, LOW, RESIDUAL = 0, 1, 2


class PageTables:
    """Page tables for up to ``max_seqs`` requests of ``max_model_len`` tokens, any format."""

    # The prefix cache over these tables, when one is on (``prefix.PrefixCache`` sets it): told
    # when a slot is released. A class default: a store starts without one.
    prefix_cache: Any = None

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
        self.formats: list[KVFormat] = []
        self.layouts: list[PageLayout] = []
        self._views: list[dict[str, torch.Tensor]] = []
        self._tokens_per_page = torch.zeros(0, dtype=torch.int64)
        # The uncompressed format has the fewest tokens per page of the usual formats, so it
        # sizes the page tables; a format needing more columns is refused by `register`.
        full_layout = FULL.layout(head_dim, dtype, pool.page_bytes)
        self.max_pages = -(-max_model_len // full_layout.tokens_per_page)
        # What fp16 costs at 2 bytes per element: the unit of budget mode.
        self.fp16_tokens_per_page = FULL.layout(
            head_dim, torch.float16, pool.page_bytes
        ).tokens_per_page
        # Rows per (slot, layer, head): the high tier, the low tier, the residual ring.
        shape = (max_seqs, num_layers, num_kv_heads, 3)
        # One spare column: a low tier may hold one page beyond its tokens (the demotion room).
        self.tables = torch.zeros(*shape, self.max_pages + 1, dtype=torch.int64)
        self.held = torch.zeros(shape, dtype=torch.int64)
        # Tokens of each tier (a ring holds the newest min(seen, ring) tokens: derived).
        self.count = torch.zeros(shape[:-1] + (RESIDUAL,), dtype=torch.int64)
        # Tokens appended per (slot, layer): the next token's position.
        self.seen = torch.zeros(max_seqs, num_layers, dtype=torch.int64)
        # Format index of each slot's tiers (the low one is -1 for uniform slots).
        self.slot_format = torch.zeros(max_seqs, 2, dtype=torch.int64)
        # Residual window and ring size (tokens, a whole number of FULL pages) of each slot.
        self.residual = torch.zeros(max_seqs, dtype=torch.int64)
        self.ring = torch.zeros(max_seqs, dtype=torch.int64)
        # Whether each slot stores its tokens in the rotated basis (``KVPolicy.rotate``).
        self.rotated = torch.zeros(max_seqs, dtype=torch.bool)
        self.num_rotated = 0
        self.tiers = SlotTiers(max_seqs)
        self.num_tiered = 0
        self.num_residual = 0
        # A counter of the changes to the tables and counts other than writes: a step's write
        # plan (``KVStore._write_plan``) is valid only while it is unchanged.
        self._version = 0
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self.register(FULL)

    @property
    def page_table(self) -> torch.Tensor:
        """The high tier's page table ``[slots, layers, heads, columns]`` (a view)."""
        return self.tables[..., HIGH, :]

    @property
    def num_pages(self) -> torch.Tensor:
        """Pages held by each (slot, layer, head) in the high tier (a view)."""
        return self.held[..., HIGH]

    @property
    def num_tokens(self) -> torch.Tensor:
        """Tokens held by each (slot, layer, head), both tiers (the ring copies some of them)."""
        return self.count.sum(-1)

    # -- formats -----------------------------------------------------------------------------------

    def register(self, fmt: KVFormat) -> int:
        """Make ``fmt`` storable (idempotent); returns its index.

        Raises ``ValueError`` when the format does not fit this model (its group size does not
        divide the head dim, its codes do not fill whole bytes, or too few tokens fit a page).
        """
        if fmt.quantized and fmt.group_size > self.head_dim:
            # Every group larger than the head is one group per row: one format, not many.
            fmt = fmt.with_group_size(self.head_dim)
        if fmt in self.formats:
            return self.formats.index(fmt)
        layout = fmt.layout(self.head_dim, self.dtype, self.pool.page_bytes)
        if -(-self.max_model_len // layout.tokens_per_page) > self.max_pages:
            raise ValueError(
                f"format {fmt.name} (group size {fmt.group_size}) holds only "
                f"{layout.tokens_per_page} tokens per {self.pool.page_bytes}-byte page, fewer "
                "than the uncompressed format"
            )
        self.formats.append(fmt)
        self.layouts.append(layout)
        self._views.append(self.pool.fields(layout))
        self._tokens_per_page = torch.tensor([lay.tokens_per_page for lay in self.layouts])
        return len(self.formats) - 1

    def register_policy(self, policy: KVPolicy) -> None:
        """Make every format of ``policy`` storable; ``ValueError`` if one does not fit."""
        self.register(policy.high)
        if policy.low is not None:
            self.register(policy.low)

    def layout(self, fmt: KVFormat) -> PageLayout:
        """The page layout of ``fmt`` in this store."""
        return self.layouts[self.register(fmt)]

    def format_of(self, slot: int, tier: int = HIGH) -> KVFormat:
        """The format the slot stores a tier's tokens in."""
        return self.formats[int(self.slot_format[slot, tier])]

    # -- slots -------------------------------------------------------------------------------------

    def acquire_slot(self, spec: KVFormat | KVPolicy = FULL, prompt_len: int = 0) -> int:
        """Take a free request slot (its tables are empty) for a format or a policy.

        ``prompt_len`` (tiered policies) is the prompt at admission: its last queries score
        the tokens, and decisions start once it is complete.
        """
        if not self._free_slots:
            raise RuntimeError("no free request slot: max_num_seqs requests are already held")
        policy = spec if isinstance(spec, KVPolicy) else None
        high = self.register(policy.high if policy else spec)  # type: ignore[arg-type]
        low = self.register(policy.low) if policy and policy.low is not None else -1
        slot = self._free_slots.pop()
        self.slot_format[slot] = torch.tensor([high, low])
        window = policy.residual if policy is not None and self.formats[high].quantized else 0
        self.residual[slot] = window
        self.ring[slot] = self._ring_pages(window) * self.layouts[0].tokens_per_page
        self.num_residual += int(window > 0)
        rotated = policy is not None and policy.rotate and self.formats[high].quantized
        self.rotated[slot] = rotated
        self.num_rotated += int(rotated)
        self.tiers.assign(slot, policy, prompt_len)
        self.num_tiered += int(low >= 0)
        self._version += 1
        return slot

    def release_slot(self, slot: int) -> None:
        """Free every page the slot holds and return the slot."""
        mask = torch.arange(self.tables.shape[-1]) < self.held[slot][..., None]
        self.pool.free(self.tables[slot][mask])
        if self.prefix_cache is not None:
            self.prefix_cache.release(slot)
        self.held[slot] = 0
        self.count[slot] = 0
        self.seen[slot] = 0
        self.num_tiered -= int(self.slot_format[slot, LOW] >= 0)
        self.num_residual -= int(self.residual[slot] > 0)
        self.num_rotated -= int(self.rotated[slot])
        self.rotated[slot] = False
        self.residual[slot] = 0
        self.ring[slot] = 0
        self._free_slots.append(slot)
        self._version += 1

    # -- growth ------------------------------------------------------------------------------------

    def _ring_pages(self, window: int, fmt: KVFormat | None = None) -> int:
        """FULL pages per (layer, head) of a residual ring for ``window`` tokens (0 when the
        window is 0 or the slot's format ``fmt`` is not quantized)."""
        if fmt is not None and not fmt.quantized:
            return 0
        return -(-window // self.layouts[0].tokens_per_page)

    def reserve(self, slots: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """Grow each slot in ``slots`` to hold ``num_tokens`` tokens, in one allocation.

        Tiered slots also get one spare low page per (layer, head), the room a decision needs
        to demote tokens before the pages they leave are freed.
        """
        self._grow(self._rows(slots), self._need(slots, num_tokens).reshape(-1))

    def try_reserve(self, slots: torch.Tensor, num_tokens: torch.Tensor) -> bool:
        """``reserve`` if the pool has every page it needs, else nothing; returns whether it
        reserved (one pass over the slots' tables where ``pages_to_grow`` then ``reserve``
        would make two, at every step)."""
        need = self._need(slots, num_tokens)
        if int(need.sum()) > self.pool.num_available:
            return False
        self._grow(self._rows(slots), need.reshape(-1))
        return True

    def resize(
        self, layer: int | None, slots: torch.Tensor, high: torch.Tensor, low: torch.Tensor
    ) -> None:
        """Set the token counts [B, H] of both tiers of ``slots`` at ``layer`` (every layer's
        heads when None, see ``read_tier``) and hold exactly the pages they need: surplus pages
        are freed first, then missing ones allocated."""
        counts = torch.stack([high, low], -1)
        per_page = self._tokens_per_page[self.slot_format[slots]][:, None, :]
        want = -(-counts // per_page)
        units = counts.shape[1]
        first = slots * (self.num_layers * self.num_kv_heads)
        if layer is not None:
            first = first + layer * self.num_kv_heads
        tiers = torch.arange(RESIDUAL)
        rows = (
            (first[:, None, None] + torch.arange(units)[:, None]) * self.held.shape[-1] + tiers
        ).reshape(-1)
        want = want.reshape(-1)
        self._shrink(rows, want)
        self._grow(rows, (want - self.held.view(-1)[rows]).clamp(min=0))
        self._units(self.count, layer)[slots] = counts
        self._version += 1

    def _units(self, table: torch.Tensor, layer: int | None) -> torch.Tensor:
        """``table`` ([slots, layers, heads, ...]) at one layer, or with every layer's heads as
        one axis (a view: writes go through)."""
        return table.flatten(1, 2) if layer is None else table[:, layer]

    def _need(self, slots: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """Pages each (slot, layer, head, row) lacks to hold ``num_tokens``: ``[B, L, H, 3]``."""
        return (self._want(slots, num_tokens) - self.held[slots]).clamp(min=0)

    def _want(self, slots: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """Pages each (slot, layer, head, row) should hold before a step: ``[B, L, H, 3]``."""
        per_page = self._tokens_per_page[self.slot_format[slots]]
        new = (num_tokens - self.seen[slots, 0])[:, None, None]
        high = -(-(self.count[slots, :, :, HIGH] + new) // per_page[:, None, None, HIGH])
        tiered = (self.slot_format[slots, LOW] >= 0)[:, None, None]
        low_pages = -(-self.count[slots, :, :, LOW] // per_page[:, None, None, LOW]) + 1
        low = torch.where(tiered, low_pages, 0)
        ring = (self.ring[slots] // self.layouts[0].tokens_per_page)[:, None, None]
        return torch.stack([high, low, ring.expand_as(high)], -1)

    def _rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Flat table rows of every (layer, head, tier) of ``slots``, slot-major."""
        per_slot = self.num_layers * self.num_kv_heads * self.held.shape[-1]
        return (slots[:, None] * per_slot + torch.arange(per_slot)).reshape(-1)

    def _grow(self, rows: torch.Tensor, need: torch.Tensor) -> None:
        """Append ``need[i]`` new zeroed pages to table row ``rows[i]``, in one allocation.

        Zeroing keeps the unwritten tail of a page finite in any format, whatever format last
        used the page (attention masks those values, but a NaN from stale bytes would survive
        the mask).
        """
        total = int(need.sum())
        if total == 0:
            return
        pages = self.pool.alloc(total)
        self.pool.arena.index_fill_(0, pages, 0)
        owner = torch.repeat_interleave(torch.arange(need.numel()), need)
        start = torch.cumsum(need, 0) - need
        held = self.held.view(-1)
        column = held[rows[owner]] + torch.arange(total) - start[owner]
        self.tables.view(-1, self.tables.shape[-1])[rows[owner], column] = pages
        held[rows] += need
        self._version += 1

    def _shrink(self, rows: torch.Tensor, keep: torch.Tensor) -> None:
        """Free the pages of table row ``rows[i]`` past its first ``keep[i]``, in one batch."""
        held = self.held.view(-1)
        columns = torch.arange(self.tables.shape[-1])
        surplus = (columns >= keep[:, None]) & (columns < held[rows][:, None])
        if bool(surplus.any()):
            self.pool.free(self.tables.view(-1, self.tables.shape[-1])[rows][surplus])
            held[rows] = torch.minimum(held[rows], keep)
            self._version += 1
