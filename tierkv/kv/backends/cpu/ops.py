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

import functools
import math
from dataclasses import dataclass

import torch

from tierkv import extension
from tierkv.extension import available, unavailable_reason
from tierkv.kv.formats.layout import PageLayout
from tierkv.kv.formats.quant import FORMATS, KVFormat
from tierkv.kv.store.kv_store import HIGH, LOW, RESIDUAL, KVStore

# Per-token fields the kernel reads, in the order it takes their offsets and strides.
_FIELDS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "pos")

# Stored dtypes of FULL (ring) pages the kernel reads, by the name it takes.
_RING_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@functools.cache
def kernel_bit_pairs() -> frozenset[tuple[int, int]]:
    """The (key bits, value bits) pairs the C++ decode kernels are instantiated for, as the
    built extension reports them (its own table, ``kKernels`` in ``csrc/paged_decode.cpp``);
    empty without the extension."""
    module, _ = extension.load()
    if module is None:
        return frozenset()
    return frozenset((int(k), int(v)) for k, v in module.kernel_bit_pairs())


def supports(fmt: KVFormat, head_dim: int) -> bool:
    """Whether the kernel serves slots stored in ``fmt`` at this head dim: a quantized format
    it is instantiated for (``kernel_bit_pairs``) whose groups of channels fill whole bytes at
    both bit widths (the kernel reads a group's codes as whole bytes; a group size that does
    not divide the head dim never reaches a store: ``KVStore.register`` refuses it)."""
    if not fmt.quantized or (fmt.key_bits, fmt.value_bits) not in kernel_bit_pairs():
        return False
    width = min(fmt.group_size, head_dim)
    return all(width * bits % 8 == 0 for bits in (fmt.key_bits, fmt.value_bits))


@functools.cache
def _fields(layout: PageLayout) -> tuple[list[int], list[int], int]:
    """Byte offsets and per-token strides of the kernel's fields in pages of ``layout``, and
    its tokens per page (cached: ``PageLayout.offsets`` walks the fields in Python)."""
    offsets = layout.offsets()
    strides = {field.name: field.token_bytes for field in layout.fields}
    return (
        [offsets[name] for name in _FIELDS],
        [strides[name] for name in _FIELDS],
        layout.tokens_per_page,
    )


@dataclass(frozen=True)
class Ring:
    """The residual rings of a group of uniform slots at one layer, as the kernel reads them.

    ``pages`` [B, H, P]: FULL page ids of each (request, KV head)'s ring
    (``store.tables[slots, layer, :, RESIDUAL, :P]``, P covering the largest ring); ``size``
    [B]: tokens each ring holds (``store.ring[slots]``, whole pages); ``window`` [B]: the
    residual window R (``store.residual[slots]``; 0 for slots without one, whose stale ids are
    then never read).
    """

    pages: torch.Tensor
    size: torch.Tensor
    window: torch.Tensor


