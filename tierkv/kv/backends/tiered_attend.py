"""Two-tier attention in torch: what every backend's tiered decode is held to.

Tiered heads hold different numbers of tokens in two formats, with gaps in their positions, so
attention is an explicit masked softmax: keys and values of both tiers are gathered and
dequantized, masked by each head's counts and by the stored positions (causality and sliding
windows), and the attention probabilities come out of the same pass (``attend``); the policy
adds them to the tokens' scores (``add_received``). It equals dense attention over the
dequantized kept tokens. The ``reference`` backend's tiered decode is ``attend`` as it is; the
``torch`` backend's folds the dequantization into the matmuls (``attend`` with a workspace,
``tierkv.kv.backends.torch.ops``); the ``cpu`` and ``triton`` kernels must match it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tierkv.kv.backends.base import TieredAttention, UnitHost
from tierkv.kv.backends.tiered_ring import fold, hide_recent, ring_logits, ring_mix
from tierkv.kv.backends.torch import ops as fast
from tierkv.kv.formats.quant import KVFormat
from tierkv.kv.store.kv_store import HIGH, LOW, KVStore
from tierkv.kv.store.views import Residual, TierRead, causal_visibility


def tier_columns(high: TierRead, low: TierRead) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, H, T] and validity of the columns of ``high`` then ``low``."""
    pos = torch.cat([high.fields["pos"], low.fields["pos"]], 2)[..., 0].long()
    return pos, torch.cat([high.valid, low.valid], -1)


