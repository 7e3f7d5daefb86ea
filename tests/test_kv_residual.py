"""The residual window of uniform quantized policies: each query sees its newest ``r`` tokens
uncompressed and older ones quantized, whatever the chunking, on both attention backends."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tierkv import LLM, SamplingParams
from tierkv.batch import AttentionBatch
from tierkv.kv.attention.paged import PagedAttention
from tierkv.kv.formats.quant import default_page_bytes
from tierkv.kv.formats.rotation import rotate
from tierkv.kv.policy.spec import KVPolicy
from tierkv.kv.store.kv_store import KVStore
from tierkv.kv.store.pool import PagePool

KV_HEADS, Q_HEADS, HEAD_DIM, LAYERS = 2, 6, 32, 2


def _oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: KVPolicy,
    window: int | None,
) -> torch.Tensor:
    """Dense attention of every position: keys and values within ``policy.residual`` of the
    query as given, older ones quantized and dequantized in the policy's format."""
    total = k.shape[0]
    # A rotating policy quantizes in the rotated basis (exactly invertible: +-1 entries).
    basis = policy.rotate and policy.high.quantized
    kr, vr = (rotate(k, "in"), rotate(v, "in")) if basis else (k, v)
    fields = policy.high.encode(kr, vr, positions=torch.arange(total))
    kq, vq = policy.high.decode(fields, k.dtype)
    if basis:
        kq, vq = rotate(kq, "out"), rotate(vq, "out")
    # The attention itself in float32, whatever the stored dtype.
    q, k, v, kq, vq = (x.float() for x in (q, k, v, kq, vq))
    group = Q_HEADS // KV_HEADS
    pos = torch.arange(total)
    out = torch.empty_like(q)
    for p in range(total):
        near = (p - pos < policy.residual)[:, None, None]
        keys = torch.where(near, k, kq).repeat_interleave(group, 1)  # [T, Hq, D]
        values = torch.where(near, v, vq).repeat_interleave(group, 1)
        logits = torch.einsum("hd,thd->ht", q[p], keys) / math.sqrt(HEAD_DIM)
        seen = pos <= p
        if window is not None:
            seen &= pos > p - window
        probs = logits.masked_fill(~seen, float("-inf")).softmax(-1)
        out[p] = torch.einsum("ht,thd->hd", probs, values)
    return out


def _drive(
    backend: str,
    requests: list[tuple[str, list[int]]],
    window: int | None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[torch.Tensor], list[torch.Tensor], KVStore]:
    """Run requests ``(policy, chunk sizes)`` side by side, one chunk each per step, through
    ``PagedAttention`` at layer 1, activations and store in ``dtype``; returns each request's
    outputs and its oracle's (float32).

    ``fast-torch`` is the fast backend without its native kernel (as where no compiler is).
    """
    pool = PagePool(1200, default_page_bytes(HEAD_DIM))
    pool.arena.fill_(0xFF)  # stale bytes of any format, NaN patterns included
    store = KVStore(pool, LAYERS, KV_HEADS, HEAD_DIM, dtype, len(requests), 640)
    attention = PagedAttention(store, [None, window], backend=backend.removesuffix("-torch"))
    if backend.endswith("-torch"):
        attention._native = False  # the torch path the fast backend falls back to
    gen = torch.Generator().manual_seed(seed)
    data, slots, outs = [], [], []
    for name, chunks in requests:
        total = sum(chunks)
        q = torch.randn(total, Q_HEADS, HEAD_DIM, generator=gen).to(dtype)
        k = (torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen) * 2).to(dtype)
        v = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        policy = KVPolicy.parse(name)
        data.append((q, k, v, policy))
        slots.append(store.acquire_slot(policy))
        outs.append([])
    done = [0] * len(requests)
    for step in range(max(len(c) for _, c in requests)):
        rows = [i for i, (_, c) in enumerate(requests) if step < len(c)]
        lens = [requests[i][1][step] for i in rows]
        batch = AttentionBatch.build([slots[i] for i in rows], [done[i] for i in rows], lens)
        parts = [slice(done[i], done[i] + n) for i, n in zip(rows, lens, strict=True)]
        store.reserve(batch.slots, torch.tensor([s.stop for s in parts]))
        q, k, v = (
            torch.cat([data[i][j][s] for i, s in zip(rows, parts, strict=True)]) for j in range(3)
        )
        out = attention(1, q, k, v, batch)
        for i, start, n in zip(rows, batch.query_starts, lens, strict=True):
            outs[i].append(out[start : start + n])
            done[i] += n
    got = [torch.cat(o) for o in outs]
    want = [_oracle(q, k, v, p, window) for q, k, v, p in data]
    return got, want, store