@functools.cache
def _ring_layout(layout: PageLayout) -> tuple[list[int], int, str]:
    """``[k offset, k stride, v offset, v stride]`` of FULL pages of ``layout``, their tokens
    per page and the stored dtype's name."""
    offsets = layout.offsets()
    fields = {field.name: field for field in layout.fields}
    dtype = fields["k"].dtype
    if dtype not in _RING_DTYPES:
        raise ValueError(f"the native kernel reads rings of {list(_RING_DTYPES)}, not {dtype}")
    return (
        [offsets["k"], fields["k"].token_bytes, offsets["v"], fields["v"].token_bytes],
        layout.tokens_per_page,
        _RING_DTYPES[dtype],
    )


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
    module, reason = extension.load()
    if module is None:
        raise RuntimeError(reason)
    if not 0 <= layer < store.num_layers:
        raise ValueError(f"layer {layer} outside the store's {store.num_layers} layers")
    fmt = store.formats[f]
    if not supports(fmt, store.head_dim):
        raise ValueError(
            f"the native kernel does not serve {fmt.name} at head dim {store.head_dim}"
        )
    offsets, strides, per_page = _fields(store.layouts[f])
    dim = q.shape[-1]
    options: dict = {}
    if ring is not None:
        ring_fields, ring_per_page, ring_dtype = _ring_layout(store.layouts[0])
        options.update(
            ring=ring.pages,
            ring_size=ring.size,
            residual=ring.window,
            ring_fields=ring_fields,
            ring_tokens_per_page=ring_per_page,
            ring_dtype=ring_dtype,
        )
    return module.paged_decode(
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
    """
    cache = {} if cache is None else cache
    per_page = store.layouts[f].tokens_per_page
    plan = cache.get(("native", f))
    if plan is None:
        num = -(-int(lens.max()) // per_page)
        # [L, B, H, num]: one contiguous [B, H, num] table per layer.
        pages = store.tables[slots, :, :, HIGH, :num].transpose(0, 1).contiguous()
        plan = cache[("native", f)] = (pages, lens.to(torch.int64).contiguous())
    pages, ends = plan
    starts = cache.get(("native_starts", f, window))
    if starts is None:
        starts = torch.zeros_like(ends) if window is None else (ends - window).clamp_(min=0)
        cache[("native_starts", f, window)] = starts
    rings = cache.get(("native_ring", f), False)
    if rings is False:
        rings = cache[("native_ring", f)] = _rings(store, slots) if store.num_residual else None
    ring = None if rings is None else Ring(rings[0][layer], rings[1], rings[2])
    return partial(store, layer, q, pages[layer], starts, ends, f, ring=ring)[0]


def decode_full(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    window: int | None,
    cache: dict | None = None,
) -> torch.Tensor:
    """``decode`` for slots stored uncompressed (FULL pages), read in place.

    The kernel's ring path reads FULL rows; a ring as large as the request's whole high tier
    (``position % size == position``) with a residual window covering the visible range is
    exactly the uncompressed cache, so the quantized range is empty. ``cache`` holds the page
    ids of every layer for the step, as in ``decode``.
    """
    cache = {} if cache is None else cache
    plan = cache.get("native_full")
    if plan is None:
        per_page = store.layouts[0].tokens_per_page
        num = -(-int(lens.max()) // per_page)
        pages = store.tables[slots, :, :, HIGH, :num].transpose(0, 1).contiguous()
        # The kernel's signature wants a quantized layout too; none of its tokens is read.
        carrier = store.register(FORMATS["k8v8"])
        ends = lens.to(torch.int64).contiguous()
        size = torch.full_like(ends, num * per_page)
        plan = cache["native_full"] = (pages, carrier, ends, size)
    pages, carrier, ends, size = plan
    starts = cache.get(("native_full_starts", window))
    if starts is None:
        starts = ends.new_zeros(ends.shape) if window is None else (ends - window).clamp(min=0)
        cache[("native_full_starts", window)] = starts
    ring = Ring(pages[layer], size, ends)
    return partial(store, layer, q, pages[layer], starts, ends, carrier, ring=ring)[0]


def _rings(
    store: KVStore, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The ring page ids of ``slots`` in every layer ([L, B, H, P], one contiguous table per
    layer), their sizes and windows; None when no slot has a residual window."""
    window = store.residual[slots]
    if not bool(window.any()):
        return None
    size = store.ring[slots]
    num = int(size.max()) // store.layouts[0].tokens_per_page
    pages = store.tables[slots, :, :, RESIDUAL, :num].transpose(0, 1).contiguous()
    return pages, size.contiguous(), window.contiguous()


# Page fields the quantizing write fills, in the order of its offsets and strides.
_WRITE_FIELDS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "score", "pos")


@functools.cache
def _write_fields(layout: PageLayout) -> tuple[list[int], list[int]]:
    """Byte offsets and per-token strides of every field of ``layout``, for ``store_tokens``."""
    offsets = layout.offsets()
    strides = {field.name: field.token_bytes for field in layout.fields}
    return [offsets[n] for n in _WRITE_FIELDS], [strides[n] for n in _WRITE_FIELDS]


