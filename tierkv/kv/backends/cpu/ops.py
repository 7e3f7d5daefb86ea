"""A native (C++) decode kernel over quantized pages, built on first use.

``tierkv.kv.backends.torch.ops`` folds dequantization into two matmuls but still pays for a
gather of every page, unpacked float32 copies of the codes and about 40 small torch ops per
layer, which at decode sizes cost more than the arithmetic. ``csrc/paged_decode.cpp`` does the
whole decode attention of a layer in one call:

* one work item per (request, KV head), spread over torch's intra-op threads; the query heads
  sharing the KV head (GQA) are processed together, so every key and value byte is read once;
* pages are read in place from the arena through the page table (no gather), a block of up to
  64 tokens of one page at a time; each token's key is dequantized into registers (codes in
  "plane" order: the codes at bit ``p * bits`` of every byte, so unpacking is shifts and masks,
  see ``tierkv.kv.backends.torch.ops``) and dotted with every query head;
* an online (streaming) softmax in float32: each block's maximum rescales the running sums
  once, then the block's values are dequantized and accumulated the same way.

The kernel returns the log-sum-exp of the logits beside the output, so attention over a token
range can be split (``partial`` over several ranges, then ``tierkv.kv.backends.partial.merge``) and
combined exactly with attention computed elsewhere.

Two extensions serve the store's other layouts without a gather:

* the residual window of uniform slots (``decode``): the kernel runs after the step's
  ``KVStore.write``, when each slot's ring of FULL pages already holds every position in
  ``[lens - R, lens)``, and reads those positions from the ring (index ``position % ring``)
  and the older ones from the quantized pages, in one softmax, so a decode step needs no
  ``KVStore.read_residual`` (whose torch ops and merge cost about 1 ms per step at batch 1);
* tiered slots (``tiered_decode``): each (request, KV head) attends its own count of tokens
  per tier, masked by their stored ``pos`` (causality and the sliding window); one call
  attends both tiers, merges them and adds each token's probability to its stored score (or
  writes the probabilities out), which gives ``tiered.attend``'s output and probabilities.

The kernels are part of the package's C++ extension (``tierkv.extension``), built on first use;
a machine without a compiler simply has no native kernel: ``available()`` says so and the
engine keeps its torch paths.
"""

from __future__ import annotations

import math

import torch

from tierkv import extension
from tierkv.extension import available, unavailable_reason
from tierkv.kv.backends.base import high_page_tables
from tierkv.kv.backends.cpu.layout import (
    Ring,
    kernel_bit_pairs,
    kernel_fields,
    ring_layout,
    ring_tables,
    supports,
)

# The tiered kernels and the writes live in their own modules; callers reach every kernel of
# the backend as ``ops.<name>``.
from tierkv.kv.backends.cpu.tiers import compact_tiers, tiered_decode
from tierkv.kv.backends.cpu.writes import store_tokens
from tierkv.kv.formats.quant import FORMATS
from tierkv.kv.store.kv_store import KVStore


