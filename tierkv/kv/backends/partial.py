"""Attention split over disjoint sets of tokens, the merge that makes it whole again, the
causal (sliding-window) visibility every path masks with, and causal prefill attention that
needs no mask (by the native flash kernel in bfloat16, ``csrc/flash_prefill.cpp``).

A part is ``(out, lse)``: the softmax-weighted values over its tokens and the log-sum-exp of
its logits. Two parts over disjoint tokens combine exactly into attention over their union
(``merge``), which lets a kernel attend over the quantized pages while the residual window's
uncompressed tokens (``KVStore.read_residual``) are attended here, in torch.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from tierkv import extension
from tierkv.kv.store.views import Residual, causal_visibility

# Queries per batched matrix product of a residual window's band (``_residual_band``).
_BAND_BLOCK = 16


@functools.cache
def _flash_built() -> bool:
    return extension.available() and torch.ops.tierkv.flash_prefill_supported()


def flash_serves(queries: torch.Tensor) -> bool:
    """Whether ``flash`` computes attention for ``queries`` [1, Hq, n, D]: bfloat16, a head dim
    that is a multiple of 16, and the extension built with the CPU's bf16 dot product."""
    return queries.dtype == torch.bfloat16 and queries.shape[-1] % 16 == 0 and _flash_built()


