"""Tiered attention for a prefill chunk: dense causal attention over the request's tokens (all
still in the high tier, in position order), with probabilities only for the queries that
score."""

from __future__ import annotations

import math

import torch

from tierkv.kv.backends import tiered_ring
from tierkv.kv.backends.base import TieredAttention, UnitHost
from tierkv.kv.backends.partial import (
    band_entries,
    causal_attention,
    flash,
    flash_scores,
    flash_serves,
    residual_prefill,
)
from tierkv.kv.store.kv_store import HIGH, KVStore
from tierkv.kv.store.views import Residual, causal_visibility


def dense_serves(
    q: torch.Tensor, residual: Residual | None, window: int | None, host: UnitHost | None = None
) -> bool:
    """Whether ``attend_prefill`` serves a chunk: ``residual_prefill`` takes a sliding window
    only through the native flash kernel and when the window is wider than the ring."""
    if residual is None or window is None:
        return True
    recent = int(residual.window.max()) if host is None else host.recent
    return flash_serves(q[:1, 0].transpose(0, 1)[None]) and window > recent


def attend_prefill(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    query_pos: torch.Tensor,
    window: int | None,
    residual: Residual | None = None,
    host: UnitHost | None = None,
) -> tuple[TieredAttention, torch.Tensor]:
    """``attend`` for a prefill chunk of one request (``q`` [1, n, Hq, D]).

    Chunks come before the request's first decision, so its tokens are all in the high tier, in
    position order: the output is dense causal attention over them (``causal_attention``, or
    ``residual_prefill`` with a ring), and probabilities are computed only for the queries that
    score (the last ``sw`` of the prompt), none when no query of the chunk does. Returns the
    attention, its probabilities covering those queries, and their positions.
    """
    n = q.shape[1]
    total = (int(query_pos[0, -1]) if host is None else host.last_pos) + 1
    f = None if host is None else host.formats[HIGH]
    keys, values = store.gather(layer, slots, total, q.dtype, f)
    # The probabilities span every column ``read_tier`` gives (whole pages); attention, only
    # the tokens.
    _, heads, width, dim = keys.shape
    queries = q[0].transpose(0, 1)[None]
    context = total - n
    native = flash_serves(queries)
    kept = (keys[:, :, :total], values[:, :, :total])
    live = None
    if residual is None:
        if native:
            out, lse = flash(queries, *kept, context, window)
        else:
            out = causal_attention(queries, *kept, context, window)
    else:
        live = None if host is None else _live_entries(store, host, residual, context, n)
        out, lse = residual_prefill(queries, *kept, context, residual, window, live)
    if host is None:
        counting = int((query_pos[0] >= store.tiers.score_start[slots[0]]).sum())
    else:
        counting = host.counting
    if not counting:
        return TieredAttention(out[0].transpose(0, 1)[None], None, scored=True), query_pos
    first = n - counting
    if native:
        # The native kernel sums each token's probabilities over the scoring queries from the
        # same logits the attention used: no float32 logits of their own, no softmax.
        sums = _native_scores(queries, keys, lse, first, context, window, residual, live)
        att = TieredAttention(out[0].transpose(0, 1)[None], sums, summed=True)
        return att, query_pos[:, first:]
    columns = torch.arange(width)
    visible = causal_visibility(query_pos[0, first:], columns, window)
    group = q.shape[2] // heads
    scoring = queries[:, :, first:].float().view(1, heads, group, n - first, dim)
    logits = scoring @ keys.float()[:, :, None].transpose(-1, -2) * (1.0 / math.sqrt(dim))
    if residual is None:
        probs = logits.masked_fill_(~visible, -torch.inf).softmax(-1)
        return TieredAttention(out[0].transpose(0, 1)[None], probs), query_pos[:, first:]
    scored_pos = query_pos[:, first:]
    # The scoring queries see uncompressed from ``scored_pos[0] - R + 1`` on: the chunk's own
    # entries before that position are left out of the ring part.
    if host is None:
        first_scored, recent = int(scored_pos[0, 0]), int(residual.window[0])
    else:
        first_scored, recent = host.last_pos - counting + 1, host.recent
    skip = max(0, first_scored - recent + 1 - context)
    lse = lse[:, :, first:].reshape(1, heads, group, n - first, 1)
    probs = tiered_ring.prefill_probs(
        logits, visible, scoring, residual, scored_pos, n, skip, window, lse
    )
    return TieredAttention(out[0].transpose(0, 1)[None], probs), scored_pos


def _native_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    lse: torch.Tensor,
    first: int,
    context: int,
    window: int | None,
    residual: Residual | None,
    live: tuple[int, int, int] | None,
) -> torch.Tensor:
    """``attend_prefill``'s probabilities of the scoring queries (``queries`` [1, Hq, n, D]
    from ``first`` on, ``lse`` [1, Hq, n] their log-sum-exps), summed over them by
    ``flash_scores``: ``[1, H, G, 1, W]`` over the ``W`` columns of ``keys`` [1, H, W, D]
    (column ``c`` holding position ``c``). Tier columns are seen ``R`` positions behind each
    query (``R`` the residual window, 0 without a ring); the ring's entries, the newest ``R``
    positions, add their probabilities onto their positions' columns."""
    _, hq, n, _ = queries.shape
    heads, width = keys.shape[1], keys.shape[2]
    scoring, scoring_lse = queries[:, :, first:], lse[:, :, first:]
    recent = 0 if residual is None else (int(residual.window[0]) if live is None else live[0])
    stop = max(0, context + n - recent)  # a prompt shorter than the ring has no tier part
    quantized = None if window is None else window - recent
    sums = torch.zeros(1, hq, width)
    sums[..., :stop] = flash_scores(
        scoring, keys[:, :, :stop], scoring_lse, context - recent + first, quantized
    )
    if residual is not None:
        band_keys, _, start = band_entries(residual, live)
        band = flash_scores(scoring, band_keys, scoring_lse, context - start + first, recent)
        sums[..., start : start + band.shape[-1]] += band
    return sums.view(1, heads, hq // heads, 1, width)


def _live_entries(
    store: KVStore, host: UnitHost, residual: Residual, context: int, n: int
) -> tuple[int, int, int]:
    """``residual_prefill``'s host facts for a chunk of one slot: its residual window, the
    empty entries of ``residual`` (columns without a token) and the first live position: the
    slot's ring holds its newest ``min(context, ring)`` positions before the chunk, then come
    the chunk's own ``n``."""
    live = min(context, host.ring_pages * store.layouts[0].tokens_per_page)
    return host.recent, residual.pos.shape[1] - live - n, context - live
