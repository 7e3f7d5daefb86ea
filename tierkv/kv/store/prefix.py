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

Which slots may share is the engine's decision (``docs/prefix_caching.md``); the cache only
refuses slots with a low tier or a residual ring, whose pages a block does not describe.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tierkv.kv.store.tables import HIGH, LOW, PageTables


@dataclass
class _Block:
    """One cached block: its pages ``[layers * heads]`` and the slots using it."""

    key: bytes
    pages: torch.Tensor
    users: int = 0


@dataclass
class _SlotState:
    """What the cache knows of one slot: its namespace and the keys of its full blocks so far;
    ``blocks`` are the cached blocks it holds a use of (reused or inserted by it)."""

    namespace: bytes
    keys: list[bytes] = field(default_factory=list)
    blocks: list[_Block] = field(default_factory=list)
    registered: int = 0


@dataclass
class PrefixHit:
    """A lookup's answer: the cached blocks of a prompt's longest cached prefix, in order."""

    blocks: list[_Block]
    num_tokens: int


class PrefixCache:
    """Cached blocks of every namespace over one store's pool (see the module docstring)."""

    def __init__(self, store: PageTables) -> None:
        self.store = store
        self.pool = store.pool
        self._blocks: dict[bytes, _Block] = {}
        # Blocks no slot uses, oldest first: the eviction order.
        self._evictable: OrderedDict[bytes, _Block] = OrderedDict()
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
        return len(self._blocks) * self.pages_per_block

    @property
    def reclaimable_pages(self) -> int:
        return len(self._evictable) * self.pages_per_block

    def reclaim(self, num_pages: int) -> None:
        """Evict least recently used unused blocks until ``num_pages`` pages came free."""
        freed = 0
        while freed < num_pages and self._evictable:
            _, block = self._evictable.popitem(last=False)
            del self._blocks[block.key]
            self.pool.free(block.pages)
            freed += block.pages.numel()
            self.evictions += 1

    def clear(self) -> None:
        """Evict every block no slot uses (vLLM's ``reset_prefix_cache``)."""
        self.reclaim(self.reclaimable_pages)

    # -- slot side ---------------------------------------------------------------------------------

    def lookup(self, namespace: bytes, tokens: list[int], block_tokens: int) -> PrefixHit:
        """The longest cached prefix of ``tokens`` in whole blocks of ``block_tokens`` tokens,
        leaving at least the last token to compute (its logits are needed)."""
        blocks = []
        key = namespace
        usable = (len(tokens) - 1) // block_tokens
        for i in range(usable):
            key = _block_key(key, tokens[i * block_tokens : (i + 1) * block_tokens])
            block = self._blocks.get(key)
            if block is None:
                break
            blocks.append(block)
        return PrefixHit(blocks, len(blocks) * block_tokens)

    def pages_reused(self, hit: PrefixHit) -> tuple[int, int]:
        """``(pages the hit saves the slot, of those the evictable ones)``: attaching takes the
        evictable ones out of what ``reclaim`` may free."""
        unused = sum(1 for b in hit.blocks if b.users == 0)
        return len(hit.blocks) * self.pages_per_block, unused * self.pages_per_block

    def attach(self, slot: int, namespace: bytes, hit: PrefixHit, num_queried: int) -> None:
        """Start tracking ``slot`` (freshly acquired, empty) under ``namespace`` and put the
        hit's blocks in its high-tier table as its first tokens. ``num_queried`` is the
        prompt's length: ``queries`` and ``hits`` count tokens, as vLLM's metrics do."""
        self.queries += num_queried
        self.hits += hit.num_tokens
        store = self.store
        if int(store.slot_format[slot, LOW]) >= 0 or int(store.ring[slot]) > 0:
            raise ValueError("prefix caching covers uniform slots without a residual ring")
        state = self._slots[slot] = _SlotState(namespace)
        if not hit.blocks:
            return
        n = len(hit.blocks)
        pages = torch.stack([b.pages for b in hit.blocks], -1)  # [layers * heads, n]
        self.pool.share(pages)
        shape = (store.num_layers, store.num_kv_heads, n)
        store.tables[slot, :, :, HIGH, :n] = pages.view(shape)
        store.held[slot, :, :, HIGH] = n
        store.count[slot, :, :, HIGH] = hit.num_tokens
        store.seen[slot] = hit.num_tokens
        store._version += 1
        for b in hit.blocks:
            self._use(b)
            state.keys.append(b.key)
            state.blocks.append(b)
        state.registered = n

    def register(
        self,
        slot: int,
        tokens: Callable[[int, int], list[int]],
        num_computed: int,
        block_tokens: int,
    ) -> None:
        """Cache the slot's blocks that its first ``num_computed`` tokens (written at every
        layer; ``tokens(start, end)`` reads them) now fill. A block whose key is cached
        already (another slot computed the same prefix) stays the slot's own."""
        state = self._slots.get(slot)
        if state is None:
            return
        full = num_computed // block_tokens
        while state.registered < full:
            i = state.registered
            parent = state.keys[-1] if state.keys else state.namespace
            key = _block_key(parent, tokens(i * block_tokens, (i + 1) * block_tokens))
            state.keys.append(key)
            state.registered += 1
            if key in self._blocks:
                continue
            pages = self.store.tables[slot, :, :, HIGH, i].reshape(-1).clone()
            self.pool.share(pages)
            block = self._blocks[key] = _Block(key, pages)
            self._use(block)
            state.blocks.append(block)

    def release(self, slot: int) -> None:
        """The slot ended (its pages were freed): its blocks become evictable once unused.
        The deepest blocks are queued for eviction first, so a chain is evicted from its
        end and its start stays reachable."""
        state = self._slots.pop(slot, None)
        if state is None:
            return
        for block in reversed(state.blocks):
            block.users -= 1
            if block.users == 0:
                self._evictable[block.key] = block

    def _use(self, block: _Block) -> None:
        if block.users == 0:
            self._evictable.pop(block.key, None)
        block.users += 1


def _block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a block: a SHA-256 of the previous block's key and this block's tokens."""
    digest = hashlib.sha256(parent)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


def namespace_key(*parts: object) -> bytes:
    """The root key of a namespace (what a block's bytes depend on besides its tokens)."""
    return hashlib.sha256(repr(parts).encode()).digest()