def attend(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    query_pos: torch.Tensor,
    window: int | None,
    workspace: dict | None = None,
    residual: Residual | None = None,
    host: UnitHost | None = None,
) -> TieredAttention:
    """Attention of ``q`` [B, nq, Hq, D] at positions ``query_pos`` [B, nq] over what ``slots``
    keep at ``layer``; the slots must share their tier formats. Output in ``q``'s dtype.

    Given a ``workspace`` (the fast backend's buffers) and tier formats
    ``tierkv.kv.backends.torch.ops``
    serves, keys and values are never decoded: the dequantization is folded into the two
    matmuls of each tier (``fast.key_scores``, ``fast.value_mix``), with one softmax over both.
    With ``residual`` (slots with a ring, the step's own tokens appended), each query's newest
    positions come from it uncompressed (``tierkv.kv.backends.tiered_ring``). ``host``: the
    unit's host-side facts (``step_units``), read from the tables when None.
    """
    high = store.read_tier(layer, slots, HIGH, host=host and host.tier(layer, HIGH))
    low = store.read_tier(layer, slots, LOW, host=host and host.tier(layer, LOW))
    if host is None:
        slot = int(slots[0])
        formats = (store.format_of(slot, HIGH), store.format_of(slot, LOW))
    else:
        formats = (store.formats[host.formats[HIGH]], store.formats[host.formats[LOW]])
    pos, valid = tier_columns(high, low)
    b, nq, hq, dim = q.shape
    heads = store.num_kv_heads
    qg = q.float().view(b, nq, heads, hq // heads, dim).permute(0, 2, 3, 1, 4)
    visible = valid[:, :, None, None, :] & causal_visibility(
        query_pos[:, None, None, :], pos[:, :, None, None, :], window
    )
    if residual is not None:
        visible = hide_recent(visible, pos, query_pos, residual.window)
    fused = workspace is not None and all(fast.supports(f, dim) for f in formats)
    if fused:
        logits, mix = _fused(qg, (high, low), formats, valid, workspace)
    else:
        kh, vh = formats[0].decode(high.fields, torch.float32)
        kl, vl = formats[1].decode(low.fields, torch.float32)
        keys = torch.cat([kh, kl], 2)
        # Stale bytes past a head's count may decode to NaN: the logits' mask removes it from
        # the keys, but in the values a zero probability would keep it.
        values = torch.cat([vh, vl], 2).masked_fill(~valid[..., None], 0.0)
        logits = qg @ keys[:, :, None].transpose(-1, -2) / math.sqrt(dim)
    logits = logits.masked_fill(~visible, -torch.inf)
    if residual is not None:
        logits = torch.cat([logits, ring_logits(qg, residual, query_pos, window)], -1)
    probs = logits.softmax(-1)
    ring_probs = None
    if residual is not None:
        probs, ring_probs = probs.split([pos.shape[2], probs.shape[-1] - pos.shape[2]], -1)
    out = mix(probs) if fused else probs @ values[:, :, None]
    if ring_probs is not None:
        out = out + ring_mix(ring_probs, residual)
        last = None if host is None else host.last_pos
        probs = fold(probs, ring_probs, pos, valid, residual, last)
    out = out.permute(0, 3, 1, 2, 4).reshape(b, nq, hq, dim)
    return TieredAttention(out.to(q.dtype), probs)


def _fused(
    qg: torch.Tensor,
    reads: tuple[TierRead, TierRead],
    formats: tuple[KVFormat, KVFormat],
    valid: torch.Tensor,
    workspace: dict,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Logits ``[B, H, G, nq, T]`` of both tiers straight from their codes (see
    ``tierkv.kv.backends.torch.ops``), and the function that mixes their values by probabilities of
    that
    shape into the output ``[B, H, G, nq, D]``."""
    b, heads, group, nq, dim = qg.shape
    rows = qg.reshape(b, heads, group * nq, dim) * (1.0 / math.sqrt(dim))
    # Each non-empty tier with its name (for its workspace buffers) and its first column.
    tiers, start = [], 0
    for read, fmt, name in zip(reads, formats, ("high", "low"), strict=True):
        width = read.fields["pos"].shape[2]
        if width:
            tiers.append((read.fields, fmt, name, slice(start, start + width)))
        start += width
    scores = []
    for f, fmt, name, _ in tiers:
        keys = fast.unpack(f["k_codes"], fmt.key_bits, workspace, f"{name}_k")
        # Stale scales past a head's count may be NaN; the caller's mask removes them.
        scale, zero = (f[n].float().transpose(-1, -2) for n in ("k_scale", "k_zero"))
        scores.append(fast.key_scores(rows, keys, scale, zero, fmt.key_bits))
    logits = torch.cat(scores, -1).view(b, heads, group, nq, -1)

    def mix(probs: torch.Tensor) -> torch.Tensor:
        flat = probs.reshape(b, heads, group * nq, -1)
        out = torch.zeros(b, heads, group * nq, dim)
        for f, fmt, name, cols in tiers:
            # A zero probability would not remove a stale NaN scale from the values.
            keep = valid[:, :, None, cols]
            scale, zero = (
                torch.where(keep, f[n].float().transpose(-1, -2), 0.0)
                for n in ("v_scale", "v_zero")
            )
            values = fast.unpack(f["v_codes"], fmt.value_bits, workspace, f"{name}_v")
            out += fast.value_mix(flat[..., cols], values, scale, zero, fmt.value_bits)
        return out.view(b, heads, group, nq, dim)

    return logits, mix


def add_received(
    store: KVStore,
    layer: int,
    slots: torch.Tensor,
    query_pos: torch.Tensor,
    att: TieredAttention,
    host: UnitHost | None = None,
) -> None:
    """Add the attention the tokens of ``slots`` received at ``layer`` to their stored scores
    (the native decode already did). ``host``: as ``attend``'s."""
    if att.scored:
        return
    if host is None:
        if not bool((query_pos >= store.tiers.score_start[slots][:, None]).any()):
            return
    elif not host.counting:
        return
    tiers = [None, None] if host is None else [host.tier(layer, HIGH), host.tier(layer, LOW)]
    high = store.read_tier(layer, slots, HIGH, ("score",), tiers[HIGH])
    low = store.read_tier(layer, slots, LOW, ("score",), tiers[LOW])
    width = high.fields["score"].shape[2]
    stored = torch.cat([high.fields["score"], low.fields["score"]], 2)[..., 0]
    pool = None if host is None else host.pool
    scores = stored + store.tiers.received(att.probs, slots, query_pos, pool, att.summed)
    formats = (None, None) if host is None else host.formats
    store.write_scores(layer, slots, HIGH, scores[..., :width], formats[HIGH])
    store.write_scores(layer, slots, LOW, scores[..., width:], formats[LOW])


def decode_and_score(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    query_pos: torch.Tensor,
    window: int | None,
    host: UnitHost,
    residual: Residual | None,
    workspace: dict | None = None,
) -> torch.Tensor:
    """``KVBackend.tiered_decode`` in torch: ``attend`` one query per slot (``q`` [B, Hq, D]
    at ``query_pos`` [B]) and ``add_received``; fused over the codes with a ``workspace``."""
    att = attend(
        store, layer, q[:, None], slots, query_pos[:, None], window, workspace, residual, host
    )
    add_received(store, layer, slots, query_pos[:, None], att, host)
    return att.out[:, 0]
