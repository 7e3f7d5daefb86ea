"""The native decode kernel (``tierkv.kv.native``) against the fast and reference paths."""

from __future__ import annotations

import math

import pytest
import torch

from tierkv.kv import fast, native
from tierkv.kv.attention import AttentionBatch, PagedAttention
from tierkv.kv.partial import merge
from tierkv.kv.pool import PagePool
from tierkv.kv.quant import FORMATS, KVFormat, default_page_bytes
from tierkv.kv.store import HIGH, KVStore

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.unavailable_reason()}"
)

LAYERS, KV_HEADS, Q_HEADS = 2, 2, 6
LAYER = 1
QUANTIZED = [f for f in FORMATS.values() if f.quantized]
# Ragged: no context (only the new token), a page boundary or two, a short and a long request.
CONTEXT = [0, 37, 130, 5]


def _store(
    fmt: KVFormat, lens: list[int], head_dim: int, seed: int = 0, reserve: int = 0
) -> tuple[KVStore, torch.Tensor, int]:
    """A store over stale arena bytes holding ``lens[i]`` random tokens for request ``i``
    (with room for ``reserve`` more)."""
    pool = PagePool(256, default_page_bytes(head_dim))
    pool.arena.fill_(0xFF)  # stale bytes of any format, NaN patterns included
    store = KVStore(pool, LAYERS, KV_HEADS, head_dim, torch.float32, len(lens), 512)
    gen = torch.Generator().manual_seed(seed)
    slots = torch.tensor([store.acquire_slot(fmt) for _ in lens])
    store.reserve(slots, torch.tensor(lens) + reserve)
    for s, n in zip(slots.tolist(), lens, strict=True):
        for layer in range(LAYERS):
            k = torch.randn(n, KV_HEADS, head_dim, generator=gen) * 3
            v = torch.randn(n, KV_HEADS, head_dim, generator=gen)
            store.write(layer, torch.full((n,), s), torch.arange(n), k, v)
    return store, slots, store.register(fmt)


def _query(batch: int, head_dim: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, Q_HEADS, head_dim, generator=gen)


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("head_dim", [64, 32])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
def test_native_decode_equals_the_fast_and_reference_paths(
    fmt: KVFormat, group_size: int, head_dim: int, window: int | None
) -> None:
    fmt = fmt.with_group_size(group_size)
    n = len(CONTEXT)
    store, slots, f = _store(fmt, CONTEXT, head_dim, reserve=1)
    q = _query(n, head_dim)
    gen = torch.Generator().manual_seed(2)
    k_new, v_new = torch.randn(2, n, KV_HEADS, head_dim, generator=gen)
    # The reference backend writes the step's token, then attends over everything kept.
    reference = PagedAttention(store, [None] * LAYERS, backend="reference")
    reference.sliding_windows[LAYER] = window
    batch = AttentionBatch.build(slots.tolist(), CONTEXT, [1] * n)
    want_ref = reference(LAYER, q, k_new, v_new, batch)
    lens = torch.tensor(CONTEXT) + 1
    got = native.decode(store, LAYER, q, slots, lens, window, f)
    # fast.decode scales a float32 query in place: give it a copy.
    want_fast = fast.decode(store, LAYER, q.clone(), slots, lens, window, f)
    assert got.isfinite().all()
    torch.testing.assert_close(got, want_fast, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got, want_ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["k8v4", "k4v2", "k2v2"])
def test_partial_ranges_merge_into_the_full_attention(name: str) -> None:
    head_dim = 64
    lens = torch.tensor([1, 38, 131, 6])
    store, slots, f = _store(FORMATS[name], lens.tolist(), head_dim)
    q = _query(len(lens), head_dim)
    per_page = store.layouts[f].tokens_per_page
    pages = store.tables[slots, LAYER, :, HIGH, : -(-int(lens.max()) // per_page)]
    zero = torch.zeros_like(lens)
    full, full_lse = native.partial(store, LAYER, q, pages, zero, lens, f)
    # Splits inside a page, on a page boundary, and empty on either side.
    split = torch.minimum(torch.tensor([0, per_page, 50, 6]), lens)
    head, head_lse = native.partial(store, LAYER, q, pages, zero, split, f)
    tail, tail_lse = native.partial(store, LAYER, q, pages, split, lens, f)
    out, lse = merge(head, head_lse, tail, tail_lse)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-5)
    assert torch.isinf(head_lse[0]).all() and (head[0] == 0).all()
    assert torch.isinf(tail_lse[3]).all()

    # The log-sum-exp is that of the scaled logits over the range.
    keys, _ = store.gather(LAYER, slots, int(lens.max()), torch.float32)
    group = Q_HEADS // KV_HEADS
    qg = q.view(len(lens), KV_HEADS, group, head_dim)
    logits = qg @ keys.transpose(-1, -2) / math.sqrt(head_dim)
    visible = torch.arange(keys.shape[2]) < lens[:, None]
    want = logits.masked_fill(~visible[:, None, None], -torch.inf).logsumexp(-1)
    torch.testing.assert_close(full_lse, want.reshape(len(lens), Q_HEADS), rtol=1e-5, atol=1e-5)


def test_bfloat16_queries_give_bfloat16_outputs() -> None:
    lens = torch.tensor([70, 3])
    store, slots, f = _store(FORMATS["k8v4"], lens.tolist(), 64)
    q = _query(2, 64)
    got = native.decode(store, LAYER, q.bfloat16(), slots, lens, None, f)
    want = native.decode(store, LAYER, q.bfloat16().float(), slots, lens, None, f)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-2)


def test_pages_outside_the_arena_are_refused() -> None:
    lens = torch.tensor([10])
    store, slots, f = _store(FORMATS["k4v2"], lens.tolist(), 64)
    pages = store.tables[slots, LAYER, :, HIGH, :1].clone()
    pages[0, 1, 0] = store.pool.num_pages
    q = _query(1, 64)
    with pytest.raises(RuntimeError, match="outside the arena"):
        native.partial(store, LAYER, q, pages, torch.tensor([0]), lens, f)
    with pytest.raises(RuntimeError, match="outside its page table"):
        native.partial(store, LAYER, q, pages[..., :0], torch.tensor([0]), lens, f)


def test_supports_matches_the_fast_path() -> None:
    for fmt in FORMATS.values():
        for head_dim in (16, 24, 32, 64, 128):
            for group_size in (4, 32, 64, 128):
                g = fmt.with_group_size(group_size) if fmt.quantized else fmt
                if head_dim % min(group_size, head_dim):
                    continue
                assert native.supports(g, head_dim) == fast.supports(g, head_dim)
