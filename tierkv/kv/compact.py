"""Applying tier decisions: compaction of both tiers of a group of slots at one layer.

Each head keeps its high tokens as a dense prefix (``cumsum`` of the keep mask gives every kept
token its new index), its kept low tokens likewise, and appends its demoted tokens after them,
re-quantized to the low format. Pages are resized first (surplus freed, then missing ones
allocated, so demotion can use the pages the high tier leaves), then every token is written in
one scatter per tier. All of it is vectorised over slots, heads and tokens.
"""

from __future__ import annotations

import torch

from tierkv.kv.store import HIGH, LOW, KVStore, TierRead


def apply_decisions(
    store: KVStore,
    layer: int,
    slots: torch.Tensor,
    high: TierRead,
    low: TierRead,
    scores: torch.Tensor,
    to_high: torch.Tensor,
    to_low: torch.Tensor,
) -> None:
    """Rewrite both tiers of ``slots`` at ``layer``: tokens of ``to_high`` stay high, those of
    ``to_low`` go (or stay) low, the rest are pruned.

    ``high``/``low`` are what the slots held (read before this call), ``scores`` [B, H, T] the
    tokens' updated scores and the masks [B, H, T], high-tier columns first. Low-tier tokens
    must not be in ``to_high`` (no promotion).
    """
    width = high.fields["pos"].shape[2]
    keep_high, demote, keep_low = to_high[..., :width], to_low[..., :width], to_low[..., width:]
    kept_low = keep_low.sum(-1)
    store.resize(layer, slots, keep_high.sum(-1), kept_low + demote.sum(-1))
    high_fields = {**high.fields, "score": scores[..., :width, None]}
    low_fields = {**low.fields, "score": scores[..., width:, None]}
    _move(store, layer, HIGH, slots, high_fields, keep_high, keep_high.cumsum(-1) - 1)
    _move(store, layer, LOW, slots, low_fields, keep_low, keep_low.cumsum(-1) - 1)
    if bool(demote.any()):
        b, h, t = demote.nonzero(as_tuple=True)
        picked = {name: f[b, h, t] for name, f in high_fields.items()}
        k, v = store.format_of(int(slots[0]), HIGH).decode(picked, torch.float32)
        encoded = store.format_of(int(slots[0]), LOW).encode(
            k[:, None],
            v[:, None],
            positions=picked["pos"].view(-1),
            scores=picked["score"].view(-1),
        )
        index = (kept_low[..., None] + demote.cumsum(-1) - 1)[b, h, t]
        fields = {name: value[:, 0] for name, value in encoded.items()}
        store.put(layer, LOW, slots[b], h, index, fields)


def _move(
    store: KVStore,
    layer: int,
    tier: int,
    slots: torch.Tensor,
    fields: dict[str, torch.Tensor],
    keep: torch.Tensor,
    index: torch.Tensor,
) -> None:
    """Write the kept tokens at their new ``index``: every field of the tokens that move, only
    the score of those that stay (most of them, at a decode step)."""
    moves = keep & (index != torch.arange(keep.shape[-1]))
    b, h, t = moves.nonzero(as_tuple=True)
    store.put(layer, tier, slots[b], h, index[b, h, t], {n: f[b, h, t] for n, f in fields.items()})
    b, h, t = (keep & ~moves).nonzero(as_tuple=True)
    store.put(layer, tier, slots[b], h, t, {"score": fields["score"][b, h, t]})