def flash(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    shift: int,
    window: int | None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``queries`` [1, Hq, n, D] over ``keys``/``values`` [1, H, T, D] (H divides
    Hq) by the native kernel (``flash_serves``), query ``i`` seeing keys ``j <= i + shift``
    and, under a sliding ``window``, ``j > i + shift - window``. Returns ``(out [1, Hq, n, D]
    bfloat16, lse [1, Hq, n] float32)``; a query seeing no key gets zeros and lse -inf.

    ``state``: an earlier call's ``(out, lse)`` for the same queries over other keys; the
    softmax goes on from it, so the result is attention over both (``merge``'s, in one pass
    and one rounding)."""
    init_out = init_lse = None
    if state is not None:
        # The kernel's own layouts, [n, Hq, D] and [Hq, n]: views of what it returned.
        init_out, init_lse = state[0][0].transpose(0, 1).contiguous(), state[1][0].contiguous()
    out, lse = torch.ops.tierkv.flash_prefill(
        queries[0],
        keys[0],
        values[0],
        shift,
        window or 0,
        1.0 / math.sqrt(queries.shape[-1]),
        init_out,
        init_lse,
    )
    return out.transpose(0, 1)[None], lse[None]


def flash_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    lse: torch.Tensor,
    shift: int,
    window: int | None,
) -> torch.Tensor:
    """The probability mass each of ``keys`` [1, H, T, D] receives from ``queries`` [1, Hq, m,
    D] that see them as ``flash`` would (query ``i`` keys ``j <= i + shift``, within a sliding
    ``window``), normalised by ``lse`` [1, Hq, m], each query's log-sum-exp over everything it
    attends: ``[1, Hq, T]`` float32 sums over the queries (``flash_serves``; the native
    kernel's bf16 pair products, as the attention's own logits)."""
    sums = torch.ops.tierkv.flash_scores(
        queries[0],
        keys[0],
        lse[0].contiguous(),
        shift,
        window or 0,
        1.0 / math.sqrt(queries.shape[-1]),
    )
    return sums[None]


def causal_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    context: int,
    window: int | None,
) -> torch.Tensor:
    """Attention of a prefill chunk: ``queries`` [1, Hq, n, D] at positions ``context ..
    context + n - 1`` over ``keys``/``values`` [1, H, context + n, D] (H divides Hq), each
    query seeing ``causal_visibility``'s keys. Output in the queries' dtype.

    SDPA with a boolean mask computes every (query, key) pair, half of them masked; its causal
    mode skips the masked blocks (1.6x faster at 1536 tokens here) but aligns queries with the
    first keys. So a chunk attends its own tokens causally and the ``context`` keys before it
    unmasked, and the two parts are merged by their log-sum-exps. Sliding windows keep the mask.
    The native ``flash`` kernel, where it serves, does it all in one call.
    """
    if flash_serves(queries):
        return flash(queries, keys, values, context, window)[0]
    if window is not None:
        visible = causal_visibility(
            torch.arange(context, keys.shape[2]), torch.arange(keys.shape[2]), window
        )
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=visible, enable_gqa=True
        )
    if context == 0:
        return F.scaled_dot_product_attention(
            queries, keys, values, is_causal=True, enable_gqa=True
        )
    group = queries.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    # The CPU flash kernel behind SDPA, which also returns the log-sum-exp a merge needs.
    sdpa_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    own, own_lse = sdpa_flash(
        queries, keys[:, :, context:], values[:, :, context:], is_causal=True
    )[:2]
    old, old_lse = sdpa_flash(queries, keys[:, :, :context], values[:, :, :context])[:2]
    return merge(own, own_lse, old, old_lse)[0].to(queries.dtype)


def residual_prefill(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    context: int,
    residual: Residual,
    sliding: int | None = None,
    host: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a prefill chunk of a slot with a residual window: ``queries`` [1, Hq, n, D]
    at positions ``context .. context + n - 1`` see the dequantized ``keys``/``values``
    [1, H, context + n, D] at least ``R`` positions older than themselves (``R =
    residual.window``) and ``residual``'s uncompressed entries (the ring's, then the chunk's
    own, ``Residual.append``) within the newest ``R``. Output in the queries' dtype.

    No mask over the whole chunk: the quantized keys split into those every query sees
    (positions up to ``context - R``), attended unmasked, and the next ones, which query ``i``
    sees up to ``i - s`` (``s`` the first query that sees any): a causal square of the later
    queries over them. The uncompressed entries are a band of ``R`` per query
    (``_residual_band``). The three parts are merged by log-sum-exp. The native ``flash``
    kernel, where it serves, attends the quantized keys in one call (query ``i`` sees those up
    to position ``context + i - R``) and the uncompressed entries in another (a band of ``R``
    over them in position order), and then also under a ``sliding`` window wider than ``R``
    (the band is inside it; the quantized keys seen shrink to ``sliding - R``), the second call
    going on from the first's softmax.

    Returns the output in the queries' dtype and each query's log-sum-exp over everything it
    saw (float32 [1, Hq, n]), from which a tiered slot's scores are normalised.

    ``host`` is ``(R, empty entries, first live position)`` when the caller knows them on the
    host (``PagedAttention.plan``); else they are read from ``residual``.
    """
    n = queries.shape[2]
    recent = int(residual.window[0]) if host is None else host[0]
    if flash_serves(queries):
        stop = max(0, context + n - recent)
        quantized = None if sliding is None else sliding - recent
        out, lse = flash(
            queries, keys[:, :, :stop], values[:, :, :stop], context - recent, quantized
        )
        band_keys, band_values, first = band_entries(residual, host)
        # The band continues the quantized part's softmax: no merge of two outputs.
        return flash(queries, band_keys, band_values, context - first, recent, (out, lse))
    if sliding is not None:
        raise ValueError("a sliding window in residual_prefill needs the native flash kernel")
    group = queries.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    sdpa_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out = torch.zeros(queries.shape, dtype=torch.float32)
    lse = torch.full(queries.shape[:3], -torch.inf)
    # Quantized keys every query sees: positions [0, context - R].
    seen_by_all = max(0, context - recent + 1)
    if seen_by_all:
        every = slice(0, seen_by_all)
        part, part_lse = sdpa_flash(queries, keys[:, :, every], values[:, :, every])[:2]
        out, lse = merge(out, lse, part, part_lse)
    # The next ones, [seen_by_all, context + n - R): query i sees the j-th iff j <= i - s.
    first = seen_by_all - (context - recent)
    if first < n:
        stop = context + n - recent
        part, part_lse = sdpa_flash(
            queries[:, :, first:],
            keys[:, :, seen_by_all:stop],
            values[:, :, seen_by_all:stop],
            is_causal=True,
        )[:2]
        tail_out, tail_lse = merge(out[:, :, first:], lse[:, :, first:], part, part_lse)
        out[:, :, first:], lse[:, :, first:] = tail_out, tail_lse
    band_out, band_lse = _residual_band(queries, residual, context, recent)
    out, lse = merge(out, lse, band_out, band_lse)
    return out.to(queries.dtype), lse


def band_entries(
    residual: Residual, host: tuple[int, int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A one-slot ``residual``'s live entries in position order, keys and values [1, H, E, D],
    and the position of the first: consecutive positions from it on (empty ones, at -1, sort
    first and are left out), so query ``p`` sees those within ``R`` of it as a band. ``host``:
    as ``residual_prefill``'s."""
    order = residual.pos[0].argsort()
    if host is None:
        empty = int((residual.pos[0] < 0).sum())
        first = int(residual.pos[0, order[empty]])
    else:
        empty, first = host[1], host[2]
    live = order[empty:]
    return residual.keys[:, :, live], residual.values[:, :, live], first


def _residual_band(
    queries: torch.Tensor, residual: Residual, context: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual_prefill``'s uncompressed part: each query over the entries of the newest
    ``window`` positions up to its own, as ``(out [1, Hq, n, D] float32, lse [1, Hq, n])``.

    Sorted by position, the live entries are consecutive positions ending with the chunk's
    own (empty ones, at -1, come first). A block of ``_BAND_BLOCK`` queries then has its
    candidates in one run of entries, its own and the ``window - 1`` before them: one batched
    matrix product per block, masked to each query's window.
    """
    _, hq, n, dim = queries.shape
    heads = residual.keys.shape[1]
    blocks, block = -(-n // _BAND_BLOCK), _BAND_BLOCK
    span = block + window - 1
    order = residual.pos[0].argsort()
    # Entries padded with empty ones: ``window`` in front (the first queries' windows reach
    # before the first entry) and behind, up to the last block's end.
    behind = blocks * block - n
    pos = F.pad(residual.pos[0][order], (window, behind), value=-1)
    keys = F.pad(residual.keys[0][:, order].float(), (0, 0, window, behind))
    values = F.pad(residual.values[0][:, order].float(), (0, 0, window, behind))
    first = pos.shape[0] - behind - n - window + 1  # query 0's first candidate
    band_keys = keys[:, first:].unfold(1, span, block)  # [H, blocks, D, span]
    band_values = values[:, first:].unfold(1, span, block).transpose(-1, -2)
    band_pos = pos[first:].unfold(0, span, block)[:, None, :]  # [blocks, 1, span]
    query_pos = torch.arange(context, context + blocks * block).view(blocks, block, 1)
    visible = (band_pos >= 0) & (band_pos > query_pos - window) & (band_pos <= query_pos)
    qg = F.pad(queries[0].float(), (0, 0, 0, behind)) * (1.0 / math.sqrt(dim))
    qg = qg.view(heads, hq // heads, blocks, block, dim)
    logits = torch.matmul(qg, band_keys[:, None]).masked_fill_(~visible, -torch.inf)
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.matmul(probs, band_values[:, None])  # [H, G, blocks, block, D]
    out = out.reshape(1, hq, blocks * block, dim)[:, :, :n]
    return out, lse.reshape(1, hq, blocks * block)[:, :, :n]


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
