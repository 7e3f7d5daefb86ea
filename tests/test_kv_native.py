"""The native decode kernel (``tierkv.kv.backends.cpu.ops``) against the fast and reference paths:
uniform
slots, their residual rings read in place, and both tiers of differentiated slots."""

from __future__ import annotations

import math

import pytest
import torch
from kv_stores import tiered_store

from tierkv.batch import AttentionBatch
from tierkv.kv.attention.paged import PagedAttention, tiered
from tierkv.kv.backends.cpu import ops as native
from tierkv.kv.backends.cpu.layout import ring_tables
from tierkv.kv.backends.partial import merge
from tierkv.kv.backends.torch import ops as fast
from tierkv.kv.formats.quant import FORMATS, KVFormat, default_page_bytes
from tierkv.kv.policy.spec import KVPolicy
from tierkv.kv.store.kv_store import HIGH, LOW, RESIDUAL, KVStore
from tierkv.kv.store.pool import PagePool

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


def _query(batch: int, head_dim: int, seed: int = 1, q_heads: int = Q_HEADS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, q_heads, head_dim, generator=gen)


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


@pytest.mark.parametrize("group", range(1, 10))
@pytest.mark.parametrize("name", ["k4v2", "full"])
def test_every_gqa_group_equals_the_reference(name: str, group: int) -> None:
    """Query heads per KV head from 1 to 8 each run their own instantiation of the kernel,
    more than 8 the generic one; uncompressed slots go through the ring path."""
    n = len(CONTEXT)
    store, slots, f = _store(FORMATS[name], CONTEXT, 64, reserve=1)
    q = _query(n, 64, q_heads=group * KV_HEADS)
    gen = torch.Generator().manual_seed(2)
    k_new, v_new = torch.randn(2, n, KV_HEADS, 64, generator=gen)
    reference = PagedAttention(store, [None] * LAYERS, backend="reference")
    want = reference(LAYER, q, k_new, v_new, AttentionBatch.build(slots.tolist(), CONTEXT, [1] * n))
    lens = torch.tensor(CONTEXT) + 1
    if name == "full":
        got = native.decode_full(store, LAYER, q, slots, lens, None)
    else:
        got = native.decode(store, LAYER, q, slots, lens, None, f)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


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


# Residual windows of several ring sizes (8-token FULL pages at head dim 32 in float32: rings
# of 8, 8, 24 and 32 tokens) and none, in one batch; prompts shorter than the window, and
# long enough for the ring to have wrapped.
# Unrotated (``h=0``): the kernels are called directly beside a PagedAttention, which would
# otherwise rotate its queries and not theirs.
RING_POLICIES = ["k8v4:r=8,h=0", "k8v4:r=3,h=0", "k8v4:r=0,h=0", "k8v4:r=20,h=0", "k8v4:h=0"]
RING_PROMPTS = [37, 2, 50, 13, 70]


def _ring_store(dtype: torch.dtype, seed: int = 0) -> tuple[KVStore, torch.Tensor]:
    """A store over stale arena bytes whose slots keep residual windows (``RING_POLICIES``),
    holding ``RING_PROMPTS`` random tokens in every layer."""
    pool = PagePool(400, default_page_bytes(32))
    pool.arena.fill_(0xFF)  # stale bytes of any format, NaN patterns included
    store = KVStore(pool, LAYERS, KV_HEADS, 32, dtype, len(RING_POLICIES), 256)
    slots = torch.tensor([store.acquire_slot(KVPolicy.parse(p)) for p in RING_POLICIES])
    gen = torch.Generator().manual_seed(seed)
    store.reserve(slots, torch.tensor(RING_PROMPTS))
    for s, n in zip(slots.tolist(), RING_PROMPTS, strict=True):
        for layer in range(LAYERS):
            k = torch.randn(n, KV_HEADS, 32, generator=gen) * 3
            v = torch.randn(n, KV_HEADS, 32, generator=gen)
            store.write(layer, torch.full((n,), s), torch.arange(n), k.to(dtype), v.to(dtype))
    return store, slots


