"""The multi-format store and the reference attention path against dense computations."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierkv.batch import AttentionBatch
from tierkv.kv.attention.paged import PagedAttention
from tierkv.kv.formats.quant import (
    FORMATS,
    FULL,
    KVFormat,
    default_page_bytes,
    dequantize,
    quantize,
)
from tierkv.kv.store.kv_store import KVStore
from tierkv.kv.store.pool import PagePool

LAYERS, HEADS, HEAD_DIM = 2, 2, 32
FORMAT_LIST = list(FORMATS.values())


def _store(num_pages: int = 256, max_seqs: int = 4, max_len: int = 128) -> KVStore:
    pool = PagePool(num_pages, default_page_bytes(HEAD_DIM))
    return KVStore(pool, LAYERS, HEADS, HEAD_DIM, torch.float32, max_seqs, max_len)


def _dequantized(fmt: KVFormat, x: torch.Tensor, bits: int) -> torch.Tensor:
    """What the store should give back for ``x``, computed by the quantizer directly."""
    if not fmt.quantized:
        return x
    return dequantize(quantize(x, bits, fmt.group_size))


def _fill(store: KVStore, slot: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Reserve and write ``n`` random tokens into every layer of ``slot``; returns (k, v)."""
    store.reserve(torch.tensor([slot]), torch.tensor([n]))
    k = torch.randn(LAYERS, n, HEADS, HEAD_DIM, generator=gen) * 3
    v = torch.randn(LAYERS, n, HEADS, HEAD_DIM, generator=gen)
    for layer in range(LAYERS):
        store.write(layer, torch.full((n,), slot), torch.arange(n), k[layer], v[layer])
    return k, v


@pytest.mark.parametrize("fmt", FORMAT_LIST, ids=lambda f: f.name)
def test_gather_returns_the_dequantized_tokens_of_each_format(fmt: KVFormat) -> None:
    store = _store()
    gen = torch.Generator().manual_seed(0)
    # A slot of the format under test next to uncompressed and k4v2 slots, gathered together.
    formats = [fmt, FULL, FORMATS["k4v2"]]
    lengths = [77, 5, 40]
    slots = [store.acquire_slot(f) for f in formats]
    data = [_fill(store, s, n, gen) for s, n in zip(slots, lengths, strict=True)]
    keys, values = store.gather(1, torch.tensor(slots), max(lengths), torch.float32)
    for i, (f, n, (k, v)) in enumerate(zip(formats, lengths, data, strict=True)):
        want_k = _dequantized(f, k[1], f.key_bits).transpose(0, 1)
        want_v = _dequantized(f, v[1], f.value_bits).transpose(0, 1)
        torch.testing.assert_close(keys[i, :, :n], want_k, rtol=0, atol=0)
        torch.testing.assert_close(values[i, :, :n], want_v, rtol=0, atol=0)
    assert keys.isfinite().all() and values.isfinite().all()


def test_reused_pages_never_leak_stale_bytes_into_another_format() -> None:
    store = _store(num_pages=64)
    store.pool.arena.fill_(0xFF)  # every byte pattern a previous format could leave, NaN included
    gen = torch.Generator().manual_seed(1)
    long, short = store.acquire_slot(FORMATS["k4v2"]), store.acquire_slot(FORMATS["k8v4"])
    _fill(store, long, 100, gen)
    _fill(store, short, 3, gen)
    keys, values = store.gather(0, torch.tensor([long, short]), 100, torch.float32)
    assert keys.isfinite().all() and values.isfinite().all()


