"""A fast decode path over quantized pages: dequantization folded into the two matmuls.

The reference path (``PagedAttention._decode``) gathers a request's pages, dequantizes every
key and value to the compute dtype and runs SDPA: it materialises the whole cache in float32
and then again in the compute dtype, several passes over ``T * head_dim`` elements. Here the
affine dequantization ``x = scale_g * code + zero_g`` (per token, per group ``g`` of channels)
is moved out of the big tensors and into small per-token corrections:

* scores: ``q . k_t = sum_g scale_tg * (q_g . code_tg) + zero_tg * sum(q_g)``. One matmul of
  a block-diagonal query ``[Q * groups, D]`` (row ``(i, g)`` keeps only query ``i``'s channels
  of group ``g``) against the codes ``[T, D]`` gives every ``q_g . code_tg``; the scales weigh
  them and a ``[Q, groups] @ [groups, T]`` matmul adds the zeros.
* output: ``sum_t p_t v_t = sum_t (p_t scale_tg) code_t + sum_t p_t zero_tg`` for the channels
  of group ``g``: one matmul of the probabilities weighed by each group's scales ``[Q * groups,
  T]`` against the codes ``[T, D]`` (of which the block diagonal is kept), plus ``p @ zero``.

So the only passes over the big tensors are unpacking the codes (shifts and masks on 8-byte
lanes, then one uint8 -> float32 conversion; the channels come out in "plane" order, which
the query and the output are permuted to match) and the two matmuls. Everything is computed
in float32, so the path is at least as accurate as the reference and matches it within the
compute dtype's rounding. A layer's pages are fetched with one ``index_select`` of whole arena
rows (the fields are typed views of those rows); page ids and masks are computed once per step
for all layers, and the large buffers are reused between calls (fresh megabytes from the
allocator cost page faults that dwarf the work on CPU).

Measured on the demo model (one torch thread, 2048 tokens of context, 4 layers), attention
alone: k4v2 1.4-1.6 ms per step against 3.6-3.8 ms for the reference path and about 0.7 ms for
SDPA over the uncompressed cache. The remaining cost is per-op dispatch (about 40 small
torch ops per layer) and two float32 matmuls with a block-diagonal factor of ``groups``.

``decode`` serves decode rows (one query token) of uniform quantized slots that share one
format, with or without a sliding window; a batch mixing formats is served per format. Its two
cores, ``key_scores`` and ``value_mix``, also serve tiered slots (``tiered.attend`` with a
workspace), which gather their tiers' fields themselves. Uncompressed slots and uniform
prefill chunks keep the reference path.
"""

from __future__ import annotations

import functools
import math

import torch

from tierkv.kv.backends.base import high_page_tables
from tierkv.kv.backends.partial import merge, residual_part
from tierkv.kv.formats.quant import KVFormat
from tierkv.kv.store.kv_store import KVStore
from tierkv.kv.store.views import Residual


def _lane(nbytes: int) -> torch.dtype:
    """The widest integer type whose size divides a row of ``nbytes`` packed bytes."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        if nbytes % dtype.itemsize == 0:
            return dtype
    return torch.uint8


def _buffer(workspace: dict, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` kept in ``workspace`` between calls (contents undefined).

    Reusing the large float buffers matters on CPU: a fresh megabyte from the allocator is
    a fresh mapping, and faulting its pages in costs several times the conversion itself.
    """
    buf = workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = workspace[name] = torch.empty(shape, dtype=dtype)
    return buf


def _codes(
    packed: torch.Tensor, bits: int, nbytes: int, per_page: int, workspace: dict, name: str
) -> torch.Tensor:
    """The codes of packed rows as float32 ``[rows, 8 // bits * nbytes]``, plane by plane.

    ``packed`` is ``[pages, per_page * nbytes]`` uint8 (the rows of a page side by side, any
    page stride). Column ``p * nbytes + j`` of a row is the code of channel ``j * 8 // bits +
    p``: plane ``p`` holds the codes at bit ``p * bits`` of every byte. The planes are cut with
    shifts and masks on whole lanes of up to 8 bytes (no byte spills into its neighbour after
    the mask), so unpacking is a few vectorised integer ops and one conversion.
    """
    pages = packed.shape[0]
    per_byte = 8 // bits
    rows = pages * per_page
    out = _buffer(workspace, name, (rows, per_byte * nbytes), torch.float32)
    if bits == 8:
        out.view(pages, -1).copy_(packed)
        return out
    lane = _lane(nbytes)
    words = packed.view(lane).view(pages, per_page, -1)
    planes = _buffer(workspace, name + "_words", (pages, per_page, per_byte, words.shape[-1]), lane)
    for p in range(per_byte):
        torch.bitwise_right_shift(words, p * bits, out=planes[:, :, p])
    # Every byte keeps its low ``bits`` bits; the sign bits an arithmetic shift brings into
    # the top byte of a lane are cleared too.
    planes.bitwise_and_(int.from_bytes(bytes([(1 << bits) - 1]) * lane.itemsize, "little"))
    return out.copy_(planes.view(torch.uint8).view(rows, -1))


