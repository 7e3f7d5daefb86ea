"""Attention split over disjoint sets of tokens, the merge that makes it whole again, and the
causal (sliding-window) visibility every path masks with.

A part is ``(out, lse)``: the softmax-weighted values over its tokens and the log-sum-exp of
its logits. Two parts over disjoint tokens combine exactly into attention over their union
(``merge``), which lets a kernel attend over the quantized pages while the residual window's
uncompressed tokens (``KVStore.read_residual``) are attended here, in torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the store builds its residual masks with ``causal_visibility``
    from tierkv.kv.store import Residual


def causal_visibility(
    query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None
) -> torch.Tensor:
    """``[..., nq, T]``: which keys at ``key_pos`` [T] queries at ``query_pos`` [..., nq] see:
    those at or before them, and within ``window`` positions under a sliding window."""
    qpos, kpos = query_pos[..., None], key_pos
    visible = kpos <= qpos
    if window is not None:
        visible &= kpos > qpos - window
    return visible


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint token sets into attention over their union.

    ``out_*`` [..., D] and ``lse_*`` [...]; a part with lse -inf (no token) has weight 0.
    Returns ``(out, lse)`` in float32.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # Where both parts are empty, lse is -inf: give both weight 0 rather than NaN.
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    wa = torch.exp(lse_a - safe)[..., None]
    wb = torch.exp(lse_b - safe)[..., None]
    return out_a.float() * wa + out_b.float() * wb, lse


def residual_part(
    q: torch.Tensor, residual: Residual, lens: torch.Tensor, window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q`` [B, Hq, D] (the query at position ``lens - 1``) over the
    residual entries it sees uncompressed: ``(out [B, Hq, D] float32, lse [B, Hq])``."""
    b, hq, dim = q.shape
    heads = residual.keys.shape[1]
    qg = q.float().view(b, heads, hq // heads, dim) * (1.0 / math.sqrt(dim))
    logits = torch.matmul(qg, residual.keys.float().transpose(-1, -2))
    seen = residual.visible((lens - 1)[:, None], window)[:, None]
    logits = logits.masked_fill_(~seen, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.matmul(probs, residual.values.float())
    return out.reshape(b, hq, dim), lse.reshape(b, hq)
