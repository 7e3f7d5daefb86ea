"""The ``triton`` backend's store writes: a step's keys and values quantized into their pages
by one Triton kernel, the same bytes as ``KVFormat.encode`` and the cpu backend's
``store_tokens``.

``quantize_store`` runs one program per (token, KV head): the min/max quantizer of
``tierkv.kv.formats.quant`` in registers, bit for bit (fp16 zero and scale rounded to nearest
and then one fp16 step outwards where that landed inside the range, IEEE division, codes
rounded half to even), written with a zero score and the token's position into its page row.
This module imports triton: import it where triton is installed (as ``backend`` imports
``kernels`` lazily).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tierkv.kv.formats.layout import PageLayout
from tierkv.kv.store.kv_store import KVStore

# Page fields the kernel writes, in the order of its ``FIELDS`` offsets.
WRITE_ORDER = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "score", "pos")


@functools.cache
def _field_offsets(layout: PageLayout, device: torch.device) -> torch.Tensor:
    """Byte offsets of ``WRITE_ORDER``'s fields in a page of ``layout`` (int64, on ``device``:
    made once per layout, not once per write)."""
    offsets = layout.offsets()
    return torch.tensor([offsets[name] for name in WRITE_ORDER], device=device)


def store_tokens(
    store: KVStore,
    f: int,
    pages: torch.Tensor,
    rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Quantize ``k``/``v`` [N, H, D] to the store's format index ``f`` and write every field
    (codes, scales, zeros, a zero score, ``positions`` [N]) of token ``n``, head ``h`` at row
    ``rows[n, h]`` of page ``pages[n, h]`` of the store's arena, in one kernel launch: the
    bytes ``KVFormat.encode`` and one indexed store per field would write. The uncompressed
    format (keys and values in the store's dtype, no positions) is an indexed copy.

    The ``(page, row)`` pairs must be distinct (the writes race otherwise, as the encode
    path's indexed stores would)."""
    fmt, layout = store.formats[f], store.layouts[f]
    if not fmt.quantized:
        views = store.pool.fields(layout)
        views["k"][pages, rows] = k.to(store.dtype)
        views["v"][pages, rows] = v.to(store.dtype)
        return
    n, heads, dim = k.shape
    if not n:
        return
    arena = store.pool.arena
    device = arena.device
    # The kernel reads a token's channels contiguously.
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    pages, rows = pages.to(device), rows.to(device)
    groups = next(field.numel for field in layout.fields if field.name == "k_scale")
    group_w = dim // groups
    quantize_store[(n, heads)](
        k,
        v,
        positions.to(device),
        arena,
        pages,
        rows,
        _field_offsets(layout, device),
        arena.shape[1],
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        pages.stride(0),
        pages.stride(1),
        rows.stride(0),
        rows.stride(1),
        D=dim,
        KEY_BITS=fmt.key_bits,
        VALUE_BITS=fmt.value_bits,
        GROUP_W=group_w,
        GROUPS_P=triton.next_power_of_2(groups),
        K_BYTES_P=triton.next_power_of_2(dim * fmt.key_bits // 8),
        V_BYTES_P=triton.next_power_of_2(dim * fmt.value_bits // 8),
    )


@triton.jit
def _round_fp16(x, UP: tl.constexpr):
    """``x`` (float32) rounded to float16 towards +inf (``UP``) or -inf: round to nearest,
    then one fp16 step outwards where that landed on the wrong side (``quant._round_fp16``,
    whose ``nextafter`` this is on the sign-magnitude bits)."""
    nearest = x.to(tl.float16)
    bits = nearest.to(tl.int16, bitcast=True).to(tl.int32)
    if UP:
        wrong = nearest.to(tl.float32) < x
        # -0 steps up to the smallest positive subnormal, other negatives shrink.
        moved = tl.where(bits >= 0, bits + 1, tl.where(bits == -32768, 1, bits - 1))
    else:
        wrong = nearest.to(tl.float32) > x
        # +0 steps down to the smallest negative subnormal (0x8001), other positives shrink.
        moved = tl.where(bits >= 0, tl.where(bits == 0, -32767, bits - 1), bits + 1)
    return tl.where(wrong, moved, bits).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _quantize_into(
    X,
    base,
    codes_off,
    scale_off,
    zero_off,
    row,
    BITS: tl.constexpr,
    D: tl.constexpr,
    GROUP_W: tl.constexpr,
    GROUPS_P: tl.constexpr,
    BYTES_P: tl.constexpr,
):
    """Quantize the ``D`` channels at ``X`` to ``BITS`` bits in groups of ``GROUP_W`` and store
    codes, scales and zeros at row ``row`` of the page at ``base``."""
    PER: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    BYTES: tl.constexpr = D * BITS // 8
    GROUPS: tl.constexpr = D // GROUP_W
    # Element ``byte * PER + i`` is code ``i`` of ``byte``: the packed layout, so the codes
    # pack by a sum over the last axis.
    byte = tl.arange(0, BYTES_P)
    lane = tl.arange(0, PER)
    elem = byte[:, None] * PER + lane[None, :]
    emask = elem < D
    x = tl.load(X + elem, mask=emask, other=0.0).to(tl.float32)
    # Group membership as a one-hot axis: a group's width need not fill whole bytes.
    gi = tl.arange(0, GROUPS_P)
    member = ((elem // GROUP_W)[:, :, None] == gi[None, None, :]) & emask[:, :, None]
    low = tl.min(tl.min(tl.where(member, x[:, :, None], float("inf")), axis=1), axis=0)
    high = tl.max(tl.max(tl.where(member, x[:, :, None], float("-inf")), axis=1), axis=0)
    zero16 = _round_fp16(low, False)
    zero = zero16.to(tl.float32)
    span = high - zero
    # The smallest normal float32 keeps a subnormal span's step positive (``quant.quantize``).
    ideal = tl.where(
        span > 0, tl.maximum(tl.math.div_rn(span, QMAX * 1.0), 1.1754943508222875e-38), 0.0
    )
    scale16 = _round_fp16(ideal, True)
    step = scale16.to(tl.float32)
    step = tl.where(step > 0, step, 1.0)
    # Each element's zero and step: one term of the one-hot sum is non-zero, so it is exact.
    zero_e = tl.sum(tl.where(member, zero[None, None, :], 0.0), axis=2)
    step_e = tl.where(emask, tl.sum(tl.where(member, step[None, None, :], 0.0), axis=2), 1.0)
    y = tl.math.div_rn(x - zero_e, step_e)
    # Round half to even (``torch.round``), exactly: y >= 0 and y - floor(y) is exact.
    whole = tl.floor(y)
    frac = y - whole
    odd = (whole.to(tl.int32) & 1) == 1
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    code = tl.minimum(tl.maximum(whole + up.to(tl.float32), 0.0), QMAX * 1.0).to(tl.int32)
    packed = tl.sum(code << (lane * BITS)[None, :], axis=1)
    tl.store(base + codes_off + row * BYTES + byte, packed.to(tl.uint8), mask=byte < BYTES)
    gmask = gi < GROUPS
    scales = (base + scale_off).to(tl.pointer_type(tl.float16))
    zeros = (base + zero_off).to(tl.pointer_type(tl.float16))
    tl.store(scales + row * GROUPS + gi, scale16, mask=gmask)
    tl.store(zeros + row * GROUPS + gi, zero16, mask=gmask)


@triton.jit
def quantize_store(
    K,
    V,
    POSITIONS,
    ARENA,
    PAGES,
    ROWS,
    FIELDS,
    page_bytes,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_pn,
    stride_ph,
    stride_rn,
    stride_rh,
    D: tl.constexpr,
    KEY_BITS: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    GROUP_W: tl.constexpr,
    GROUPS_P: tl.constexpr,
    K_BYTES_P: tl.constexpr,
    V_BYTES_P: tl.constexpr,
):
    """Token ``n``, head ``h`` of ``K``/``V`` [N, H, D] quantized into row ``ROWS[n, h]`` of
    page ``PAGES[n, h]``: every field of the layout whose byte offsets ``FIELDS`` holds
    (``writes.WRITE_ORDER``), the score 0 and the position ``POSITIONS[n]``."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(PAGES + n * stride_pn + h * stride_ph)
    row = tl.load(ROWS + n * stride_rn + h * stride_rh)
    base = ARENA + page * page_bytes
    _quantize_into(
        K + n * stride_kn + h * stride_kh,
        base,
        tl.load(FIELDS + 0),
        tl.load(FIELDS + 1),
        tl.load(FIELDS + 2),
        row,
        KEY_BITS,
        D,
        GROUP_W,
        GROUPS_P,
        K_BYTES_P,
    )
    _quantize_into(
        V + n * stride_vn + h * stride_vh,
        base,
        tl.load(FIELDS + 3),
        tl.load(FIELDS + 4),
        tl.load(FIELDS + 5),
        row,
        VALUE_BITS,
        D,
        GROUP_W,
        GROUPS_P,
        V_BYTES_P,
    )
    score = (base + tl.load(FIELDS + 6)).to(tl.pointer_type(tl.float32))
    tl.store(score + row, 0.0)
    pos = (base + tl.load(FIELDS + 7)).to(tl.pointer_type(tl.int32))
    tl.store(pos + row, tl.load(POSITIONS + n).to(tl.int32))