@functools.cache
def _row_fields(layout: PageLayout) -> tuple[int, int, int]:
    """Byte offsets of the key and value rows of uncompressed pages, and a row's bytes."""
    offsets = layout.offsets()
    row_bytes = {field.name: field.token_bytes for field in layout.fields}["k"]
    return offsets["k"], offsets["v"], row_bytes


def store_tokens(
    store: KVStore,
    f: int,
    pages: torch.Tensor,
    rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Quantize ``k``/``v`` [N, H, D] to the store's format index ``f`` and write every field
    (codes, scales, zeros, a zero score, ``positions`` [N]) of token ``n``, head ``h`` at row
    ``rows[n, h]`` of page ``pages[n, h]``: the bytes ``KVFormat.encode`` and one indexed store
    per field would write (``csrc/quantize_store.cpp``), in one call. The uncompressed format
    (keys and values in the store's dtype, no positions) is a copy of the rows."""
    if not available():
        raise RuntimeError(unavailable_reason())
    fmt = store.formats[f]
    if not fmt.quantized:
        k_offset, v_offset, row_bytes = _row_fields(store.layouts[f])
        dtype = store.dtype
        torch.ops.tierkv.store_rows(
            k.to(dtype), v.to(dtype), store.pool.arena, pages, rows, k_offset, v_offset, row_bytes
        )
        return
    offsets, strides = _write_fields(store.layouts[f])
    torch.ops.tierkv.quantize_store(
        k,
        v,
        positions,
        store.pool.arena,
        pages,
        rows,
        fmt.key_bits,
        fmt.value_bits,
        fmt.group_size,
        offsets,
        strides,
    )


@functools.cache
def _tier_args(
    formats: tuple[KVFormat, KVFormat], layouts: tuple[PageLayout, PageLayout]
) -> tuple[list[int], list[int], list[int]]:
    """``tiered_decode``'s format arguments for a (high, low) pair: each tier's key bits,
    value bits, group size and tokens per page; the offsets and strides of its kernel fields
    then of its score."""
    packed: tuple[list[int], list[int], list[int]] = ([], [], [])
    for fmt, layout in zip(formats, layouts, strict=True):
        offsets, strides, per_page = _fields(layout)
        score_offset, score_stride = (
            v[_WRITE_FIELDS.index("score")] for v in _write_fields(layout)
        )
        packed[0].extend([fmt.key_bits, fmt.value_bits, fmt.group_size, per_page])
        packed[1].extend([*offsets, score_offset])
        packed[2].extend([*strides, score_stride])
    return packed


def tiered_decode(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    query_pos: torch.Tensor,
    window: int | None,
    *,
    score: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode attention of tiered slots, the kernel reading both tiers in place, in one call.

    ``q`` [B, Hq, D] is one query per slot at position ``query_pos`` [B] (int64), after the
    step's ``KVStore.write``; the slots share their tier formats (as ``tiered.attend``
    requires), both of which the kernel ``supports``. Each (slot, KV head) attends the
    ``store.count`` tokens it holds in each tier that ``pos <= query_pos`` and, under a sliding
    ``window``, ``pos > query_pos - window`` (a decode query comes after every stored token, so
    only a window masks anything, and without one the kernel reads no position); the kernel
    merges the two tiers' parts by their log-sum-exps. Slots with a residual ring
    (``store.residual``) read their newest positions from it instead, in place, as a third part
    (``tierkv.kv.attention.tiered_ring``); a ring position's probability is its tier token's.

    Returns ``(out, probs)``: ``out`` [B, Hq, D] in ``q``'s dtype and ``probs`` float32
    [B, H, G, T_high + T_low] (G = Hq // H), each query head's probability of every token,
    columns laid out as ``tiered.attend``'s (``TieredAttention.probs[:, :, :, 0]``): the high
    tier's ``T_high = store.read_tier(layer, slots, HIGH)`` columns, then the low tier's; 0 for
    columns past a head's count and for tokens it does not see.

    With ``score``, the probabilities are instead added to the tokens' stored scores, in place
    (each token the largest any query head of its group gave it: the float32 sum
    ``tiered.add_received``'s torch path writes from ``probs``), and ``probs`` is None.
    """
    module, reason = extension.load()
    if module is None:
        raise RuntimeError(reason)
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must be positive, got {window}")
    b, hq, dim = q.shape
    slot = int(slots[0])
    tier_formats = [int(store.slot_format[slot, tier]) for tier in (HIGH, LOW)]
    formats = tuple(store.formats[f] for f in tier_formats)
    if not all(supports(fmt, store.head_dim) for fmt in formats):
        raise ValueError(f"the native kernel does not serve {formats} at head dim {dim}")
    fmt_args, offsets, strides = _tier_args(formats, tuple(store.layouts[f] for f in tier_formats))
    probs, split = None, 0
    if not score:
        # One column per token slot of the pages ``read_tier`` would gather, per tier.
        tiers = [store.tier_pages(layer, slots, tier) for tier in (HIGH, LOW)]
        widths = [pages.shape[-1] * store.layouts[f].tokens_per_page for f, _, pages in tiers]
        probs, split = torch.empty(b, hq, sum(widths)), widths[0]
    options: dict = {}
    residual = store.residual[slots]
    if bool((residual > 0).any()):
        ring_fields, ring_per_page, ring_dtype = _ring_layout(store.layouts[0])
        options.update(
            ring_size=store.ring[slots],
            residual=residual,
            ring_fields=ring_fields,
            ring_tokens_per_page=ring_per_page,
            ring_dtype=ring_dtype,
        )
    out = module.tiered_decode(
        q,
        store.pool.arena,
        store.tables,
        store.count,
        slots,
        layer,
        query_pos,
        window or 0,
        1.0 / math.sqrt(dim),
        fmt_args,
        offsets,
        strides,
        score,
        probs,
        split,
        **options,
    )
    if probs is None:
        return out, None
    heads = store.num_kv_heads
    return out, probs.view(b, heads, hq // heads, -1)


def compact_tiers(
    store: KVStore,
    layer: int | None,
    slots: torch.Tensor,
    keep_high: torch.Tensor,
    demote: torch.Tensor,
    keep_low: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The byte-moving half of ``compact.apply_decisions`` for ``slots`` sharing their tier
    formats (``csrc/compact_tiers.cpp``): in each tier, the kept tokens past the new count fill
    the holes before it, in place; the high tokens ``demote`` names are decoded.

    The masks are ``[B, units, T]`` over the columns ``read_tier(layer, ...)`` gives (every
    layer's heads when ``layer`` is None). Returns the demoted tokens as
    ``KVStore.put_tokens`` takes them after the caller's ``resize``: ``(slots, heads, index,
    keys, values, positions, scores)``, the index after each head's kept low tokens.
    """
    module, reason = extension.load()
    if module is None:
        raise RuntimeError(reason)
    slot = int(slots[0])
    high, low = (int(store.slot_format[slot, tier]) for tier in (HIGH, LOW))
    fmt = store.formats[high]
    high_offsets, high_strides = _write_fields(store.layouts[high])
    low_offsets, low_strides = _write_fields(store.layouts[low])
    unit, index, keys, values, positions, scores = torch.ops.tierkv.compact_tiers(
        store.pool.arena,
        store.tables,
        store.count,
        slots,
        -1 if layer is None else layer,
        keep_high.contiguous(),
        demote.contiguous(),
        keep_low.contiguous(),
        [fmt.key_bits, fmt.value_bits, store.layouts[high].tokens_per_page],
        high_offsets,
        high_strides,
        store.layouts[low].tokens_per_page,
        low_offsets,
        low_strides,
    )
    units = keep_high.shape[1]
    return slots[unit // units], unit % units, index, keys, values, positions, scores
