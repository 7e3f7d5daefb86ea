"""Property tests of the page pool and the per-head page tables."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierkv.kv.formats.layout import PageField, PageLayout
from tierkv.kv.formats.quant import default_page_bytes
from tierkv.kv.store.kv_store import KVStore
from tierkv.kv.store.pool import PagePool


@settings(max_examples=50, deadline=None)
@given(ops=st.lists(st.integers(-8, 8), min_size=1, max_size=60), pages=st.integers(1, 40))
def test_pool_alloc_free_invariants(ops: list[int], pages: int) -> None:
    pool = PagePool(pages, 64)
    held: list[torch.Tensor] = []
    for op in ops:
        if op > 0:
            if op > pool.num_free:
                continue
            got = pool.alloc(op)
            assert got.numel() == op
            held.append(got)
        elif held:
            pool.free(held.pop(abs(op) % len(held)))
        owned = torch.cat(held) if held else torch.empty(0, dtype=torch.int64)
        assert owned.unique().numel() == owned.numel()  # no page handed out twice
        assert pool.num_used + pool.num_free == pool.num_pages
        assert pool.num_used == owned.numel()
    for h in held:
        pool.free(h)
    assert pool.num_free == pool.num_pages
    assert sorted(pool.alloc(pages).tolist()) == list(range(pages))


def test_freed_pages_are_reused_first() -> None:
    pool = PagePool(10, 64)
    a = pool.alloc(3)
    pool.alloc(2)
    pool.free(a)
    assert set(pool.alloc(3).tolist()) == set(a.tolist())


def test_layout_packs_fields_aligned_within_the_page() -> None:
    layout = PageLayout((PageField("a", torch.uint8, 5), PageField("b", torch.float32, 3)), 256)
    tokens = layout.tokens_per_page
    offsets = layout.offsets()
    assert offsets["b"] % 16 == 0 and offsets["b"] >= tokens * 5
    assert offsets["b"] + tokens * 12 <= 256
    pool = PagePool(4, 256)
    views = pool.fields(layout)
    views["b"][2, 1] = torch.tensor([1.0, 2.0, 3.0])
    views["a"][2] = 7
    assert views["b"][2, 1].tolist() == [1.0, 2.0, 3.0]
    assert views["a"][2].eq(7).all() and views["a"][1].eq(0).all()


@settings(max_examples=25, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(["grow", "release"]), st.integers(0, 3), st.integers(1, 60)),
        min_size=1,
        max_size=40,
    )
)
def test_store_reserve_release_keeps_exact_accounting(events: list[tuple[str, int, int]]) -> None:
    layers, heads, head_dim = 2, 3, 8
    page_bytes = default_page_bytes(head_dim)
    pool = PagePool(200, page_bytes)
    store = KVStore(pool, layers, heads, head_dim, torch.float32, 4, 64)
    slots: dict[int, int] = {}  # request -> slot
    lengths: dict[int, int] = {}
    for kind, req, n in events:
        if kind == "grow":
            if req not in slots:
                slots[req] = store.acquire_slot()
                lengths[req] = 0
            target = min(64, lengths[req] + n)
            if store.pages_to_grow(slots[req], target) > pool.num_free:
                continue
            store.reserve(torch.tensor([slots[req]]), torch.tensor([target]))
            lengths[req] = target
        elif req in slots:
            store.release_slot(slots.pop(req))
            lengths.pop(req)
        expected = sum(store.pages_for(n) for n in lengths.values())
        assert pool.num_used == expected
        assert pool.num_used + pool.num_free == pool.num_pages
        held = [
            store.page_table[s, layer, h, : store.num_pages[s, layer, h]]
            for s in slots.values()
            for layer in range(layers)
            for h in range(heads)
        ]
        owned = torch.cat(held) if held else torch.empty(0, dtype=torch.int64)
        assert owned.unique().numel() == owned.numel() == pool.num_used
    for slot in slots.values():
        store.release_slot(slot)
    assert pool.num_free == pool.num_pages


def test_store_write_then_gather_round_trips_per_head() -> None:
    head_dim = 8
    page_bytes = default_page_bytes(head_dim)
    pool = PagePool(64, page_bytes)
    store = KVStore(pool, 2, 2, head_dim, torch.float32, 3, 100)
    a, b = store.acquire_slot(), store.acquire_slot()
    store.reserve(torch.tensor([a, b]), torch.tensor([37, 5]))
    k = torch.randn(42, 2, head_dim)
    v = torch.randn(42, 2, head_dim)
    slots = torch.tensor([a] * 37 + [b] * 5)
    index = torch.cat([torch.arange(37), torch.arange(5)])
    store.write(1, slots, index, k, v)
    keys, values = store.gather(1, torch.tensor([a, b]), 37, torch.float32)
    torch.testing.assert_close(keys[0, :, :37], k[:37].transpose(0, 1))
    torch.testing.assert_close(values[1, :, :5], v[37:].transpose(0, 1))


@settings(max_examples=50, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from("asf"), st.integers(0, 7)), max_size=80))
def test_shared_pages_return_with_their_last_reference(ops: list[tuple[str, int]]) -> None:
    """alloc / share / free in any order: a page is free exactly when no reference is left,
    and ``refs`` counts the references handed out."""
    pool = PagePool(12, 64)
    refs: list[int] = []  # one entry per reference held
    for op, n in ops:
        if op == "a" and 0 < n <= pool.num_free:
            refs += pool.alloc(n).tolist()
        elif op == "s" and refs:
            page = refs[n % len(refs)]
            pool.share(torch.tensor([page]))
            refs.append(page)
        elif op == "f" and refs:
            pool.free(torch.tensor([refs.pop(n % len(refs))]))
        counts = torch.bincount(torch.tensor(refs, dtype=torch.int64), minlength=12)
        assert torch.equal(pool.refs, counts.to(torch.int32))
        free = set(pool._free[: pool.num_free].tolist())
        assert free == {p for p in range(12) if counts[p] == 0}
    unused = [p for p in range(12) if p not in refs]
    if unused:
        with pytest.raises(RuntimeError, match="double free"):
            pool.free(torch.tensor(unused[:1]))
        assert pool.refs[unused[0]] == 0  # a refused free changes nothing
