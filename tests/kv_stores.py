"""Stores the KV tests share: uniform slots of random tokens, and tiered slots driven through
prompts and decode steps."""

from __future__ import annotations

import torch

from tierkv.batch import AttentionBatch
from tierkv.kv.attention.paged import PagedAttention
from tierkv.kv.formats.quant import KVFormat, default_page_bytes
from tierkv.kv.formats.rotation import rotate
from tierkv.kv.policy.spec import KVPolicy
from tierkv.kv.store.kv_store import KVStore
from tierkv.kv.store.pool import PagePool

LAYERS, KV_HEADS, LAYER = 2, 2, 1
# Differentiated policies whose thresholds both demote and prune random tokens within a few
# steps; their slots' prompts differ in length, so their tiers differ in size.
TIERED_PROMPTS = [70, 41, 96]
TIERED_STEPS = 4
# Ragged uniform contexts: only the new token, a page boundary or two, a long request.
CONTEXT = [0, 37, 130, 5]


def uniform_store(
    spec: KVFormat | KVPolicy, head_dim: int
) -> tuple[KVStore, torch.Tensor, torch.Tensor, int]:
    """Slots of a uniform format or policy holding ``CONTEXT[i] + 1`` random tokens at layer
    ``LAYER``, over stale arena bytes. Returns the store, the slots, their lengths and the
    index of their format."""
    pool = PagePool(200, default_page_bytes(head_dim))
    pool.arena.fill_(0xFF)  # stale bytes of any format, NaN patterns included
    store = KVStore(pool, LAYERS, KV_HEADS, head_dim, torch.float32, len(CONTEXT), 512)
    gen = torch.Generator().manual_seed(head_dim)
    slots = torch.tensor([store.acquire_slot(spec) for _ in CONTEXT])
    lens = torch.tensor(CONTEXT) + 1
    store.reserve(slots, lens)
    for s, n in zip(slots.tolist(), lens.tolist(), strict=True):
        k = torch.randn(n, KV_HEADS, head_dim, generator=gen) * 3
        v = torch.randn(n, KV_HEADS, head_dim, generator=gen)
        store.write(LAYER, torch.full((n,), s), torch.arange(n), k, v)
    fmt = spec.high if isinstance(spec, KVPolicy) else spec
    return store, slots, lens, store.register(fmt)


def tiered_store(
    spec: str,
    q_heads: int,
    window: int | None,
    *,
    head_dim: int = 64,
    backend: str = "fast",
    seed: int = 0,
) -> tuple[KVStore, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots of a tiered ``spec`` driven through their prompts and ``TIERED_STEPS`` decode
    steps by ``backend`` (decisions after each), over stale arena bytes, then the next step's
    token written to layer ``LAYER`` (whose sliding window is ``window``). Returns the store,
    the slots, the step's queries [B, Hq, head_dim] and their positions [B]."""
    pool = PagePool(700, default_page_bytes(head_dim))
    pool.arena.fill_(0xFF)  # stale bytes of any format, NaN patterns included
    store = KVStore(pool, LAYERS, KV_HEADS, head_dim, torch.float32, len(TIERED_PROMPTS), 256)
    policy = KVPolicy.parse(spec)
    slots = torch.tensor([store.acquire_slot(policy, n) for n in TIERED_PROMPTS])
    attention = PagedAttention(store, [None, window], backend=backend)
    gen = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = torch.randn(n, q_heads, head_dim, generator=gen) * 2
        k = torch.randn(n, KV_HEADS, head_dim, generator=gen) * 2
        return q, k, torch.randn(n, KV_HEADS, head_dim, generator=gen)

    context = torch.zeros(len(TIERED_PROMPTS), dtype=torch.int64)
    for step in range(TIERED_STEPS + 1):
        new = TIERED_PROMPTS if step == 0 else [1] * len(TIERED_PROMPTS)
        batch = AttentionBatch.build(slots.tolist(), context.tolist(), new)
        context = context + torch.tensor(new)
        store.reserve(slots, context)
        q, k, v = tokens(sum(new))
        for layer in range(LAYERS):
            attention(layer, q, k, v, batch)
        attention.finish_step(batch)
    store.reserve(slots, context + 1)
    q, k, v = tokens(len(TIERED_PROMPTS))
    if policy.rotate:
        # In the basis PagedAttention stored the earlier tokens in, as the engine passes them.
        q, k, v = rotate(q, "query"), rotate(k, "in"), rotate(v, "in")
    store.write(LAYER, slots, context, k, v)
    return store, slots, q, context
