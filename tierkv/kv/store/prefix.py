"""PrefixCache: content-addressed reuse of full prompt pages across requests.

A *block* is one page-table column of a slot's high tier at every (layer, KV head): the
``tokens_per_page`` tokens ``[i * T, (i + 1) * T)`` of a uniform slot, ``layers * heads`` pages.
Its key hashes the key of the block before it, the tokens of the block and the slot's
*namespace* (what the bytes depend on besides the tokens: the storage format, the request's
cache salt), so equal keys mean equal prefixes stored the same way, as in vLLM's automatic
prefix caching.

The cache holds one pool reference (``PagePool.share``) on each page of each block it keeps, and
every slot that reuses a block holds another, through its page table. Slots only ever write past
their reused blocks (token ``i`` of a uniform slot lives at index ``i``), so a shared page is
never written. A block no slot uses is *evictable*: it stays, in least-recently-used order,
until an allocation finds the free pages short (``PagePool.alloc`` calls ``reclaim``).

How a slot shares (``Sharing``) is the scheduler's decision (``docs/prefix_caching.md``): where
hits may end, how much of a slot is cached, and whether a hit needs a copy of the slot's
residual ring (its uncompressed newest tokens, which no block describes) where it ends.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tierkv.kv.store.tables import HIGH, LOW, RESIDUAL, PageTables


@dataclass(eq=False)
class _Block:
    """One cached block: its pages ``[layers * heads]``, the slots using it, and ``ring``, a
    copy of the residual ring of the slot that filled it, as it was right after the block's
    last token (``[layers * heads * ring pages]``, FULL pages), where a hit may end."""

    key: bytes
    pages: torch.Tensor
    users: int = 0
    ring: torch.Tensor | None = None

    @property
    def num_pages(self) -> int:
        return self.pages.numel() + (self.ring.numel() if self.ring is not None else 0)


@dataclass(frozen=True)
class Sharing:
    """How one slot shares: its ``namespace``, ``block`` tokens per block (tokens per page of
    its high format), ``step``: hits end at multiples of it (a multiple of ``block``),
    ``limit``: only its first ``limit`` tokens are cached (None: all), ``horizon``: a hit ends
    at or before this token (None: anywhere), ``ring``: whether a hit needs a ring snapshot
    where it ends (slots with a residual window), and ``copy``: the slot writes its pages
    after they are cached (a tiered slot's scores and decisions), so blocks are copied into
    the cache and out of it instead of shared (with their scores zeroed: as written before
    any scoring)."""

    namespace: bytes
    block: int
    step: int
    limit: int | None = None
    horizon: int | None = None
    ring: bool = False
    copy: bool = False


@dataclass
class _SlotState:
    """What the cache knows of one slot: how it shares and the keys of its full blocks so far;
    ``blocks`` are the cached blocks it holds a use of (reused or inserted by it)."""

    sharing: Sharing
    keys: list[bytes] = field(default_factory=list)
    blocks: list[_Block] = field(default_factory=list)
    registered: int = 0


@dataclass
class PrefixHit:
    """A lookup's answer: the cached blocks of a prompt's longest usable cached prefix, in
    order, and the ring snapshot to restore where it ends (None: no ring)."""

    blocks: list[_Block]
    num_tokens: int
    ring: torch.Tensor | None = None


class PrefixCache:
    """Cached blocks of every namespace over one store's pool (see the module docstring)."""

    def __init__(self, store: PageTables) -> None:
        self.store = store
        self.pool = store.pool
        self._blocks: dict[bytes, _Block] = {}
        # Blocks no slot uses, oldest first: the eviction order.
        self._evictable: OrderedDict[bytes, _Block] = OrderedDict()
        self._evictable_pages = 0
        self._held_pages = 0
        self._slots: dict[int, _SlotState] = {}
        self.pages_per_block = store.num_layers * store.num_kv_heads
        self.queries = 0
        self.hits = 0
        self.evictions = 0
        self.pool.reclaimer = self
        store.prefix_cache = self

    # -- pool side ---------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_pages(self) -> int:
        """Pages the cache holds a reference on (some may also be in running requests)."""
        return self._held_pages

    @property
    def reclaimable_pages(self) -> int:
        return self._evictable_pages

    def reclaim(self, num_pages: int) -> None:
        """Evict least recently used unused blocks until ``num_pages`` pages came free."""
        freed = 0
        while freed < num_pages and self._evictable:
            _, block = self._evictable.popitem(last=False)
            del self._blocks[block.key]
            self._evictable_pages -= block.num_pages
            self._held_pages -= block.num_pages
            self.pool.free(block.pages)
            if block.ring is not None:
                self.pool.free(block.ring)
            freed += block.num_pages
            self.evictions += 1

    def clear(self) -> None:
        """Evict every block no slot uses (vLLM's ``reset_prefix_cache``)."""
        self.reclaim(self.reclaimable_pages)

    # -- slot side ---------------------------------------------------------------------------------

    def lookup(self, sharing: Sharing, tokens: list[int]) -> PrefixHit:
        """The longest cached prefix of ``tokens`` that ends at a multiple of ``sharing.step``
        (with a ring snapshot there when ``sharing.ring``), leaving at least the last token
        to compute (its logits are needed)."""
        blocks: list[_Block] = []
        best = PrefixHit([], 0)
        key = sharing.namespace
        per_step = sharing.step // sharing.block
        usable = (
            len(tokens) - 1 if sharing.horizon is None else min(len(tokens) - 1, sharing.horizon)
        )
        for i in range(usable // sharing.block):
            key = _block_key(key, tokens[i * sharing.block : (i + 1) * sharing.block])
            block = self._blocks.get(key)
            if block is None:
                break
            blocks.append(block)
            if len(blocks) % per_step == 0 and (not sharing.ring or block.ring is not None):
                best = PrefixHit(list(blocks), len(blocks) * sharing.block, block.ring)
        return best

    def pages_reused(self, sharing: Sharing, hit: PrefixHit) -> tuple[int, int]:
        """``(pages the hit saves the slot, evictable pages it holds)``: attaching takes the
        evictable ones out of what ``reclaim`` may free (a copying slot only while it copies,
        and it saves none: its pages are its own)."""
        unused = sum(b.num_pages for b in hit.blocks if b.users == 0)
        saved = 0 if sharing.copy else len(hit.blocks) * self.pages_per_block
        return saved, unused

    def attach(self, slot: int, sharing: Sharing, hit: PrefixHit, num_queried: int) -> None:
        """Start tracking ``slot`` (freshly acquired, empty) and put the hit's blocks in its
        high-tier table as its first tokens; ``restore_ring`` then fills its ring, once its
        pages are reserved. ``num_queried`` is the prompt's length: ``queries`` and ``hits``
        count tokens, as vLLM's metrics do."""
        self.queries += num_queried
        self.hits += hit.num_tokens
        store = self.store
        if int(store.slot_format[slot, LOW]) >= 0 and not sharing.copy:
            raise ValueError("a tiered slot rewrites its pages: it shares by copy")
        state = self._slots[slot] = _SlotState(sharing)
        if not hit.blocks:
            return
        n = len(hit.blocks)
        pages = torch.stack([b.pages for b in hit.blocks], -1)  # [layers * heads, n]
        if sharing.copy:
            for b in hit.blocks:  # no eviction may take them while they are copied
                self._use(b)
            own = self.pool.alloc(pages.numel()).view(pages.shape)
            self.pool.arena[own] = self.pool.arena[pages]
            self.release_blocks(hit.blocks)
            pages = own
        else:
            self.pool.share(pages)
        shape = (store.num_layers, store.num_kv_heads, n)
        store.tables[slot, :, :, HIGH, :n] = pages.view(shape)
        store.held[slot, :, :, HIGH] = n
        store.count[slot, :, :, HIGH] = hit.num_tokens
        store.seen[slot] = hit.num_tokens
        store._version += 1
        state.keys.extend(b.key for b in hit.blocks)
        state.registered = n
        if not sharing.copy:
            for b in hit.blocks:
                self._use(b)
                state.blocks.append(b)

    def restore_ring(self, slot: int, hit: PrefixHit) -> None:
        """Copy the hit's ring snapshot into the slot's ring pages (reserved by now): the
        ring then holds what it held in the slot that filled the blocks, at the same point."""
        if hit.ring is None:
            return
        mine = self._ring_pages(slot)
        arena = self.pool.arena
        arena[mine] = arena[hit.ring]

    def _ring_pages(self, slot: int) -> torch.Tensor:
        """The slot's ring pages, ``[layers * heads * ring pages]``."""
        store = self.store
        num = int(store.ring[slot]) // store.layouts[0].tokens_per_page
        return store.tables[slot, :, :, RESIDUAL, :num].reshape(-1)

    def register(
        self, slot: int, tokens: Callable[[int, int], list[int]], num_computed: int
    ) -> None:
        """Cache the slot's blocks that its first ``num_computed`` tokens (written at every
        layer; ``tokens(start, end)`` reads them) now fill, up to its sharing's ``limit``; a
        slot with a ring that stands at a multiple of ``step`` leaves a snapshot of it on the
        block ending there. A block whose key is cached already (another slot computed the
        same prefix) stays the slot's own."""
        state = self._slots.get(slot)
        if state is None:
            return
        sharing = state.sharing
        if sharing.copy and sharing.limit is not None and num_computed >= sharing.limit:
            return  # the step that ends the prompt also decided: the pages are rewritten
        upto = num_computed if sharing.limit is None else min(num_computed, sharing.limit)
        while state.registered < upto // sharing.block:
            i = state.registered
            parent = state.keys[-1] if state.keys else sharing.namespace
            key = _block_key(parent, tokens(i * sharing.block, (i + 1) * sharing.block))
            state.keys.append(key)
            state.registered += 1
            if key in self._blocks:
                continue
            pages = self.store.tables[slot, :, :, HIGH, i].reshape(-1).clone()
            if sharing.copy:
                if pages.numel() > self.pool.num_free:
                    continue  # a copy is worth no eviction
                pages = self._copy_unscored(slot, pages)
            else:
                self.pool.share(pages)
            block = self._blocks[key] = _Block(key, pages)
            self._held_pages += block.num_pages
            if sharing.copy:
                self._evictable[key] = block
                self._evictable_pages += block.num_pages
                continue
            self._use(block)
            state.blocks.append(block)
        if sharing.ring and upto == num_computed and num_computed % sharing.step == 0:
            self._snapshot(slot, state, num_computed // sharing.block)

    def _copy_unscored(self, slot: int, pages: torch.Tensor) -> torch.Tensor:
        """Fresh pages holding a copy of ``pages`` of the slot's high tier, scores zeroed."""
        copy = self.pool.alloc(pages.numel())
        self.pool.arena[copy] = self.pool.arena[pages]
        views = self.store._views[int(self.store.slot_format[slot, HIGH])]
        if "score" in views:
            views["score"][copy] = 0
        return copy

    def _snapshot(self, slot: int, state: _SlotState, num_blocks: int) -> None:
        """Keep a copy of the slot's ring on its block ``num_blocks - 1`` if that block has
        none, cannot be evicted meanwhile (the slot uses it, or it is a copy nobody can take
        during this call) and pages are free."""
        if num_blocks == 0:
            return
        block = self._blocks.get(state.keys[num_blocks - 1])
        if block is None or block.ring is not None:
            return
        if not state.sharing.copy and all(b is not block for b in state.blocks):
            return
        mine = self._ring_pages(slot)
        if mine.numel() > self.pool.num_free:
            return  # a snapshot is worth no eviction
        copy = self.pool.alloc(mine.numel())
        self.pool.arena[copy] = self.pool.arena[mine]
        block.ring = copy
        self._held_pages += copy.numel()
        if block.users == 0 and block.key in self._evictable:
            self._evictable_pages += copy.numel()

    def release(self, slot: int) -> None:
        """The slot ended (its pages were freed): its blocks become evictable once unused.
        The deepest blocks are queued for eviction first, so a chain is evicted from its
        end and its start stays reachable."""
        state = self._slots.pop(slot, None)
        if state is not None:
            self.release_blocks(state.blocks)

    def release_blocks(self, blocks: list[_Block]) -> None:
        """Drop one use of each of ``blocks``, the deepest first (see ``release``)."""
        for block in reversed(blocks):
            block.users -= 1
            if block.users == 0:
                self._evictable[block.key] = block
                self._evictable_pages += block.num_pages

    def _use(self, block: _Block) -> None:
        if block.users == 0 and self._evictable.pop(block.key, None) is not None:
            self._evictable_pages -= block.num_pages
        block.users += 1


def _block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a block: a SHA-256 of the previous block's key and this block's tokens."""
    digest = hashlib.sha256(parent)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


def namespace_key(*parts: object) -> bytes:
    """The root key of a namespace (what a block's bytes depend on besides its tokens)."""
    return hashlib.sha256(repr(parts).encode()).digest()
