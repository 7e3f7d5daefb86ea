"""The fast decode path (``tierkv.kv.backends.torch.ops``) against the reference path, format by
format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tierkv import LLM
from tierkv.batch import AttentionBatch
from tierkv.kv.attention.paged import PagedAttention
from tierkv.kv.backends.torch import ops as fast
from tierkv.kv.formats.quant import FORMATS, FULL, KVFormat, default_page_bytes
from tierkv.kv.store.kv_store import KVStore
from tierkv.kv.store.pool import PagePool

LAYERS, KV_HEADS, Q_HEADS = 2, 2, 6
QUANTIZED = [f for f in FORMATS.values() if f.quantized]


def _run(
    backend: str,
    formats: list[KVFormat],
    context: list[int],
    window: int | None,
    *,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    stale: bool = False,
) -> torch.Tensor:
    """One decode step (one new token per request) at layer 1 after ``context`` tokens."""
    pool = PagePool(512, default_page_bytes(head_dim))
    if stale:
        pool.arena.fill_(0xFF)  # stale bytes of any format, NaN patterns included
    store = KVStore(pool, LAYERS, KV_HEADS, head_dim, dtype, len(formats), 512)
    gen = torch.Generator().manual_seed(seed)
    slots = [store.acquire_slot(f) for f in formats]
    store.reserve(torch.tensor(slots), torch.tensor([c + 1 for c in context]))
    layer = 1
    for s, c in zip(slots, context, strict=True):
        k = torch.randn(c, KV_HEADS, head_dim, generator=gen) * 3
        v = torch.randn(c, KV_HEADS, head_dim, generator=gen)
        store.write(layer, torch.full((c,), s), torch.arange(c), k.to(dtype), v.to(dtype))
    n = len(slots)
    q = torch.randn(n, Q_HEADS, head_dim, generator=gen).to(dtype)
    k_new = torch.randn(n, KV_HEADS, head_dim, generator=gen).to(dtype)
    v_new = torch.randn(n, KV_HEADS, head_dim, generator=gen).to(dtype)
    batch = AttentionBatch.build(slots, context, [1] * n)
    attention = PagedAttention(store, [None, window], backend=backend)
    return attention(layer, q, k_new, v_new, batch)


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
def test_fast_decode_equals_the_reference_for_each_format(
    fmt: KVFormat, window: int | None
) -> None:
    # Ragged lengths: a page boundary, a short request, a long one.
    context = [0, 37, 130, 5]
    formats = [fmt] * len(context)
    want = _run("reference", formats, context, window)
    got = _run("fast", formats, context, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("name", ["k8v4", "k4v2", "k4v1", "k2v2"])
def test_fast_decode_equals_the_reference_for_each_group_size(name: str, group_size: int) -> None:
    formats = [FORMATS[name].with_group_size(group_size)] * 2
    want = _run("reference", formats, [70, 200], None, head_dim=128)
    got = _run("fast", formats, [70, 200], None, head_dim=128)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fast_decode_in_bfloat16_matches_within_its_rounding() -> None:
    formats = [FORMATS["k4v2"], FORMATS["k8v4"], FORMATS["k4v2"]]
    context = [300, 64, 11]
    want = _run("reference", formats, context, None, dtype=torch.bfloat16)
    got = _run("fast", formats, context, None, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("head_dim", [64, 24])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_uncompressed_slots_read_in_place_match_the_reference(
    dtype: torch.dtype, window: int | None, head_dim: int
) -> None:
    # The fast backend reads FULL pages in place (native.decode_full) where the kernel builds;
    # a head dim that is not a whole number of vectors reads its last one partly.
    context = [0, 37, 130, 5, 300]
    formats = [FULL] * len(context)
    options = {"dtype": dtype, "stale": True, "head_dim": head_dim}
    want = _run("reference", formats, context, window, **options)
    got = _run("fast", formats, context, window, **options)
    assert got.dtype == dtype and got.isfinite().all()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tolerance)


def test_mixed_batches_and_stale_pages_fall_back_per_format() -> None:
    # Uncompressed rows keep the reference path; every format's rows still match, and bytes
    # left by another format in reused pages never reach the output.
    formats = [FORMATS["k4v2"], FULL, FORMATS["k8v8"], FORMATS["k2v2"]]
    context = [50, 20, 3, 90]
    want = _run("reference", formats, context, 16, stale=True)
    got = _run("fast", formats, context, 16, stale=True)
    assert got.isfinite().all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_formats_the_fast_path_cannot_serve_are_refused_by_supports() -> None:
    assert not fast.supports(FULL, 64)
    assert fast.supports(FORMATS["k4v1"], 64)
    # Groups of 4 channels do not fill whole bytes at 1 bit: the reference path serves them.
    assert not fast.supports(FORMATS["k4v1"].with_group_size(4), 64)


def test_the_backend_is_chosen_by_name(checkpoints: dict[str, Path]) -> None:
    store = KVStore(PagePool(8, default_page_bytes(64)), 1, 1, 64, torch.float32, 1, 64)
    assert PagedAttention(store, [None]).backend == "reference"
    assert PagedAttention(store, [None], backend="fast").backend == "fast"
    # Tiered chunks take the fast dense paths where a backend of the chain offers them (the
    # backends' own flag, not their names): the reference chain stays on the oracle.
    assert not PagedAttention(store, [None])._fused
    assert PagedAttention(store, [None], backend="torch")._fused
    with pytest.raises(ValueError, match="attention backend"):
        PagedAttention(store, [None], backend="flashinfer")
    llm = LLM(str(checkpoints["llama"]), attention_backend="fast", kv_cache_memory="8MiB")
    assert llm.engine.runner.attention.backend == "fast"