@functools.cache
def _block_mask(groups: int, nbytes: int, per_byte: int) -> torch.Tensor:
    """``[groups, per_byte * nbytes]`` float32: 1 where a ``_codes`` column is in group ``g``.

    Column ``p * nbytes + j`` holds channel ``j * per_byte + p``, of group ``j // (nbytes //
    groups)`` whatever the plane, since a group's width is a multiple of the codes per byte.
    """
    col = (torch.arange(nbytes) // (nbytes // groups)).repeat(per_byte)
    return (col[None, :] == torch.arange(groups)[:, None]).float()


def unpack(packed: torch.Tensor, bits: int, workspace: dict, name: str) -> torch.Tensor:
    """The codes of packed rows ``[..., nbytes]`` uint8 as float32 ``[..., D]`` in the plane
    order ``key_scores`` and ``value_mix`` expect (a view of a ``workspace`` buffer)."""
    nbytes = packed.shape[-1]
    rows = packed.reshape(-1, nbytes)
    return _codes(rows, bits, nbytes, 1, workspace, name).view(*packed.shape[:-1], -1)


def _to_planes(x: torch.Tensor, nbytes: int, planes: int) -> torch.Tensor:
    """Channels ``[..., D]`` in the column order of ``_codes`` (plane by plane)."""
    return x.unflatten(-1, (nbytes, planes)).transpose(-1, -2).flatten(-2)


def _from_planes(x: torch.Tensor, nbytes: int, planes: int) -> torch.Tensor:
    """Inverse of ``_to_planes``."""
    return x.unflatten(-1, (planes, nbytes)).transpose(-1, -2).flatten(-2)


def key_scores(
    q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Logits ``[B, H, R, T]`` of queries ``q`` ``[B, H, R, D]`` (already scaled by
    ``1/sqrt(D)``) against quantized keys: ``codes`` ``[B, H, T, D]`` float32 as ``_codes``
    returns them (plane order), ``scale``/``zero`` ``[B, H, groups, T]`` float32."""
    b, heads, rows, dim = q.shape
    groups, tokens = scale.shape[-2:]
    nbytes, planes = dim * bits // 8, 8 // bits
    qblock = _to_planes(q, nbytes, planes)[:, :, :, None, :] * _block_mask(groups, nbytes, planes)
    dots = torch.matmul(qblock.reshape(b, heads, rows * groups, dim), codes.transpose(-1, -2))
    dots = dots.view(b, heads, rows, groups, tokens) * scale[:, :, None]
    qsum = q.view(b, heads, rows, groups, dim // groups).sum(-1)
    return torch.matmul(qsum, zero).add_(dots.sum(3))


def value_mix(
    probs: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """``probs`` ``[B, H, R, T]`` times quantized values (laid out as in ``key_scores``):
    ``[B, H, R, D]`` float32."""
    b, heads, rows, tokens = probs.shape
    dim = codes.shape[-1]
    groups = scale.shape[-2]
    nbytes, planes = dim * bits // 8, 8 // bits
    weighted = probs[:, :, :, None, :] * scale[:, :, None]
    full = torch.matmul(weighted.reshape(b, heads, rows * groups, tokens), codes)
    full = full.view(b, heads, rows, groups, dim) * _block_mask(groups, nbytes, planes)
    out = _from_planes(full.sum(3), nbytes, planes).view(b, heads, rows, groups, dim // groups)
    out = out.add_(torch.matmul(probs, zero.transpose(-1, -2))[..., None])
    return out.view(b, heads, rows, dim)


def supports(fmt: KVFormat, head_dim: int) -> bool:
    """Whether the fast path serves slots stored in ``fmt`` at this head dim."""
    if not fmt.quantized:
        return False
    return fmt.fills_bytes(head_dim)


def plan_pages(
    store: KVStore,
    slots: torch.Tensor,
    lens: torch.Tensor,
    f: int,
    cache: dict,
    *,
    max_len: int | None = None,
) -> None:
    """Put every layer's page ids of ``slots`` ``[L, B, H, pages]`` into ``cache``, once per
    step (``TorchBackend.plan`` calls it before the first layer; ``decode`` when nobody did)."""
    length = int(lens.max()) if max_len is None else max_len
    cache[("pages", f)] = high_page_tables(store, slots, f, length, stale_to_first=True)


def decode(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    window: int | None,
    f: int,
    cache: dict | None = None,
    workspace: dict | None = None,
    residual: Residual | None = None,
    *,
    max_len: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per slot over the slot's first ``lens`` tokens.

    ``q`` is ``[B, Hq, D]``; every slot stores its (uniform) tokens in the store's format
    index ``f``, which ``supports``. Returns ``[B, Hq, D]`` in ``q``'s dtype.

    ``cache`` (a dict the caller keeps for one step, passed again for every layer with the
    same ``slots`` and ``lens``) holds what does not change between layers: the page ids of
    every layer, gathered once, and the visibility mask of each window. ``workspace`` (a dict
    kept for the engine's life) holds the unpacked codes' buffers, reused between calls.
    ``residual`` (the slots' residual windows with this step's tokens appended) replaces the
    newest quantized positions by their uncompressed entries (``tierkv.kv.backends.partial``).
    ``max_len`` is ``lens.max()`` when the caller knows it on the host (else it is read).
    """
    cache = {} if cache is None else cache
    workspace = {} if workspace is None else workspace
    fmt = store.formats[f]
    layout = store.layouts[f]
    per_page = layout.tokens_per_page
    offsets = layout.offsets()
    b, hq, dim = q.shape
    heads = store.num_kv_heads
    group = hq // heads
    groups = dim // min(fmt.group_size, dim)

    if ("pages", f) not in cache:
        plan_pages(store, slots, lens, f, cache, max_len=max_len)
    num, all_pages = cache[("pages", f)]
    tokens = num * per_page
    hidden = cache.get(("mask", f, window))
    if hidden is None:
        pos = torch.arange(tokens)
        visible = pos[None, :] < lens[:, None]
        if window is not None:
            visible &= pos[None, :] > (lens[:, None] - 1 - window)
        if residual is not None:
            visible &= pos[None, :] < (lens - residual.window)[:, None]
        hidden = cache[("mask", f, window)] = ~visible[:, None, None, :]
    # One gather of whole pages; every field is a typed view of these rows.
    ids = all_pages[layer].view(-1)
    raw = _buffer(workspace, "pages", (ids.numel(), store.pool.page_bytes), torch.uint8)
    torch.index_select(store.pool.arena, 0, ids, out=raw)

    def field(name: str, numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        start = offsets[name]
        return raw[:, start : start + per_page * numel * dtype.itemsize].view(dtype)

    def scale_zero(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, H, groups, T] float32 scales and zeros, in one conversion when adjacent.
        span = per_page * groups * 2
        start = offsets[f"{prefix}_scale"]
        if offsets[f"{prefix}_zero"] == start + span:
            x = raw[:, start : start + 2 * span].view(torch.float16)
            x = x.view(b, heads, num, 2, per_page, groups).permute(3, 0, 1, 5, 2, 4)
            out = torch.empty(2, b, heads, groups, num, per_page).copy_(x)
            out = out.view(2, b, heads, groups, tokens)
            return out[0], out[1]
        pair = []
        for name in ("scale", "zero"):
            x = field(f"{prefix}_{name}", groups, torch.float16)
            x = x.view(b, heads, num, per_page, groups).permute(0, 1, 4, 2, 3)
            out = torch.empty(b, heads, groups, num, per_page).copy_(x)
            pair.append(out.view(b, heads, groups, tokens))
        return pair[0], pair[1]

    qf = q.float().view(b, heads, group, dim) * (1.0 / math.sqrt(dim))
    kbytes = dim * fmt.key_bits // 8
    k_codes = _codes(field("k_codes", kbytes), fmt.key_bits, kbytes, per_page, workspace, "k")
    k_scale, k_zero = scale_zero("k")
    scores = key_scores(qf, k_codes.view(b, heads, tokens, dim), k_scale, k_zero, fmt.key_bits)
    scores = scores.masked_fill_(hidden, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    vbytes = dim * fmt.value_bits // 8
    v_codes = _codes(field("v_codes", vbytes), fmt.value_bits, vbytes, per_page, workspace, "v")
    v_scale, v_zero = scale_zero("v")
    out = value_mix(probs, v_codes.view(b, heads, tokens, dim), v_scale, v_zero, fmt.value_bits)
    out = out.reshape(b, hq, dim)
    if residual is not None:
        out_r, lse_r = residual_part(q, residual, lens, window)
        out = merge(out, lse.reshape(b, hq), out_r, lse_r)[0]
    return out.to(q.dtype)
