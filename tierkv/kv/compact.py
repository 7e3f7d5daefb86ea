"""Applying tier decisions: compaction of both tiers of a group of slots at one layer.

Each head keeps each tier as a dense prefix, in no particular order (attention and decisions
read a token's position from its ``pos`` field). A decision leaves holes where tokens were
demoted or pruned; compaction fills them by moving the kept tokens from past the new end of
the prefix into the holes, pairing the r-th such token with the r-th hole, so a step moves only
as many tokens as it removed (a few per head, where closing the gaps in order would move every
token after the first hole: measured 28% of all kept tokens per decode step). Demoted tokens
are re-quantized to the low format and appended after the low tier's kept tokens.

The updated scores of every token are written back first, page by page in one copy per tier,
to the pages the tiers held; then pages are resized (surplus freed, then missing ones
allocated, so demotion can use the pages the high tier leaves) and the moved and demoted
tokens are written, all of it vectorised over slots, heads and tokens.
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
    store.write_scores(layer, slots, HIGH, scores[..., :width])
    store.write_scores(layer, slots, LOW, scores[..., width:])
    kept_low = keep_low.sum(-1)
    store.resize(layer, slots, keep_high.sum(-1), kept_low + demote.sum(-1))
    high_fields = {**high.fields, "score": scores[..., :width, None]}
    _fill_holes(store, layer, HIGH, slots, high_fields, keep_high)
    _fill_holes(
        store, layer, LOW, slots, {**low.fields, "score": scores[..., width:, None]}, keep_low
    )
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


def _fill_holes(
    store: KVStore,
    layer: int,
    tier: int,
    slots: torch.Tensor,
    fields: dict[str, torch.Tensor],
    keep: torch.Tensor,
) -> None:
    """Move the kept tokens past each head's new count into the holes before it.

    Per head there are as many holes (columns below the new count not kept) as stragglers
    (kept columns at or past it), and ``nonzero`` lists both row by row in column order, so the
    two lists pair up head by head.
    """
    column = torch.arange(keep.shape[-1])
    inside = column < keep.sum(-1, keepdim=True)
    holes = (inside & ~keep).nonzero(as_tuple=True)
    if not holes[0].numel():
        return
    b, h, t = (~inside & keep).nonzero(as_tuple=True)
    store.put(layer, tier, slots[b], h, holes[2], {n: f[b, h, t] for n, f in fields.items()})
