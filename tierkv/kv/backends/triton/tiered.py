"""The ``triton`` backend's decode over tiered slots: both tiers read in place by one kernel
launch (``tiered_kernels.tiered_decode``), the residual ring and the final merge in torch.

The kernel gives the tiers' part as ``(out, lse)`` and every column's scaled logit; the ring's
part (its uncompressed newest positions, ``tiered_ring``) is merged by log-sum-exp
(``partial.merge``'s rule), and only then are the columns' logits normalised, by the log-sum-exp
over both parts, into the probabilities the policy scores tokens by.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from triton import next_power_of_2

from tierkv.kv.backends.tiered_ring import fold, ring_logits
from tierkv.kv.store.kv_store import HIGH, LOW, KVStore
from tierkv.kv.store.views import Residual

# The key of this op's layer-invariant arguments in the caller's per-step ``cache``.
_CACHE_KEY = "triton_tiered_decode"


@dataclass(frozen=True)
class _Invariant:
    """What ``tiered_decode`` works out once per step and group of slots: the same at every
    layer."""

    formats: tuple[int, int]
    per_page: tuple[int, int]
    fields: torch.Tensor  # [2, 7] byte offsets of FIELD_ORDER per tier, on the arena's device
    constants: dict[str, int]  # the kernel's compile-time constants of both tiers
    residual: torch.Tensor  # [B] each slot's ring window (0: none), on the arena's device
    ring_pages: int  # FULL pages of the largest ring; 0 when no slot has one


def tiered_decode(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    query_pos: torch.Tensor,
    window: int | None,
    *,
    formats: tuple[int, int] | None = None,
    pages: tuple[int, int] | None = None,
    cache: dict | None = None,
    residual: Residual | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of tiered slots over both tiers, read in place (after the step's write).

    ``q`` [B, Hq, D] is one query per slot at position ``query_pos`` [B] (int64); the slots
    share their (quantized) tier formats. Each (slot, KV head) attends the ``store.count``
    tokens it holds in each tier with ``pos <= query_pos`` and, under a sliding ``window``,
    ``pos > query_pos - window``. Slots with a residual ring (``store.residual``) see their
    newest positions from the ring instead (``store.read_residual``), and the ring's
    probability of a position is added onto the column of its tier token.

    Returns ``(out, probs)``: ``out`` [B, Hq, D] in ``q``'s dtype and ``probs`` float32
    [B, H, G, T_high + T_low] (G = Hq // H), columns laid out as ``read_tier``'s pages of the
    high tier then of the low tier; 0 past a head's count and for tokens it does not see.
    ``formats``: the slots' (high, low) format indices when the caller knows them; ``pages``:
    the pages covering the largest count of each tier at ``layer`` (``UnitHost.pages``), read
    from the counts (a host sync) when None. ``cache``:
    a dict the caller keeps for one step and one group of ``slots``, where the first layer
    leaves the arguments that are the same at every layer for the others. ``residual``: the
    slots' ring entries, their own tokens included, when the caller has read them (else they
    are read here, after the write). The results equal
    the cpu backend's ``tiered_decode`` (without ``score``) up to float32 summation order.
    """
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must be positive, got {window}")
    b, hq, dim = q.shape
    heads = store.num_kv_heads
    group = hq // heads
    if not b:
        return torch.empty_like(q), torch.zeros(0, heads, group, 0)
    inv = cache.get(_CACHE_KEY) if cache is not None else None
    if inv is None:
        inv = _layer_invariant(store, slots, formats)
        if cache is not None:
            cache[_CACHE_KEY] = inv
    # Columns per tier: the pages covering the largest count, whole (as ``read_tier`` reads).
    if pages is None:
        most = store.count[slots, layer, :, : LOW + 1].amax((0, 1)).tolist()
        pages = tuple(-(-c // p) for c, p in zip(most, inv.per_page, strict=True))
    widths = [n * p for n, p in zip(pages, inv.per_page, strict=True)]
    width = sum(widths)
    arena = store.pool.arena
    device = arena.device
    tables, count, rows, at = store.tables, store.count, slots.to(device), layer
    if tables.device != device:
        # Tables kept on the host: this layer's rows of the slots travel instead.
        num = max(pages)
        tables = store.tables[slots, layer : layer + 1, :, : LOW + 1, :num].to(device)
        count = store.count[slots, layer : layer + 1, :, : LOW + 1].to(device)
        rows, at = torch.arange(b, device=device), 0
    ring = inv.ring_pages > 0
    q = q.contiguous()
    out = torch.empty(b, hq, dim, dtype=torch.float32, device=device)
    lse = torch.empty(b, hq, dtype=torch.float32, device=device)
    logits = torch.full((b, hq, width), -torch.inf, device=device)
    pos = torch.full((b, heads, width if ring else 1), -1, dtype=torch.int32, device=device)
    _kernels().tiered_decode[(b, heads)](
        q,
        arena,
        tables,
        count,
        rows,
        query_pos.to(device),
        inv.residual,
        inv.fields,
        out,
        lse,
        logits,
        pos,
        at,
        window or 0,
        widths[HIGH],
        width,
        arena.shape[1],
        1.0 / math.sqrt(dim),
        q.stride(0),
        q.stride(1),
        *tables.stride()[:4],
        *count.stride()[:3],
        HEADS=heads,
        G=group,
        GP=next_power_of_2(group),
        D=dim,
        DP=next_power_of_2(dim),
        RING=ring,
        **inv.constants,
    )
    logits = logits.view(b, heads, group, width)
    out, lse = out.view(b, heads, group, dim), lse.view(b, heads, group)
    if not ring:
        probs = torch.exp(logits - _finite(lse)[..., None])
        return out.view(b, hq, dim).to(q.dtype), probs
    if residual is None:
        residual = store.read_residual(layer, slots, inv.ring_pages)
    qg = q.float().view(b, heads, group, 1, dim)
    ring_lg = ring_logits(qg, residual, query_pos[:, None], window)[:, :, :, 0]
    total = torch.logaddexp(lse, torch.logsumexp(ring_lg, -1))
    safe = _finite(total)
    ring_probs = torch.exp(ring_lg - safe[..., None])
    out = out * torch.exp(lse - safe)[..., None] + ring_probs @ residual.values.float()
    probs = torch.exp(logits - safe[..., None])
    pos = pos.long()
    probs = fold(probs[:, :, :, None], ring_probs[:, :, :, None], pos, pos >= 0, residual)
    return out.view(b, hq, dim).to(q.dtype), probs[:, :, :, 0]


def _layer_invariant(
    store: KVStore, slots: torch.Tensor, formats: tuple[int, int] | None
) -> _Invariant:
    """``tiered_decode``'s arguments that depend on the slots and their formats only."""
    from tierkv.kv.backends.triton.tiered_kernels import FIELD_ORDER

    if formats is None:
        slot = int(slots[0])
        formats = (int(store.slot_format[slot, HIGH]), int(store.slot_format[slot, LOW]))
    device = store.pool.arena.device
    constants: dict[str, int] = {}
    offsets = []
    for f, name in zip(formats, ("HIGH", "LOW"), strict=True):
        fmt, layout = store.formats[f], store.layouts[f]
        if not fmt.quantized:
            raise ValueError(f"{fmt.name}: the triton tiered decode reads quantized tiers only")
        fields = {field.name: field for field in layout.fields}
        per_page = layout.tokens_per_page
        constants.update(
            {
                f"TPP_{name}": per_page,
                f"BLOCK_{name}": next_power_of_2(per_page),
                f"KB_{name}": fmt.key_bits,
                f"VB_{name}": fmt.value_bits,
                f"GW_{name}": store.head_dim // fields["k_scale"].numel,
            }
        )
        offsets.append([layout.offsets()[field] for field in FIELD_ORDER])
    residual = store.residual[slots]
    per_ring_page = store.layouts[0].tokens_per_page
    ring_pages = int(store.ring[slots].max()) // per_ring_page if bool(residual.any()) else 0
    return _Invariant(
        formats=formats,
        per_page=(
            store.layouts[formats[0]].tokens_per_page,
            store.layouts[formats[1]].tokens_per_page,
        ),
        fields=torch.tensor(offsets, device=device),
        constants=constants,
        residual=residual.to(device),
        ring_pages=ring_pages,
    )


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with -inf (nothing seen) as 0, so the probabilities come out 0, not NaN."""
    return torch.where(torch.isinf(lse), 0.0, lse)


@functools.cache
def _kernels():  # type: ignore[no-untyped-def]
    from tierkv.kv.backends.triton import tiered_kernels

    return tiered_kernels
