"""How the cpu backend's kernels see the store: which formats they are instantiated for
(``kernel_bit_pairs``, ``supports``), the byte offsets and per-token strides of each
format's page fields, in the order the kernels take them, and the page tables of residual
rings. Everything here is computed once per layout (or once per step for ring tables)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tierkv import extension
from tierkv.kv.formats.layout import PageLayout
from tierkv.kv.formats.quant import KVFormat
from tierkv.kv.store.kv_store import RESIDUAL, KVStore

# Per-token fields the kernel reads, in the order it takes their offsets and strides.
KERNEL_FIELDS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "pos")

# Stored dtypes of FULL (ring) pages the kernel reads, by the name it takes.
RING_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# Page fields the quantizing write fills, in the order of its offsets and strides.
WRITE_FIELDS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "score", "pos")


@functools.cache
def write_fields(layout: PageLayout) -> tuple[list[int], list[int]]:
    """Byte offsets and per-token strides of every field of ``layout``, for ``store_tokens``."""
    offsets = layout.offsets()
    strides = {field.name: field.token_bytes for field in layout.fields}
    return [offsets[n] for n in WRITE_FIELDS], [strides[n] for n in WRITE_FIELDS]


@functools.cache
def row_fields(layout: PageLayout) -> tuple[int, int, int]:
    """Byte offsets of the key and value rows of uncompressed pages, and a row's bytes."""
    offsets = layout.offsets()
    row_bytes = {field.name: field.token_bytes for field in layout.fields}["k"]
    return offsets["k"], offsets["v"], row_bytes


@functools.cache
def kernel_bit_pairs() -> frozenset[tuple[int, int]]:
    """The (key bits, value bits) pairs the C++ decode kernels are instantiated for, as the
    built extension reports them (its own table, ``kKernels`` in ``csrc/paged_decode.cpp``);
    empty without the extension."""
    if not extension.available():
        return frozenset()
    return frozenset((int(k), int(v)) for k, v in torch.ops.tierkv.kernel_bit_pairs())


def supports(fmt: KVFormat, head_dim: int) -> bool:
    """Whether the kernel serves slots stored in ``fmt`` at this head dim: a quantized format
    it is instantiated for (``kernel_bit_pairs``) whose groups of channels fill whole bytes at
    both bit widths (the kernel reads a group's codes as whole bytes; a group size that does
    not divide the head dim never reaches a store: ``KVStore.register`` refuses it)."""
    if not fmt.quantized or (fmt.key_bits, fmt.value_bits) not in kernel_bit_pairs():
        return False
    return fmt.fills_bytes(head_dim)


@functools.cache
def kernel_fields(layout: PageLayout) -> tuple[list[int], list[int], int]:
    """Byte offsets and per-token strides of the kernel's fields in pages of ``layout``, and
    its tokens per page (cached: ``PageLayout.offsets`` walks the fields in Python)."""
    offsets = layout.offsets()
    strides = {field.name: field.token_bytes for field in layout.fields}
    return (
        [offsets[name] for name in KERNEL_FIELDS],
        [strides[name] for name in KERNEL_FIELDS],
        layout.tokens_per_page,
    )


@functools.cache
def ring_layout(layout: PageLayout) -> tuple[list[int], int, str]:
    """``[k offset, k stride, v offset, v stride]`` of FULL pages of ``layout``, their tokens
    per page and the stored dtype's name."""
    offsets = layout.offsets()
    fields = {field.name: field for field in layout.fields}
    dtype = fields["k"].dtype
    if dtype not in RING_DTYPES:
        raise ValueError(f"the native kernel reads rings of {list(RING_DTYPES)}, not {dtype}")
    return (
        [offsets["k"], fields["k"].token_bytes, offsets["v"], fields["v"].token_bytes],
        layout.tokens_per_page,
        RING_DTYPES[dtype],
    )


@functools.cache
def tier_args(
    formats: tuple[KVFormat, KVFormat], layouts: tuple[PageLayout, PageLayout]
) -> tuple[list[int], list[int], list[int]]:
    """``tiered_decode``'s format arguments for a (high, low) pair: each tier's key bits,
    value bits, group size and tokens per page; the offsets and strides of its kernel fields
    then of its score."""
    packed: tuple[list[int], list[int], list[int]] = ([], [], [])
    for fmt, layout in zip(formats, layouts, strict=True):
        offsets, strides, per_page = kernel_fields(layout)
        score_offset, score_stride = (v[WRITE_FIELDS.index("score")] for v in write_fields(layout))
        packed[0].extend([fmt.key_bits, fmt.value_bits, fmt.group_size, per_page])
        packed[1].extend([*offsets, score_offset])
        packed[2].extend([*strides, score_stride])
    return packed


@dataclass(frozen=True)
class Ring:
    """The residual rings of a group of uniform slots at one layer, as the kernel reads them.

    ``pages`` [B, H, P]: FULL page ids of each (request, KV head)'s ring
    (``store.tables[slots, layer, :, RESIDUAL, :P]``, P covering the largest ring); ``size``
    [B]: tokens each ring holds (``store.ring[slots]``, whole pages); ``window`` [B]: the
    residual window R (``store.residual[slots]``; 0 for slots without one, whose stale ids are
    then never read).
    """

    pages: torch.Tensor
    size: torch.Tensor
    window: torch.Tensor


def ring_tables(
    store: KVStore, slots: torch.Tensor, num_pages: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The ring page ids of ``slots`` in every layer ([L, B, H, P], one contiguous table per
    layer), their sizes and windows; None when no slot has a residual window. ``num_pages``:
    P, when the caller knows it on the host (0: no slot has a window)."""
    if num_pages == 0:
        return None
    window = store.residual[slots]
    if num_pages is None and not bool(window.any()):
        return None
    size = store.ring[slots]
    num = int(size.max()) // store.layouts[0].tokens_per_page if num_pages is None else num_pages
    pages = store.tables[slots, :, :, RESIDUAL, :num].transpose(0, 1).contiguous()
    return pages, size.contiguous(), window.contiguous()