def _dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Causal softmax attention written out: q [n, Hq, D], k/v [T, Hkv, D] -> [n, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = torch.einsum("nhd,thd->hnt", q, k) / math.sqrt(q.shape[-1])
    k_pos = torch.arange(k.shape[0])
    visible = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - window
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnt,thd->nhd", probs, v)


@pytest.mark.parametrize("window", [None, 7])
def test_reference_attention_equals_dense_attention_over_dequantized_tokens(
    window: int | None,
) -> None:
    store = _store()
    gen = torch.Generator().manual_seed(2)
    formats = [FORMATS["k8v4"], FORMATS["k4v2"], FULL, FORMATS["k2v2"]]
    # Two requests decode one token, two prefill a chunk after some context.
    context, new = [30, 12, 0, 9], [1, 1, 20, 6]
    slots = [store.acquire_slot(f) for f in formats]
    totals = [c + n for c, n in zip(context, new, strict=True)]
    store.reserve(torch.tensor(slots), torch.tensor(totals))
    k_all = [torch.randn(t, HEADS, HEAD_DIM, generator=gen) for t in totals]
    v_all = [torch.randn(t, HEADS, HEAD_DIM, generator=gen) for t in totals]
    layer = 1
    for s, c, k, v in zip(slots, context, k_all, v_all, strict=True):
        if c:
            store.write(layer, torch.full((c,), s), torch.arange(c), k[:c], v[:c])
    batch = AttentionBatch.build(slots, context, new)
    q = torch.randn(sum(new), 2 * HEADS, HEAD_DIM, generator=gen)
    k_new = torch.cat([k[c:] for k, c in zip(k_all, context, strict=True)])
    v_new = torch.cat([v[c:] for v, c in zip(v_all, context, strict=True)])
    windows: list[int | None] = [None, window]
    out = PagedAttention(store, windows)(layer, q, k_new, v_new, batch)
    for i, f in enumerate(formats):
        start = batch.query_starts[i]
        rows = slice(start, start + new[i])
        want = _dense_attention(
            q[rows],
            _dequantized(f, k_all[i], f.key_bits),
            _dequantized(f, v_all[i], f.value_bits),
            torch.arange(context[i], totals[i]),
            window,
        )
        torch.testing.assert_close(out[rows], want, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["grow", "release"]),
            st.integers(0, 3),
            st.integers(1, 60),
            st.sampled_from(FORMAT_LIST),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_mixed_format_workload_keeps_exact_accounting(
    events: list[tuple[str, int, int, KVFormat]],
) -> None:
    store = _store(num_pages=120, max_len=64)
    pool = store.pool
    slots: dict[int, int] = {}
    lengths: dict[int, int] = {}
    freed: set[int] = set()
    for kind, req, n, fmt in events:
        if kind == "grow":
            if req not in slots:
                slots[req] = store.acquire_slot(fmt)
                lengths[req] = 0
            target = min(64, lengths[req] + n)
            if store.pages_to_grow(slots[req], target) > pool.num_free:
                continue
            before = _owned(store, slots.values())
            store.reserve(torch.tensor([slots[req]]), torch.tensor([target]))
            new = set(_owned(store, slots.values()).tolist()) - set(before.tolist())
            # Freed pages are handed out again before untouched ones.
            assert len(new & freed) == min(len(new), len(freed))
            freed -= new
            lengths[req] = target
        elif req in slots:
            freed |= set(_owned(store, [slots[req]]).tolist())
            store.release_slot(slots.pop(req))
            lengths.pop(req)
        expected = sum(store.pages_for(lengths[r], store.format_of(slots[r])) for r in lengths)
        owned = _owned(store, slots.values())
        assert pool.num_used == expected == owned.numel() == owned.unique().numel()
        assert pool.num_used + pool.num_free == pool.num_pages
    for slot in slots.values():
        store.release_slot(slot)
    assert pool.num_free == pool.num_pages


def _owned(store: KVStore, slots: Iterable[int]) -> torch.Tensor:
    held = [
        store.page_table[s, layer, h, : store.num_pages[s, layer, h]]
        for s in slots
        for layer in range(LAYERS)
        for h in range(HEADS)
    ]
    return torch.cat(held) if held else torch.empty(0, dtype=torch.int64)


def test_a_format_that_does_not_fit_the_head_dim_is_refused() -> None:
    store = _store()
    with pytest.raises(ValueError, match="does not divide head dim"):
        store.acquire_slot(FORMATS["k4v2"].with_group_size(24))


def test_group_sizes_beyond_the_head_dim_are_one_format() -> None:
    store = _store()
    a = store.acquire_slot(FORMATS["k4v2"].with_group_size(64))
    b = store.acquire_slot(FORMATS["k4v2"].with_group_size(1000))
    assert store.format_of(a) == store.format_of(b) == FORMATS["k4v2"].with_group_size(HEAD_DIM)