def partial(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    pages: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    f: int,
    *,
    ring: Ring | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [B, Hq, D] over the token indices ``[starts, ends)`` of each request
    (``starts``/``ends`` int64 [B]) or of each (request, KV head) ([B, H]), stored in format
    index ``f`` in the pages ``pages`` [B, H, P] (page ids of each (request, KV head) of one
    layer, e.g. ``store.tables[slots, layer, :, HIGH, :P]``).

    Token ``i`` is slot ``i % tokens_per_page`` of page ``pages[b, h, i // tokens_per_page]``;
    only the pages holding tokens of the range are read, so stale ids past them are harmless.
    The logits are scaled by ``1/sqrt(D)``. Returns ``(out, lse)``: ``out`` [B, Hq, D] in
    ``q``'s dtype (0 for an empty range) and ``lse`` [B, Hq] float32, the log-sum-exp of the
    logits over the range (-inf for an empty range).
    ``layer`` is only checked against the store (the pages already name the layer's tokens).
    ``tierkv.kv.backends.partial.merge`` combines parts.

    With ``ring`` (uniform slots with a residual window, after the step's ``KVStore.write``),
    positions ``[max(start, end - R), end)`` are read uncompressed from the ring (index
    ``position % size``), older ones from ``pages``.
    """
    if not extension.available():
        raise RuntimeError(extension.unavailable_reason())
    if not 0 <= layer < store.num_layers:
        raise ValueError(f"layer {layer} outside the store's {store.num_layers} layers")
    fmt = store.formats[f]
    if not supports(fmt, store.head_dim):
        raise ValueError(
            f"the native kernel does not serve {fmt.name} at head dim {store.head_dim}"
        )
    offsets, strides, per_page = kernel_fields(store.layouts[f])
    dim = q.shape[-1]
    options: dict = {}
    if ring is not None:
        ring_fields, ring_per_page, ring_dtype = ring_layout(store.layouts[0])
        options.update(
            ring=ring.pages,
            ring_size=ring.size,
            residual=ring.window,
            ring_fields=ring_fields,
            ring_tokens_per_page=ring_per_page,
            ring_dtype=ring_dtype,
        )
    return torch.ops.tierkv.paged_decode(
        q,
        store.pool.arena,
        pages,
        starts,
        ends,
        1.0 / math.sqrt(dim),
        fmt.key_bits,
        fmt.value_bits,
        fmt.group_size,
        offsets,
        strides,
        per_page,
        **options,
    )


def decode(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    window: int | None,
    f: int,
    cache: dict | None = None,
    *,
    max_len: int | None = None,
    ring_pages: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per slot over the slot's first ``lens`` tokens (the last
    ``window`` of them under a sliding window): the contract of
    ``tierkv.kv.backends.torch.ops.decode``.

    ``q`` is ``[B, Hq, D]``; every slot stores its (uniform) tokens in the store's format
    index ``f``, which ``supports``. Returns ``[B, Hq, D]`` in ``q``'s dtype.

    The residual window of slots that have one (``store.residual``) is read straight from the
    slots' rings, in place: call it after the step's ``KVStore.write``, when each ring holds the
    query's position and the ``R - 1`` before it.

    ``cache`` (a dict the caller keeps for one step and passes again for every layer with the
    same ``slots`` and ``lens``) holds what does not change between layers: the page ids of
    every layer (and of the rings), gathered once, and the start of each request's visible range.
    ``max_len`` (``lens.max()``) and ``ring_pages`` (``ring_tables``' P) are read from the
    tensors unless the caller knows them on the host.
    """
    cache = {} if cache is None else cache
    if ("native", f) not in cache:
        plan_decode(store, slots, lens, f, cache, max_len=max_len, ring_pages=ring_pages)
    pages, ends = cache[("native", f)]
    starts = cache.get(("native_starts", f, window))
    if starts is None:
        starts = torch.zeros_like(ends) if window is None else (ends - window).clamp_(min=0)
        cache[("native_starts", f, window)] = starts
    rings = cache[("native_ring", f)]
    ring = None if rings is None else Ring(rings[0][layer], rings[1], rings[2])
    return partial(store, layer, q, pages[layer], starts, ends, f, ring=ring)[0]


def plan_decode(
    store: KVStore,
    slots: torch.Tensor,
    lens: torch.Tensor,
    f: int,
    cache: dict,
    *,
    max_len: int | None = None,
    ring_pages: int | None = None,
) -> None:
    """Put what ``decode`` reads at every layer of a step into ``cache``: the page ids of
    every layer ``[L, B, H, pages]`` (one contiguous table per layer), the lengths, and the
    rings' tables. The backend's ``plan`` calls it once per step, before the first layer."""
    _, pages = high_page_tables(store, slots, f, int(lens.max()) if max_len is None else max_len)
    cache[("native", f)] = (pages, lens.to(torch.int64).contiguous())
    cache[("native_ring", f)] = (
        ring_tables(store, slots, ring_pages) if store.num_residual else None
    )


def decode_full(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    window: int | None,
    cache: dict | None = None,
    *,
    max_len: int | None = None,
) -> torch.Tensor:
    """``decode`` for slots stored uncompressed (FULL pages), read in place.

    The kernel's ring path reads FULL rows; a ring as large as the request's whole high tier
    (``position % size == position``) with a residual window covering the visible range is
    exactly the uncompressed cache, so the quantized range is empty. ``cache`` holds the page
    ids of every layer for the step, as in ``decode``.
    """
    cache = {} if cache is None else cache
    if "native_full" not in cache:
        plan_full(store, slots, lens, cache, max_len=max_len)
    pages, carrier, ends, size = cache["native_full"]
    starts = cache.get(("native_full_starts", window))
    if starts is None:
        starts = ends.new_zeros(ends.shape) if window is None else (ends - window).clamp(min=0)
        cache[("native_full_starts", window)] = starts
    ring = Ring(pages[layer], size, ends)
    return partial(store, layer, q, pages[layer], starts, ends, carrier, ring=ring)[0]


def plan_full(
    store: KVStore,
    slots: torch.Tensor,
    lens: torch.Tensor,
    cache: dict,
    *,
    max_len: int | None = None,
) -> None:
    """``plan_decode`` for ``decode_full``: the page ids of every layer, the carrier format,
    the lengths and the ring size covering them, once per step."""
    num, pages = high_page_tables(store, slots, 0, int(lens.max()) if max_len is None else max_len)
    # The kernel's signature wants a quantized layout too; none of its tokens is read.
    carrier = store.register(FORMATS["k8v8"])
    ends = lens.to(torch.int64).contiguous()
    size = torch.full_like(ends, num * store.layouts[0].tokens_per_page)
    cache["native_full"] = (pages, carrier, ends, size)


__all__ = [
    "Ring",
    "available",
    "compact_tiers",
    "decode",
    "decode_full",
    "kernel_bit_pairs",
    "partial",
    "plan_decode",
    "plan_full",
    "store_tokens",
    "supports",
    "tiered_decode",
    "unavailable_reason",
]
