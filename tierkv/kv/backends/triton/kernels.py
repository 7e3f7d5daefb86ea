"""Triton kernels over the paged store.

``paged_decode``: one program per (request, KV head, split of the context). It walks its share
of the request's pages through the page table, loads each page's key codes in place,
dequantizes them in registers (code ``i`` of a token at byte ``i // (8 // bits)``, bit
``(i % (8 // bits)) * bits``; one fp16 scale and zero per group of channels,
``tierkv.kv.formats.quant``), scores every query head sharing the KV head (GQA) against them,
and folds the page into an online softmax before doing the same with the values. It returns
the output and the log-sum-exp of the logits of each split, so the caller merges the splits
(long contexts are cut into several, so that a small batch still fills the device) and then,
exactly, with attention computed elsewhere (the residual ring's uncompressed entries,
``tierkv.kv.backends.partial.merge``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dequantize(
    base,
    codes_off,
    scale_off,
    zero_off,
    tok,
    d,
    mask,
    BITS: tl.constexpr,
    CODE_BYTES: tl.constexpr,
    GROUPS: tl.constexpr,
    GROUP_W: tl.constexpr,
):
    """``[T, D]`` float32 values of tokens ``tok`` [T] (rows of the page at ``base``)."""
    per_byte: tl.constexpr = 8 // BITS
    byte = d // per_byte
    shift = (d % per_byte) * BITS
    raw = tl.load(base + codes_off + tok[:, None] * CODE_BYTES + byte[None, :], mask=mask, other=0)
    code = (raw.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)
    group = d // GROUP_W
    scales = (base + scale_off).to(tl.pointer_type(tl.float16))
    zeros = (base + zero_off).to(tl.pointer_type(tl.float16))
    at = tok[:, None] * GROUPS + group[None, :]
    scale = tl.load(scales + at, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros + at, mask=mask, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + zero


@triton.jit
def softmax_step(m, denom, acc, logits, value):
    """Fold one block into an online softmax: ``logits`` [G, T] (-inf where a token is not
    seen) and ``value`` [T, D] into the running maximum ``m`` and sum ``denom`` [G] and the
    unnormalised output ``acc`` [G, D]."""
    new_m = tl.maximum(m, tl.max(logits, axis=1))
    # Before a seen token the running maximum is -inf: keep the arithmetic finite.
    safe = tl.where(new_m == float("-inf"), 0.0, new_m)
    alpha = tl.exp(m - safe)
    probs = tl.exp(logits - safe[:, None])
    denom = denom * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + tl.sum(probs[:, :, None] * value[None, :, :], axis=1)
    return new_m, denom, acc


@triton.jit
def softmax_finish(m, denom, acc):
    """The output [G, D] and log-sum-exp [G] of an online softmax (zeros and -inf where
    nothing was seen)."""
    empty = denom == 0.0
    safe = tl.where(empty, 1.0, denom)
    return acc / safe[:, None], tl.where(empty, float("-inf"), m + tl.log(safe))


@triton.jit
def paged_decode(
    Q,
    ARENA,
    PAGES,
    STARTS,
    ENDS,
    OUT,
    LSE,
    num_pages,
    pages_per_split,
    sm_scale,
    page_bytes,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    stride_qb,
    stride_qh,
    stride_pb,
    stride_ph,
    HEADS: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    TPP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    KEY_BITS: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    GROUP_W: tl.constexpr,
):
    """Decode attention of ``G`` query heads of request ``b`` sharing KV head ``h`` over the
    tokens at positions ``[STARTS[b], ENDS[b])`` of its pages (token ``i`` at row ``i % TPP``
    of page ``PAGES[b, h, i // TPP]``), pages ``pages_per_split * split`` on of its split:
    ``OUT`` [B, HEADS * G, splits, D] float32 and ``LSE`` [B, HEADS * G, splits] float32
    (-inf where the split sees no token)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
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
    start = tl.load(STARTS + b)
    end = tl.load(ENDS + b)
    tok = tl.arange(0, BLOCK_T)
    m = tl.full((GP,), float("-inf"), tl.float32)
    denom = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DP), tl.float32)
    groups: tl.constexpr = D // GROUP_W
    first = split * pages_per_split
    for p in range(first, tl.minimum(first + pages_per_split, num_pages)):
        page = tl.load(PAGES + b * stride_pb + h * stride_ph + p)
        base = ARENA + page * page_bytes
        pos = p * TPP + tok
        valid = (tok < TPP) & (pos >= start) & (pos < end)
        mask = valid[:, None] & dmask[None, :]
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
        logits = tl.where(valid[None, :], logits, float("-inf"))
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
    out, lse = softmax_finish(m, denom, acc)
    row = (b * HEADS * G + heads) * splits + split
    tl.store(OUT + row[:, None] * D + d[None, :], out, mask=gmask[:, None] & dmask[None, :])
    tl.store(LSE + row, lse, mask=gmask)
