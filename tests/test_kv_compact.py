"""The native compaction (``native.compact_tiers``) writes the bytes the torch path writes."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierkv.kv.backends import REGISTRY
from tierkv.kv.backends.cpu import ops as native
from tierkv.kv.formats.quant import default_page_bytes
from tierkv.kv.policy.compact import apply_decisions
from tierkv.kv.policy.spec import KVPolicy
from tierkv.kv.store.kv_store import HIGH, LOW, KVStore
from tierkv.kv.store.pool import PagePool

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"no native kernels: {native.unavailable_reason()}"
)

LAYERS, HEADS, HEAD_DIM = 2, 2, 64


def _filled_store(policy: str, lengths: list[int], seed: int) -> tuple[KVStore, torch.Tensor]:
    """Tiered slots holding ``lengths`` tokens each, both tiers populated by a first random
    decision, with random scores."""
    pool = PagePool(512, default_page_bytes(HEAD_DIM))
    store = KVStore(pool, LAYERS, HEADS, HEAD_DIM, torch.float32, 4, 256)
    gen = torch.Generator().manual_seed(seed)
    parsed = KVPolicy.parse(policy)
    slots = torch.tensor([store.acquire_slot(parsed, n) for n in lengths])
    store.reserve(slots, torch.tensor(lengths))
    for slot, n in zip(slots.tolist(), lengths, strict=True):
        for layer in range(LAYERS):
            k = torch.randn(n, HEADS, HEAD_DIM, generator=gen) * 3
            store.write(layer, torch.full((n,), slot), torch.arange(n), k, torch.randn_like(k))
    high = store.read_tier(None, slots, HIGH, ("score",))
    scores = torch.rand(high.fields["score"].shape[:3], generator=gen)
    for layer in range(LAYERS):
        store.write_scores(layer, slots, HIGH, scores[:, layer * HEADS : (layer + 1) * HEADS])
    _decide(store, None, slots, gen, native=False)
    return store, slots


def _decide(
    store: KVStore, layer: int | None, slots: torch.Tensor, gen: torch.Generator, native: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A random decision: each token kept high, sent low or pruned (low ones never promoted)."""
    high, low = store.read_tier(layer, slots, HIGH), store.read_tier(layer, slots, LOW)
    valid = torch.cat([high.valid, low.valid], -1)
    width = high.valid.shape[-1]
    fate = torch.randint(0, 3, valid.shape, generator=gen)
    is_low = torch.arange(valid.shape[-1]) >= width
    to_high, to_low = valid & ~is_low & (fate == 0), valid & (fate == 1)
    compactor = REGISTRY["cpu"] if native else None
    apply_decisions(store, layer, slots, to_high, to_low, width, compactor)
    return to_high, to_low, width


@settings(max_examples=25, deadline=None)
@given(
    policy=st.sampled_from(["k8v4/k4v2-g32", "k8v8/k4v4-g64", "k4v2/k2v2-g32", "k8v4/k2v2-g16"]),
    lengths=st.lists(st.integers(1, 90), min_size=1, max_size=3),
    every_layer=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_native_compaction_writes_the_torch_paths_bytes(
    policy: str, lengths: list[int], every_layer: bool, seed: int
) -> None:
    store, slots = _filled_store(policy, lengths, seed)
    twin = copy.deepcopy(store)
    layer = None if every_layer else seed % LAYERS
    _decide(store, layer, slots, torch.Generator().manual_seed(seed + 1), native=False)
    _decide(twin, layer, slots, torch.Generator().manual_seed(seed + 1), native=True)
    assert torch.equal(store.count, twin.count) and torch.equal(store.held, twin.held)
    assert torch.equal(store.tables, twin.tables)
    assert torch.equal(store.pool.arena, twin.pool.arena)
    assert store.pool.num_free == twin.pool.num_free


def test_a_mask_past_a_heads_tokens_is_refused() -> None:
    store, slots = _filled_store("k8v4/k4v2-g32", [40], seed=0)
    count = store.count[slots, 0, :, HIGH]
    width = store.read_tier(0, slots, HIGH).valid.shape[-1]
    keep = torch.zeros(1, HEADS, width, dtype=torch.bool)
    keep[0, 0, int(count[0, 0]) :] = True  # columns past the head's own tokens
    empty = torch.zeros(1, HEADS, store.read_tier(0, slots, LOW).valid.shape[-1], dtype=torch.bool)
    arena = store.pool.arena.clone()
    with pytest.raises(RuntimeError, match="a mask names token"):
        native.compact_tiers(store, 0, slots, keep, torch.zeros_like(keep), empty)
    assert torch.equal(store.pool.arena, arena)  # checked before anything moved
