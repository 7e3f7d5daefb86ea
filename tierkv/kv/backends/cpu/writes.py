"""The cpu backend's store writes: a step's keys and values quantized (or copied, for
uncompressed pages) into their pages in one native call (``csrc/quantize_store.cpp``)."""

from __future__ import annotations

import torch

from tierkv.extension import available, unavailable_reason
from tierkv.kv.backends.cpu.layout import row_fields, write_fields
from tierkv.kv.store.kv_store import KVStore


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
    ``rows[n, h]`` of page ``pages[n, h]``: the bytes ``KVFormat.encode`` and one indexed store
    per field would write (``csrc/quantize_store.cpp``), in one call. The uncompressed format
    (keys and values in the store's dtype, no positions) is a copy of the rows."""
    if not available():
        raise RuntimeError(unavailable_reason())
    fmt = store.formats[f]
    if not fmt.quantized:
        k_offset, v_offset, row_bytes = row_fields(store.layouts[f])
        dtype = store.dtype
        torch.ops.tierkv.store_rows(
            k.to(dtype), v.to(dtype), store.pool.arena, pages, rows, k_offset, v_offset, row_bytes
        )
        return
    offsets, strides = write_fields(store.layouts[f])
    torch.ops.tierkv.quantize_store(
        k,
        v,
        positions,
        store.pool.arena,
        pages,
        rows,
        fmt.key_bits,
        fmt.value_bits,
        fmt.group_size,
        offsets,
        strides,
    )
