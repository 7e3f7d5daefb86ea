"""Prefill chunks of uniform requests: causal attention over a slot's stored tokens, with the
residual window's newest tokens uncompressed where the slot has one (``PagedAttention`` calls
``attend_prefill`` for each chunk; tiered requests take ``tiered_prefill``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierkv.kv.backends.partial import causal_attention, flash_serves, residual_prefill
from tierkv.kv.store.kv_store import KVStore
from tierkv.kv.store.views import Residual, causal_visibility

# Queries per attention call of a prefill chunk with a residual window (see ``attend_prefill``).
_PREFILL_BLOCK = 256


@dataclass
class PrefillRow:
    """A uniform request's prefill chunk: batch row, store slot, its tokens' offset and count in
    the step, the tokens stored before it, its residual window and ring size (0: none), and
    its format index."""

    row: int
    slot: int
    start: int
    n: int
    context: int
    recent: int
    ring: int
    f: int


def attend_prefill(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    pre: PrefillRow,
    window: int | None,
    residual: Residual | None,
) -> torch.Tensor:
    """Attention of one uniform request's prefill chunk ``q`` [n, Hq, D] over its stored
    tokens, the chunk's own included (written before): dense causal attention, or with a
    residual window the ring's and the chunk's uncompressed entries within each query's window
    and the quantized tokens before it. Output [n, Hq, D] in ``q``'s dtype."""
    n, context = q.shape[0], pre.context
    total = context + n
    keys, values = store.gather(layer, torch.tensor([pre.slot]), total, q.dtype, pre.f)
    keys, values = keys[:, :, :total], values[:, :, :total]
    queries = q.transpose(0, 1)[None]
    kpos = torch.arange(total)
    if residual is None:
        return causal_attention(queries, keys, values, context, window)[0].transpose(0, 1)
    window_r = pre.recent
    if window is None or (flash_serves(queries) and window > window_r):
        # The chunk's live residual entries, known on the host: the ring's newest
        # min(context, ring) positions, then the chunk's own n.
        live = min(context, pre.ring)
        host = (window_r, residual.pos.shape[1] - live - n, context - live)
        out = residual_prefill(queries, keys, values, context, residual, window, host)[0]
        return out[0].transpose(0, 1)
    # Each block of queries sees the quantized keys older than its residual windows and,
    # uncompressed, the ring's entries and the chunk's own tokens within those windows: a
    # block of B queries adds B + R - 1 keys, where the whole chunk at once would add n.
    ring = residual.keys.shape[2] - n
    out = torch.empty_like(queries)
    for start in range(0, n, _PREFILL_BLOCK):
        stop = min(n, start + _PREFILL_BLOCK)
        qpos = torch.arange(context + start, context + stop)
        seen = context + stop
        quantized = causal_visibility(qpos, kpos[:seen], window)
        quantized &= kpos[:seen] <= qpos[:, None] - window_r
        own = torch.arange(max(0, start - window_r + 1), stop) + ring
        cols = torch.cat([torch.arange(ring), own])
        block = Residual(
            residual.keys[:, :, cols],
            residual.values[:, :, cols],
            residual.pos[:, cols],
            residual.window,
        )
        out[:, :, start:stop] = F.scaled_dot_product_attention(
            queries[:, :, start:stop],
            torch.cat([keys[:, :, :seen], block.keys.to(keys.dtype)], 2),
            torch.cat([values[:, :, :seen], block.values.to(values.dtype)], 2),
            attn_mask=torch.cat([quantized, block.visible(qpos[None], window)[0]], 1),
            enable_gqa=True,
        )
    return out[0].transpose(0, 1)
