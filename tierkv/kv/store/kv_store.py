"""KVStore: per (request slot, layer, KV head, tier) page tables over the shared PagePool.

Every (slot, layer, head) owns its own pages in each of two tiers, so heads can hold different
numbers of tokens. A slot stores its high tier in one ``KVFormat`` and, under a differentiated
policy, its low tier in another; requests under different precisions share one batch: every
format has its own typed views of the same arena (``PagePool.fields``), and the page size is the
same for all of them, so a page freed by one format is reused by any other.

Uniform slots store token ``i`` at index ``i`` of the high tier. Tiered slots store each tier as
a dense prefix per head: new tokens are appended after the head's high tokens, and decisions
(``compact.apply_decisions``) rewrite both tiers compactly; a token's position is its stored
``pos`` field.

Uniform slots of a policy with a residual window (``KVPolicy.residual``) also write every new
token, uncompressed, into a third table row per (slot, layer, head): a ring of FULL-format pages
holding the newest ``ring`` tokens at index ``position % ring``. Attention reads it *before* a
step's write (``read_residual``), so the ring then holds exactly the positions just below the
step's first new token, which is what the residual window of the step's queries needs.

Growing and freeing are batched over all slots, layers, heads and tiers at once: the pages each
table row needs are counted, one ``PagePool.alloc`` hands them out, and a prefix sum over the
counts tells each row which slice of the allocation is its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tierkv.kv.formats.layout import PageLayout
from tierkv.kv.formats.quant import FULL, KVFormat
from tierkv.kv.policy.spec import KVPolicy
from tierkv.kv.policy.tiers import SlotTiers, TierCosts
from tierkv.kv.store.pool import PagePool
from tierkv.kv.store.views import Residual, TierRead

HIGH, LOW, RESIDUAL = 0, 1, 2

# Per-token fields that attention does not read: the policy's score and the token's position.
_METADATA = ("score", "pos")


@dataclass
class _WritePlan:
    """Where one step's new tokens go at every layer (``KVStore._write_plan``).

    ``parts`` holds, per high-tier format, the rows of the step's tokens in that format (None:
    all of them) with their page ids and rows in the page, ``[N, layers, heads]``; ``added``
    [max_seqs] is the tokens each slot gains per layer. The ring fields say which tokens are
    copied into residual rings (``ring_keep`` [K], None without rings), to which FULL pages
    ``[K, layers, heads]`` and rows ``[K, 1]``.
    """

    index: torch.Tensor
    slots: torch.Tensor
    version: int
    written: set[int]
    parts: list[tuple[int, torch.Tensor | None, torch.Tensor, torch.Tensor]]
    added: torch.Tensor
    ring_keep: torch.Tensor | None
    ring_pages: torch.Tensor | None
    ring_offset: torch.Tensor | None


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
        self.tiers = SlotTiers(max_seqs)
        self.num_tiered = 0
        self.num_residual = 0
        # Encodes (quantizes, or copies uncompressed rows) and writes new tokens in one call
        # when set (``native.store_tokens``, set by the fast attention backend); else
        # ``KVFormat.encode`` and one store per field.
        self.token_writer: Callable[..., None] | None = None
        # Where the current step's tokens go (see ``_write_plan``), and a counter of the
        # changes to the tables and counts other than writes, which invalidate it.
        self._plan: _WritePlan | None = None
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

    # -- formats -------------------------------------------------------------------------------

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

    def costs(self, slot: int) -> TierCosts:
        """Tokens per page of a tiered slot's tiers and of fp16 (for budget decisions)."""
        per_page = self._tokens_per_page[self.slot_format[slot]]
        ring_pages = int(self.ring[slot]) // self.layouts[0].tokens_per_page
        return TierCosts(
            int(per_page[HIGH]), int(per_page[LOW]), self.fp16_tokens_per_page, ring_pages
        )

    # -- slots -------------------------------------------------------------------------------

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
        self.tiers.assign(slot, policy, prompt_len)
        self.num_tiered += int(low >= 0)
        self._version += 1
        return slot

    def release_slot(self, slot: int) -> None:
        """Free every page the slot holds and return the slot."""
        mask = torch.arange(self.tables.shape[-1]) < self.held[slot][..., None]
        self.pool.free(self.tables[slot][mask])
        self.held[slot] = 0
        self.count[slot] = 0
        self.seen[slot] = 0
        self.num_tiered -= int(self.slot_format[slot, LOW] >= 0)
        self.num_residual -= int(self.residual[slot] > 0)
        self.residual[slot] = 0
        self.ring[slot] = 0
        self._free_slots.append(slot)
        self._version += 1

    # -- capacity ------------------------------------------------------------------------------

    def tokens_per_page(self, fmt: KVFormat) -> int:
        """Tokens of one (layer, head) a page holds in ``fmt``."""
        return self.layout(fmt).tokens_per_page

    def pages_for(self, num_tokens: int, fmt: KVFormat = FULL) -> int:
        """Pages one request of ``num_tokens`` tokens in ``fmt`` needs across layers and heads."""
        per_head = -(-num_tokens // self.tokens_per_page(fmt))
        return self.num_layers * self.num_kv_heads * per_head

    def pages_to_admit(self, num_tokens: int, policy: KVPolicy) -> int:
        """Pages admission reserves: the prompt at high precision, plus one low page per head
        (tiered) and the residual ring (with a residual window)."""
        per_head = int(policy.tiered) + self._ring_pages(policy.residual, policy.high)
        return (
            self.pages_for(num_tokens, policy.high) + self.num_layers * self.num_kv_heads * per_head
        )

    def _ring_pages(self, window: int, fmt: KVFormat | None = None) -> int:
        """FULL pages per (layer, head) of a residual ring for ``window`` tokens (0 when the
        window is 0 or the slot's format ``fmt`` is not quantized)."""
        if fmt is not None and not fmt.quantized:
            return 0
        return -(-window // self.layouts[0].tokens_per_page)

    def residual_bytes(self, policy: KVPolicy) -> int:
        """Bytes a request's residual ring costs across layers and heads (0 without one)."""
        pages = self._ring_pages(policy.residual, policy.high)
        per_page = self.pool.page_bytes + self.tables.element_size()
        return self.num_layers * self.num_kv_heads * pages * per_page

    def pages_to_grow(self, slots: int | torch.Tensor, num_tokens: int | torch.Tensor) -> int:
        """Pages the slots (one or a tensor of them) still need to hold ``num_tokens`` tokens
        each (seen ones included), in total."""
        slots = torch.as_tensor(slots).reshape(-1)
        return int(self._need(slots, torch.as_tensor(num_tokens).reshape(-1)).sum())

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
        if int(need.sum()) > self.pool.num_free:
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

    # -- tokens --------------------------------------------------------------------------------

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        index: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Append token ``index`` (its position) of each slot: ``k``/``v`` are [N, heads, dim].

        A slot's tokens of one call are consecutive positions after those it has seen. They go
        to the high tier, after the tokens each head holds there; each slot's tokens are encoded
        in its own format (one vectorised write per format). Slots with a residual window also
        copy them, uncompressed, into their rings.
        """
        plan = self._write_plan(layer, slots, index)
        for f, rows, pages, offset in plan.parts:
            part = (k, v, index) if rows is None else (k[rows], v[rows], index[rows])
            self._encode_into(f, pages[:, layer], offset[:, layer], *part)
        if plan.ring_keep is not None and plan.ring_keep.numel():
            # Only a slot's newest ``ring`` tokens of the call are written: older ones would be
            # overwritten within the same scatter, whose order is undefined.
            keep = plan.ring_keep
            pages = plan.ring_pages[:, layer]
            offset = plan.ring_offset.expand_as(pages)
            self._encode_into(0, pages, offset, k[keep], v[keep], index[keep])
        self.seen[:, layer] += plan.added
        self.count[:, layer, :, HIGH] += plan.added[:, None]

    def _write_plan(self, layer: int, slots: torch.Tensor, index: torch.Tensor) -> _WritePlan:
        """Where the step's tokens (``index``) go, in every layer: worked out at the step's first
        ``write`` and reused by its other layers.

        Each layer's write changes only its own counts, so the destinations of every layer are
        known before the first. The plan holds for the same ``index`` and ``slots`` tensors while
        nothing else changed the tables (the ``_version`` it was made at), until a layer is
        written twice (a new step).
        """
        plan = self._plan
        if (
            plan is not None
            and plan.index is index
            and plan.slots is slots
            and plan.version == self._version
            and layer not in plan.written
        ):
            plan.written.add(layer)
            return plan
        # Uniform slots hold every seen token, so this is ``index`` itself for them.
        dest = self.count[slots, :, :, HIGH] + (index[:, None] - self.seen[slots])[..., None]
        layers = torch.arange(self.num_layers)[:, None]
        heads = torch.arange(self.num_kv_heads)
        parts = []
        for f, rows in self.by_format(slots):
            part_slots, part_dest = (slots, dest) if rows is None else (slots[rows], dest[rows])
            per_page = self.layouts[f].tokens_per_page
            pages = self.tables[
                part_slots[:, None, None], layers, heads, HIGH, part_dest // per_page
            ]
            parts.append((f, rows, pages, part_dest % per_page))
        added = torch.bincount(slots, minlength=self.seen.shape[0])
        ring_keep = ring_pages = ring_offset = None
        if self.num_residual:
            ring = self.ring[slots]
            fresh = index >= self.seen[slots, layer] + added[slots] - ring
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
        plan = self._plan = _WritePlan(
            index, slots, self._version, {layer}, parts, added, ring_keep, ring_pages, ring_offset
        )
        return plan

    def read_residual(self, layer: int, slots: torch.Tensor) -> Residual:
        """The ring entries of ``slots`` at ``layer``: their newest tokens before this step.

        Call it before the step's ``write``: the ring then holds the ``ring`` positions just
        below each slot's first new token. Slots without a ring give only empty entries.
        """
        per_page = self.layouts[0].tokens_per_page
        ring = self.ring[slots]
        num = max(int(ring.max()) // per_page, 1)
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

    def gather(
        self, layer: int, slots: torch.Tensor, length: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``length`` high-tier tokens, decoded to ``dtype``.

        Returns two [B, heads, length', head_dim] with ``length' >= length``; entries past a
        slot's own count are finite garbage the caller masks.
        """
        parts = self.by_format(slots)
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
        self, layer: int | None, slots: torch.Tensor, tier: int
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """One tier of ``slots`` at ``layer`` (every layer when None, as ``read_tier``): its
        format index, the tokens each head holds ``[B, H]`` and the page ids ``[B, H, P]`` of
        the pages covering the largest count (columns past a head's own pages are stale)."""
        f = int(self.slot_format[slots[0], tier])
        count = self._units(self.count, layer)[slots, :, tier]
        num = -(-int(count.max()) // self.layouts[f].tokens_per_page) if count.numel() else 0
        return f, count, self._units(self.tables, layer)[slots, :, tier, :num]

    def read_tier(
        self,
        layer: int | None,
        slots: torch.Tensor,
        tier: int,
        names: tuple[str, ...] | None = None,
    ) -> TierRead:
        """The fields ``names`` (all by default) of every token one tier of ``slots`` holds at
        ``layer``, or at every layer when None (its heads then index layer * H + head).

        All ``slots`` must store that tier in the same format.
        """
        f, count, pages = self.tier_pages(layer, slots, tier)
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
        [M]) in the tier's format and store them like ``put``: by the native writer when it
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
        self, layer: int, slots: torch.Tensor, tier: int, scores: torch.Tensor
    ) -> None:
        """Store the scores [B, H, W] of every column ``read_tier`` returned for one tier of
        ``slots`` (the pages they hold now), one page-sized copy per held page."""
        f = int(self.slot_format[slots[0], tier])
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
        [N] (0 when None): by the native writer when it serves the format (the same bytes),
        else by ``KVFormat.encode``."""
        views = self._views[f]
        if self.token_writer is not None:
            self.token_writer(self, f, pages, offset, k, v, positions)
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

    # -- accounting ----------------------------------------------------------------------------

    def bytes_per_token(self, fmt: KVFormat = FULL) -> float:
        """Analytic bytes one token in ``fmt`` costs across layers and heads.

        ``num_layers * num_kv_heads * (page_bytes + page-table entry) / tokens_per_page``: every
        per-token field (codes, scales, zeros, score, position) and the page's waste included.
        """
        per_page = self.pool.page_bytes + self.tables.element_size()
        return self.num_layers * self.num_kv_heads * per_page / self.tokens_per_page(fmt)

    def tokens_per_head(self, slots: torch.Tensor) -> torch.Tensor:
        """Tokens held by every (layer, head) of ``slots``, both tiers, flattened."""
        return self.num_tokens[slots].reshape(-1)

    def tier_usage(self, slots: torch.Tensor) -> dict[str, tuple[int, int]]:
        """``tier -> (tokens, pages)`` held by ``slots`` over all layers and heads; the
        ``residual`` ring's tokens are uncompressed copies of the newest high-tier ones."""
        usage = {
            name: (int(self.count[slots, ..., tier].sum()), int(self.held[slots, ..., tier].sum()))
            for name, tier in (("high", HIGH), ("low", LOW))
        }
        ring_tokens = torch.minimum(self.seen[slots], self.ring[slots, None]).sum()
        ring_pages = int(self.held[slots, ..., RESIDUAL].sum())
        usage["residual"] = (int(ring_tokens) * self.num_kv_heads, ring_pages)
        return usage

    def bytes_in_use(self, slots: torch.Tensor | None = None) -> int:
        """Bytes held by the pages of ``slots`` (all slots by default) and their table entries."""
        held = self.held if slots is None else self.held[slots]
        return int(held.sum()) * (self.pool.page_bytes + self.tables.element_size())
