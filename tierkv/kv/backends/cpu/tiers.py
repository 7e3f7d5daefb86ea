"""The cpu backend's kernels for tiered slots: decode attention over both tiers (and the
residual ring) with the score update (``tiered_decode``), and compaction of the tiers after a
decision (``compact_tiers``), both reading and writing pages in place."""

from __future__ import annotations

import math

import torch

from tierkv import extension
from tierkv.kv.backends.cpu.layout import ring_layout, supports, tier_args, write_fields
from tierkv.kv.store.kv_store import HIGH, LOW, KVStore


def tiered_decode(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    query_pos: torch.Tensor,
    window: int | None,
    *,
    score: bool = False,
    formats: tuple[int, int] | None = None,
    has_ring: bool | None = None,
    prepared: dict | None = None,
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
    (``tierkv.kv.backends.tiered_ring``); a ring position's probability is its tier token's.

    Returns ``(out, probs)``: ``out`` [B, Hq, D] in ``q``'s dtype and ``probs`` float32
    [B, H, G, T_high + T_low] (G = Hq // H), each query head's probability of every token,
    columns laid out as ``tiered.attend``'s (``TieredAttention.probs[:, :, :, 0]``): the high
    tier's ``T_high = store.read_tier(layer, slots, HIGH)`` columns, then the low tier's; 0 for
    columns past a head's count and for tokens it does not see. ``formats`` (the slots' high and
    low format indices) and ``has_ring`` (whether some slot has a residual window) are read
    from the tables unless the caller knows them on the host. ``prepared``: a dict the caller
    keeps for one step and one group of ``slots``, where the first layer leaves the arguments
    that are the same at every layer (formats, field offsets, ring sizes) for the others.

    With ``score``, the probabilities are instead added to the tokens' stored scores, in place
    (each token the largest any query head of its group gave it: the float32 sum
    ``tiered.add_received``'s torch path writes from ``probs``), and ``probs`` is None.
    """
    if not extension.available():
        raise RuntimeError(extension.unavailable_reason())
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must be positive, got {window}")
    b, hq, dim = q.shape
    if prepared:
        fmt_args, offsets, strides, options = prepared["args"]
    else:
        fmt_args, offsets, strides, options = _layer_invariant(store, slots, formats, has_ring)
        if prepared is not None:
            prepared["args"] = (fmt_args, offsets, strides, options)
    probs, split = None, 0
    if not score:
        # One column per token slot of the pages ``read_tier`` would gather, per tier.
        tiers = [store.tier_pages(layer, slots, tier) for tier in (HIGH, LOW)]
        widths = [pages.shape[-1] * store.layouts[f].tokens_per_page for f, _, pages in tiers]
        probs, split = torch.empty(b, hq, sum(widths)), widths[0]
    out = torch.ops.tierkv.tiered_decode(
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


def _layer_invariant(
    store: KVStore, slots: torch.Tensor, formats: tuple[int, int] | None, has_ring: bool | None
) -> tuple[list, list, list, dict]:
    """``tiered_decode``'s arguments that depend on the slots and their formats, not on the
    layer: format arguments, field offsets and strides, and the ring's options."""
    if formats is None:
        slot = int(slots[0])
        formats = (int(store.slot_format[slot, HIGH]), int(store.slot_format[slot, LOW]))
    tier_formats = tuple(store.formats[f] for f in formats)
    if not all(supports(fmt, store.head_dim) for fmt in tier_formats):
        raise ValueError(
            f"the native kernel does not serve {tier_formats} at head dim {store.head_dim}"
        )
    fmt_args, offsets, strides = tier_args(tier_formats, tuple(store.layouts[f] for f in formats))
    options: dict = {}
    residual = store.residual[slots]
    if bool((residual > 0).any()) if has_ring is None else has_ring:
        ring_fields, ring_per_page, ring_dtype = ring_layout(store.layouts[0])
        options.update(
            ring_size=store.ring[slots],
            residual=residual,
            ring_fields=ring_fields,
            ring_tokens_per_page=ring_per_page,
            ring_dtype=ring_dtype,
        )
    return fmt_args, offsets, strides, options


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
    if not extension.available():
        raise RuntimeError(extension.unavailable_reason())
    slot = int(slots[0])
    high, low = (int(store.slot_format[slot, tier]) for tier in (HIGH, LOW))
    fmt = store.formats[high]
    high_offsets, high_strides = write_fields(store.layouts[high])
    low_offsets, low_strides = write_fields(store.layouts[low])
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