@pytest.mark.parametrize("backend", ["reference", "fast", "fast-torch"])
@pytest.mark.parametrize("window", [None, 11])
def test_each_query_sees_its_newest_tokens_uncompressed(backend: str, window: int | None) -> None:
    requests = [
        # A long first chunk (more than the ring holds), then decodes and short chunks.
        ("k8v4:r=8", [40, 1, 1, 3, 1, 1, 1, 20, 1, 1]),
        ("k4v2:r=0", [5, 1, 1, 1, 1, 1, 30, 1]),
        ("k8v8", [1] * 12 + [9, 1, 1]),
        ("k4v2-g16:r=20", [2, 2, 17, 1, 1, 1, 1, 33, 1]),
        ("fp16", [7, 1, 1, 1]),
    ]
    got, want, store = _drive(backend, requests, window)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # Quantization does change the output where the window does not cover everything.
    assert (got[1] - _drive(backend, [("k4v2:r=64", [5, 1, 1, 1, 1, 1, 30, 1])], window)[0][0])[
        -1
    ].abs().max() > 1e-3
    for slot in range(len(requests)):
        store.release_slot(slot)
    assert store.pool.num_free == store.pool.num_pages


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("window", [None, 13])
def test_long_chunks_and_their_windows(backend: str, window: int | None) -> None:
    # A chunk of several query blocks (with a sliding window), one ending mid-block, then a
    # second chunk and decodes; a ring larger than the window (r=20: two 16-token pages).
    got, want, _ = _drive(backend, [("k4v2:r=20", [600, 1, 7, 1, 45, 1])], window, seed=2)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window", [None, 13, 40])
def test_bfloat16_chunks_through_the_flash_kernel(window: int | None) -> None:
    """In bfloat16 the quantized part of a chunk is the native flash kernel's (a sliding window
    wider than the residual one included: 13 > 8, 40 > 20; 13 < 20 keeps the masked blocks)."""
    requests = [("k4v2:r=20", [300, 1, 7, 1, 45, 1]), ("k8v4:r=8", [70, 1, 130, 1, 1])]
    got, want, _ = _drive("fast", requests, window, seed=4, dtype=torch.bfloat16)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w, rtol=3e-2, atol=3e-2)


def test_chunking_does_not_change_the_result() -> None:
    one, _, _ = _drive("fast", [("k4v2:r=16", [64])], None, seed=3)
    many, _, _ = _drive("fast", [("k4v2:r=16", [10, 1, 1, 17, 1, 30, 1, 1, 1, 1])], None, seed=3)
    torch.testing.assert_close(one[0], many[0], rtol=1e-4, atol=1e-4)


def test_a_window_covering_the_whole_context_is_uncompressed_attention() -> None:
    got, _, _ = _drive("fast", [("k2v2:r=64", [20, 1, 1, 10])], None, seed=5)
    full, _, _ = _drive("reference", [("fp16", [20, 1, 1, 10])], None, seed=5)
    torch.testing.assert_close(got[0], full[0], rtol=1e-5, atol=1e-5)


def test_the_ring_is_counted_in_the_pool_and_returned(checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(checkpoints["llama"]), kv_cache_memory="8MiB", kv_policy="k8v4:r=40")
    engine = llm.engine
    store = engine.store
    rid = engine.add_request(list(range(1, 101)), SamplingParams(max_tokens=3))
    engine.step()
    stats = llm.kv_stats()
    ring_pages = stats["tiers"]["residual"]["pages"]
    heads = engine.spec.num_layers * engine.spec.num_kv_heads
    per_page = store.layouts[0].tokens_per_page
    assert ring_pages == heads * -(-40 // per_page)
    # The ring holds whole pages: the newest 40 tokens and a few older ones.
    assert stats["tiers"]["residual"]["tokens"] == ring_pages * per_page
    assert stats["used_pages"] == store.pages_for(100, engine.policy.high) + ring_pages
    engine.abort(rid)
    assert llm.kv_stats()["free_pages"] == llm.kv_stats()["total_pages"]