@pytest.mark.parametrize("window", [None, 5, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_ring_read_in_place_equals_the_torch_residual_path_and_the_reference(
    dtype: torch.dtype, window: int | None
) -> None:
    store, slots = _ring_store(dtype)
    f = int(store.slot_format[slots[0], HIGH])
    n = len(RING_PROMPTS)
    reference = PagedAttention(store, [None, window], backend="reference")
    gen = torch.Generator().manual_seed(3)
    context = torch.tensor(RING_PROMPTS)
    for _ in range(3):  # decode steps: the rings' newest entry moves on
        lens = context + 1
        store.reserve(slots, lens)
        q = torch.randn(n, Q_HEADS, 32, generator=gen).to(dtype)
        k, v = (torch.randn(n, KV_HEADS, 32, generator=gen).to(dtype) for _ in range(2))
        store.write(0, slots, context, k, v)
        # The torch path's entries are read before the step's write, as attention.py does.
        before = store.read_residual(LAYER, slots)
        batch = AttentionBatch.build(slots.tolist(), context.tolist(), [1] * n)
        want_ref = reference(LAYER, q, k, v, batch)  # writes the step's token, then attends
        residual = before.append(k[:, :, None], v[:, :, None], context[:, None])
        want = fast.decode(store, LAYER, q.float(), slots, lens, window, f, residual=residual)
        cache: dict = {}
        got = native.decode(store, LAYER, q.float(), slots, lens, window, f, cache)
        assert got.isfinite().all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want_ref, rtol=1e-5, atol=2e-5)
        # The cached ring tables serve the step's other layers (and only rings hold these).
        other = native.decode(store, 0, q.float(), slots, lens, window, f, cache)
        assert other.isfinite().all() and not torch.equal(other, got)
        context = lens


def test_a_ring_smaller_than_its_window_is_refused() -> None:
    store, slots = _ring_store(torch.float32)
    f = int(store.slot_format[slots[0], HIGH])
    lens = torch.tensor(RING_PROMPTS)
    rings = ring_tables(store, slots)
    assert rings is not None
    pages, size, window = rings
    q = _query(len(lens), 32)
    table = store.tables[slots, LAYER, :, HIGH, :10]
    ring = native.Ring(pages[LAYER], size, window + size)
    with pytest.raises(RuntimeError, match="not whole pages of its ring table"):
        native.partial(store, LAYER, q, table, torch.zeros_like(lens), lens, f, ring=ring)


@pytest.mark.parametrize("window", [None, 23])
@pytest.mark.parametrize("q_heads", [4, 6])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("formats", ["k8v4/k4v2", "k8v8/k4v4", "k4v2/k2v2"])
def test_tiered_decode_equals_tiered_attend(
    formats: str, group_size: int, q_heads: int, window: int | None
) -> None:
    spec = f"{formats}-g{group_size}:ah=10,al=4,w=8,sw=16"
    store, slots, q, query_pos = tiered_store(spec, q_heads, window)
    counts = store.count[slots, LAYER, :, :RESIDUAL]
    # Both tiers hold tokens, heads hold different numbers, and some tokens were pruned.
    assert (counts[..., LOW] > 0).all() and counts.sum(-1).unique().numel() > 1
    assert (counts.sum(-1) < (query_pos + 1)[:, None]).all()
    want = tiered.attend(store, LAYER, q[:, None], slots, query_pos[:, None], window)
    out, probs = native.tiered_decode(store, LAYER, q, slots, query_pos, window)
    # Stored values are rotated (x M, M unnormalised: about 8x the model's at head dim 64), and
    # an output element can be a small sum of them: float32 order differences reach 3e-5.
    torch.testing.assert_close(out, want.out[:, 0], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(probs, want.probs[:, :, :, 0], rtol=1e-5, atol=1e-6)
    # What the policy takes from them: each token's largest probability over its group.
    received = store.tiers.received(want.probs, slots, query_pos[:, None])
    torch.testing.assert_close(probs.amax(2), received, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 23])
@pytest.mark.parametrize("formats", ["k8v4/k4v2", "k4v2/k2v2"])
def test_native_scores_equal_the_torch_update(formats: str, window: int | None) -> None:
    spec = f"{formats}-g32:ah=10,al=4,w=8,sw=16"
    store, slots, q, query_pos = tiered_store(spec, 4, window)
    arena = store.pool.arena.clone()
    out, probs = native.tiered_decode(store, LAYER, q, slots, query_pos, window)
    assert probs is not None
    att = tiered.TieredAttention(out[:, None], probs[:, :, :, None])
    tiered.add_received(store, LAYER, slots, query_pos[:, None], att)
    want = store.pool.arena.clone()
    store.pool.arena.copy_(arena)
    scored, none = native.tiered_decode(store, LAYER, q, slots, query_pos, window, score=True)
    # The same output, and the same float32 sums, so the same bytes; something was added.
    assert none is None and torch.equal(scored, out)
    assert torch.equal(store.pool.arena, want) and not torch.equal(arena, want)
