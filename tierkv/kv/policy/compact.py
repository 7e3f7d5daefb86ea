"""Applying tier decisions: compaction of both tiers of a group of slots at one layer (or all).

Each head keeps each tier as a dense prefix, in no particular order (attention and decisions
read a token's position from its ``pos`` field). A decision leaves holes where tokens were
demoted or pruned; compaction fills them by moving the kept tokens from past the new end of
the prefix into the holes, pairing the r-th such token with the r-th hole, so a step moves only
as many tokens as it removed (a few per head, where closing the gaps in order would move every
token after the first hole: measured 28% of all kept tokens per decode step). Demoted tokens
are re-quantized to the low format and appended after the low tier's kept tokens.

The tokens' scores are already stored (the step's attention was added before the decision);
the tokens that move or are demoted are read from their pages (the only full-field reads a
decision needs, so its caller reads just scores and positions), the pages are resized
(surplus freed, then missing ones allocated, so demotion can use the pages the high tier
leaves), and the moved and demoted tokens are written, all of it vectorised over slots, heads
and tokens. Where a backend of the chain has a compaction kernel for the slots' formats
(``KVBackend.compact``: the cpu backend's ``compact_tiers``), the moves and the decoding of the
demoted tokens are one call to it instead (the same bytes), before the same resize and
re-quantizing store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tierkv.kv.store.kv_store import HIGH, LOW, KVStore

if TYPE_CHECKING:
    from tierkv.kv.backends.base import KVBackend

# Where some tokens move: (slots [M], heads [M], destination indices [M], their fields).
_Writes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def apply_decisions(
    store: KVStore,
    layer: int | None,
    slots: torch.Tensor,
    to_high: torch.Tensor,
    to_low: torch.Tensor,
    width: int,
    compactor: KVBackend | None = None,
) -> None:
    """Rewrite both tiers of ``slots`` at ``layer``: tokens of ``to_high`` stay high, those of
    ``to_low`` go (or stay) low, the rest are pruned.

    The masks [B, H, T] cover the columns ``read_tier`` gave for both tiers, the ``width``
    high-tier columns first; the tokens' scores are already stored. Low-tier tokens must not be
    in ``to_high`` (no promotion). With a ``compactor`` (a backend whose ``compact`` serves the
    slots' formats), the holes are filled and the demoted tokens decoded by one call to it (the
    same bytes) instead of torch ops.
    """
    keep_high, demote, keep_low = to_high[..., :width], to_low[..., :width], to_low[..., width:]
    kept_low = keep_low.sum(-1)
    # Everything that moves is read (and, by a compactor, moved) before ``resize`` frees the
    # pages it sits in.
    if compactor is not None:
        moves = []
        demoted = compactor.compact(store, layer, slots, keep_high, demote, keep_low)
    else:
        moves = [
            (tier, w)
            for tier, w in (
                (HIGH, _fill_holes(store, layer, HIGH, slots, keep_high)),
                (LOW, _fill_holes(store, layer, LOW, slots, keep_low)),
            )
            if w is not None
        ]
        demoted = _demotions(store, layer, slots, demote, kept_low)
    store.resize(layer, slots, keep_high.sum(-1), kept_low + demote.sum(-1))
    for tier, (b_slots, heads, index, fields) in moves:
        store.put(layer, tier, b_slots, heads, index, fields)
    if demoted is not None:
        store.put_tokens(layer, LOW, *demoted)


def _fill_holes(
    store: KVStore, layer: int | None, tier: int, slots: torch.Tensor, keep: torch.Tensor
) -> _Writes | None:
    """The kept tokens past each head's new count, bound for the holes before it.

    Per head there are as many holes (columns below the new count not kept) as stragglers
    (kept columns at or past it), and ``nonzero`` lists both row by row in column order, so the
    two lists pair up head by head.
    """
    column = torch.arange(keep.shape[-1])
    inside = column < keep.sum(-1, keepdim=True)
    holes = (inside & ~keep).nonzero(as_tuple=True)
    if not holes[0].numel():
        return None
    b, h, t = (~inside & keep).nonzero(as_tuple=True)
    return slots[b], h, holes[2], store.take(layer, tier, slots[b], h, t)


def _demotions(
    store: KVStore,
    layer: int | None,
    slots: torch.Tensor,
    demote: torch.Tensor,
    kept_low: torch.Tensor,
) -> tuple[torch.Tensor, ...] | None:
    """The demoted high tokens, decoded, bound for the places after the kept low ones:
    ``(slots, heads, index, keys, values, positions, scores)`` for ``KVStore.put_tokens``,
    which re-quantizes them to the low format."""
    if not bool(demote.any()):
        return None
    b, h, t = demote.nonzero(as_tuple=True)
    picked = store.take(layer, HIGH, slots[b], h, t)
    k, v = store.format_of(int(slots[0]), HIGH).decode(picked, torch.float32)
    index = (kept_low[..., None] + demote.cumsum(-1) - 1)[b, h, t]
    return slots[b], h, index, k, v, picked["pos"].view(-1), picked["score"].view(-1)
