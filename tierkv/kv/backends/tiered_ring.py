"""The residual ring of tiered slots: their newest tokens attended at full precision.

A tiered policy with ``r > 0`` (``default:r=32``) keeps, besides its two tiers, the same ring of
uncompressed pages as a uniform policy with a residual window (``KVStore.read_residual``): a
query at position ``p`` attends positions ``p - r + 1 .. p`` from the ring (or from the step's
own new tokens) and only older positions from the tiers. ``r`` may not exceed the recent window
``w``, so every ring entry is also a high-tier token of each head: the tiers' copy is hidden
from the query (``hide_recent``) and the ring's probability of the token is what its score
gains (``fold``). The rule depends only on positions, as the uniform one does, so chunking and
batching do not change it. The native decode does the same in its kernel
(``native.tiered_decode``).
"""

from __future__ import annotations

import torch

from tierkv.kv.store.views import Residual


def hide_recent(
    visible: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor, window: torch.Tensor
) -> torch.Tensor:
    """``visible`` [B, H, 1, nq, T] without the tier tokens the ring serves: those at ``pos``
    [B, H, T] newer than ``query_pos`` [B, nq] minus each slot's ring ``window`` [B]."""
    last = (query_pos - window[:, None])[:, None, None, :, None]
    return visible & (pos[:, :, None, None, :] <= last)


def ring_logits(qg: torch.Tensor, residual: Residual, query_pos: torch.Tensor, sliding: int | None):
    """Scaled logits ``[B, H, G, nq, E]`` of queries ``qg`` [B, H, G, nq, D] (float32, not yet
    scaled) over the ``residual`` entries, -inf where an entry is not served to a query."""
    scale = qg.shape[-1] ** -0.5
    logits = (qg * scale) @ residual.keys.float()[:, :, None].transpose(-1, -2)
    seen = residual.visible(query_pos, sliding)[:, None, None]
    return logits.masked_fill_(~seen, -torch.inf)


def ring_mix(probs: torch.Tensor, residual: Residual) -> torch.Tensor:
    """Output ``[B, H, G, nq, D]`` float32 of the ring's probabilities [B, H, G, nq, E]."""
    return probs @ residual.values.float()[:, :, None]


def fold(
    tier_probs: torch.Tensor,
    ring_probs: torch.Tensor,
    pos: torch.Tensor,
    valid: torch.Tensor,
    residual: Residual,
    last_pos: int | None = None,
) -> torch.Tensor:
    """The tier columns' probabilities [B, H, G, nq, T] plus, on each column, the ring's
    probability of the same position (columns at ``pos`` [B, H, T], ``valid`` [B, H, T]).

    A position is at most one column of a head, so a position-to-column map finds each ring
    entry's column without comparing every pair. ``last_pos``, the largest query position,
    bounds every position when the caller knows it on the host (the map is then sized by it:
    the same result, without reading the positions back).
    """
    b, heads, width = pos.shape
    rpos = residual.pos
    # Columns past a head's count hold stale bytes: only valid positions size the map.
    live = torch.where(valid, pos, -1)
    if last_pos is not None:
        size = last_pos
    else:
        size = max(
            int(live.max()) if live.numel() else 0, int(rpos.max()) if rpos.numel() else 0, 0
        )
    columns = torch.full((b, heads, size + 2), -1, dtype=torch.int64)
    # Invalid columns are sent to the last, never-read position of the map.
    at = torch.where(valid, live.clamp(min=0), size + 1)
    columns.scatter_(2, at, torch.arange(width).expand(b, heads, width))
    columns[..., size + 1] = -1
    entry = torch.where(rpos >= 0, rpos, size + 1)[:, None].expand(b, heads, -1)
    target = columns.gather(2, entry)
    found = (target >= 0)[:, :, None, None]
    shape = (*ring_probs.shape[:-1], target.shape[-1])
    index = target.clamp(min=0)[:, :, None, None].expand(shape)
    return tier_probs.scatter_add(-1, index, torch.where(found, ring_probs, 0.0))


def prefill_probs(
    logits: torch.Tensor,
    visible: torch.Tensor,
    qg: torch.Tensor,
    residual: Residual,
    query_pos: torch.Tensor,
    own: int,
    skip: int,
    sliding: int | None,
    lse: torch.Tensor,
) -> torch.Tensor:
    """Probabilities ``[1, H, G, nq, W]`` of a prefill chunk's scoring queries ``qg`` [1, H,
    G, nq, D] (float32, not yet scaled, at ``query_pos`` [1, nq]) over a slot whose tier
    column ``c`` holds position ``c`` (a prompt before its first decision): the tier logits
    ``logits`` [1, H, G, nq, W] (scaled), seen where ``visible`` [nq, W] and older than the
    ring, and the ring's probability of each position added onto its column.

    ``residual`` ends with the chunk's ``own`` entries in position order (``Residual.append``),
    of which the first ``skip`` are older than any scoring query's ring: they are left out,
    so the ring part costs the ring and the scoring queries' band, not the whole chunk.
    ``lse`` [1, H, G, nq, 1] is each query's log-sum-exp over both parts, which the attention
    itself computed (``residual_prefill``): it normalises them as a softmax over their union
    would, without a second reduction over the logits.
    """
    last = query_pos - residual.window[:, None]
    columns = torch.arange(logits.shape[-1])
    logits = logits.masked_fill_(~(visible & (columns <= last[0, :, None])), -torch.inf)
    ring = residual.pos.shape[1] - own
    # Only keys and positions are read (``ring_logits``): the values stay out of the copy.
    band = Residual(
        torch.cat([residual.keys[:, :, :ring], residual.keys[:, :, ring + skip :]], 2),
        residual.values[:, :, :0],
        torch.cat([residual.pos[:, :ring], residual.pos[:, ring + skip :]], 1),
        residual.window,
    )
    band_logits = ring_logits(qg, band, query_pos, sliding)
    probs = logits.sub_(lse).exp_()
    # Empty entries (position -1) add exp(-inf) = 0 to column 0.
    return probs.index_add_(-1, band.pos[0].clamp(min=0), band_logits.sub_(lse).exp_())
