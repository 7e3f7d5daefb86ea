"""The Triton kernel of tiered slots' decode (``tiered.tiered_decode``).

One program per (slot, KV head). It walks the head's pages of the high tier
and then of the low tier through the store's page tables in place, each tier in its own format
(bit widths, group width and tokens per page are compile-time constants per tier), dequantizes
keys and values in registers (``kernels._dequantize``), scores every query head of the GQA
group, and keeps one online softmax over both tiers. Besides the output and the log-sum-exp it
writes each column's scaled logit (-inf where the query does not see the token) and, for slots
with residual rings, each column's position, so the caller normalises the probabilities after
merging the ring's part.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tierkv.kv.backends.triton.kernels import _dequantize, softmax_finish, softmax_step

# Offsets per tier in the ``FIELDS`` table ``tiered_decode`` reads, in this order.
FIELD_ORDER = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "pos")


@triton.jit
def _tier(
    q,
    m,
    denom,
    acc,
    ARENA,
    PAGES,
    count,
    FIELDS,
    LOGITS,
    POS,
    logit_row,
    pos_row,
    col0,
    width,
    last,
    lo,
    page_bytes,
    sm_scale,
    g,
    gmask,
    d,
    dmask,
    TIER: tl.constexpr,
    D: tl.constexpr,
    TPP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    KEY_BITS: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    GROUP_W: tl.constexpr,
    RING: tl.constexpr,
):
    """Fold one tier's ``count`` tokens into the online softmax ``(m, denom, acc)``; a token
    is seen when its position is in ``(lo, last]``."""
    fields = FIELDS + TIER * 7
    k_codes = tl.load(fields + 0)
    k_scale = tl.load(fields + 1)
    k_zero = tl.load(fields + 2)
    v_codes = tl.load(fields + 3)
    v_scale = tl.load(fields + 4)
    v_zero = tl.load(fields + 5)
    pos_off = tl.load(fields + 6)
    groups: tl.constexpr = D // GROUP_W
    tok = tl.arange(0, BLOCK_T)
    in_page = tok < TPP
    for p in range(0, tl.cdiv(count, TPP)):
        page = tl.load(PAGES + p)
        base = ARENA + page * page_bytes
        index = p * TPP + tok
        # Rows past the head's count hold stale bytes (NaN patterns too): never loaded.
        held = in_page & (index < count)
        pos = tl.load((base + pos_off).to(tl.pointer_type(tl.int32)) + tok, mask=held, other=-1)
        seen = held & (pos <= last) & (pos > lo)
        mask = seen[:, None] & dmask[None, :]
        key = _dequantize(
            base,
            k_codes,
            k_scale,
            k_zero,
            tok,
            d,
            mask,
            KEY_BITS,
            D * KEY_BITS // 8,
            groups,
            GROUP_W,
        )
        logits = tl.sum(q[:, None, :] * key[None, :, :], axis=2) * sm_scale
        logits = tl.where(seen[None, :], logits, float("-inf"))
        col = col0 + index
        tl.store(
            LOGITS + logit_row + g[:, None] * width + col[None, :],
            logits,
            mask=gmask[:, None] & in_page[None, :],
        )
        if RING:
            tl.store(POS + pos_row + col, pos, mask=in_page)
        value = _dequantize(
            base,
            v_codes,
            v_scale,
            v_zero,
            tok,
            d,
            mask,
            VALUE_BITS,
            D * VALUE_BITS // 8,
            groups,
            GROUP_W,
        )
        m, denom, acc = softmax_step(m, denom, acc, logits, value)
    return m, denom, acc


@triton.jit
def tiered_decode(
    Q,
    ARENA,
    TABLES,
    COUNT,
    SLOTS,
    QPOS,
    RESIDUAL,
    FIELDS,
    OUT,
    LSE,
    LOGITS,
    POS,
    layer,
    window,
    width_high,
    width,
    page_bytes,
    sm_scale,
    stride_qb,
    stride_qh,
    st_slot,
    st_layer,
    st_head,
    st_tier,
    sc_slot,
    sc_layer,
    sc_head,
    HEADS: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    TPP_HIGH: tl.constexpr,
    BLOCK_HIGH: tl.constexpr,
    KB_HIGH: tl.constexpr,
    VB_HIGH: tl.constexpr,
    GW_HIGH: tl.constexpr,
    TPP_LOW: tl.constexpr,
    BLOCK_LOW: tl.constexpr,
    KB_LOW: tl.constexpr,
    VB_LOW: tl.constexpr,
    GW_LOW: tl.constexpr,
    RING: tl.constexpr,
):
    """Decode attention of the ``G`` query heads of batch row ``b`` sharing KV head ``h`` over
    both tiers of slot ``SLOTS[b]`` at ``layer``: ``OUT`` [B, HEADS * G, D] and ``LSE``
    [B, HEADS * G] float32 (-inf where nothing is seen), the scaled logits of every column
    into ``LOGITS`` [B, HEADS * G, width] (high tier's from column 0, low tier's from
    ``width_high``; the caller fills columns no page reaches with -inf) and, with ``RING``,
    the positions into ``POS`` [B, HEADS, width] (-1 past a head's count)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    gmask = g < G
    dmask = d < D
    heads = h * G + g
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)
    slot = tl.load(SLOTS + b)
    qpos = tl.load(QPOS + b)
    # The ring serves the newest ``RESIDUAL[b]`` positions; a window hides ``pos <= lo``.
    last = qpos - tl.load(RESIDUAL + b)
    lo = tl.where(window > 0, qpos - window, -1)
    pages = TABLES + slot * st_slot + layer * st_layer + h * st_head
    counts = COUNT + slot * sc_slot + layer * sc_layer + h * sc_head
    logit_row = (b * HEADS * G + h * G) * width
    pos_row = (b * HEADS + h) * width
    m = tl.full((GP,), float("-inf"), tl.float32)
    denom = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DP), tl.float32)
    m, denom, acc = _tier(
        q, m, denom, acc, ARENA, pages, tl.load(counts), FIELDS, LOGITS, POS,
        logit_row, pos_row, 0, width, last, lo, page_bytes, sm_scale, g, gmask, d, dmask,
        0, D, TPP_HIGH, BLOCK_HIGH, KB_HIGH, VB_HIGH, GW_HIGH, RING,
    )  # fmt: skip
    m, denom, acc = _tier(
        q, m, denom, acc, ARENA, pages + st_tier, tl.load(counts + 1), FIELDS, LOGITS, POS,
        logit_row, pos_row, width_high, width, last, lo, page_bytes, sm_scale, g, gmask, d,
        dmask, 1, D, TPP_LOW, BLOCK_LOW, KB_LOW, VB_LOW, GW_LOW, RING,
    )  # fmt: skip
    out, lse = softmax_finish(m, denom, acc)
    row = b * HEADS * G + heads
    tl.store(OUT + row[:, None] * D + d[None, :], out, mask=gmask[:, None] & dmask[None, :])
    tl.store(LSE + row, lse, mask=gmask)
