"""The ``cpu`` backend: the C++ decode kernels, reading pages and residual rings in place."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tierkv.kv.backends.base import DecodeGroup, DecodeStep, KVBackend, UnitHost, byte_refusal
from tierkv.kv.backends.cpu import ops
from tierkv.kv.formats.quant import KVFormat

if TYPE_CHECKING:
    from tierkv.kv.store.kv_store import KVStore
    from tierkv.kv.store.views import Residual

# Compute dtypes the kernels take queries (and uncompressed rows) in.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CpuBackend(KVBackend):
    """Quantized formats the kernel instantiates (its own table, ``ops.kernel_bit_pairs``)
    whose groups fill whole bytes, and uncompressed pages (``ops.decode_full``); CPU tensors."""

    name = "cpu"
    reads_rings_in_place = True
    fast_tiered_paths = True

    def unavailable(self) -> str | None:
        return None if ops.available() else (ops.unavailable_reason() or "not built")

    def refusal(
        self, fmt: KVFormat, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> str | None:
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device.type}"
        if dtype not in _DTYPES:
            return f"the cpu backend computes in float32, bfloat16 or float16, not {dtype}"
        if not fmt.quantized:
            return None
        if (fmt.key_bits, fmt.value_bits) not in ops.kernel_bit_pairs():
            return f"{fmt.name}: the cpu kernels are not instantiated for these bit widths"
        return byte_refusal(fmt, head_dim)

    def tiered_refusal(
        self,
        formats: tuple[KVFormat, KVFormat],
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> str | None:
        return self._tiers_refusal(formats, head_dim, device) or (
            None if dtype in _DTYPES else f"the cpu backend does not compute in {dtype}"
        )

    def tiered_decode(
        self,
        step: DecodeStep,
        layer: int,
        q: torch.Tensor,
        slots: torch.Tensor,
        query_pos: torch.Tensor,
        window: int | None,
        host: UnitHost,
        residual: Residual | None,
    ) -> torch.Tensor:
        # Both tiers and the ring read in place, the scores updated in place (decode queries
        # always count: they are past the prompt).
        out, _ = ops.tiered_decode(
            step.store,
            layer,
            q,
            slots,
            query_pos,
            window,
            score=True,
            formats=host.formats,
            has_ring=host.recent > 0,
            prepared=host.kernel,
        )
        return out

    def write_refusal(
        self, fmt: KVFormat, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> str | None:
        # ``quantize_store`` packs any bit width of the format table; ``store_rows`` copies.
        return None if device.type == "cpu" else "the cpu backend writes CPU tensors only"

    def write(
        self,
        store: KVStore,
        f: int,
        pages: torch.Tensor,
        rows: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        ops.store_tokens(store, f, pages, rows, k, v, positions)

    def compact_refusal(
        self, formats: tuple[KVFormat, KVFormat], head_dim: int, device: torch.device
    ) -> str | None:
        return self._tiers_refusal(formats, head_dim, device)

    def compact(
        self,
        store: KVStore,
        layer: int | None,
        slots: torch.Tensor,
        keep_high: torch.Tensor,
        demote: torch.Tensor,
        keep_low: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        return ops.compact_tiers(store, layer, slots, keep_high, demote, keep_low)

    def _tiers_refusal(
        self, formats: tuple[KVFormat, KVFormat], head_dim: int, device: torch.device
    ) -> str | None:
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device.type}"
        for fmt in formats:
            if not ops.supports(fmt, head_dim):
                return f"{fmt.name}: the cpu tier kernels are not built for it"
        return None

    def plan(self, step: DecodeStep, group: DecodeGroup) -> None:
        # Every layer's page table (and the rings'), gathered once per step before its first
        # layer: each layer's decode then reads only its slice.
        store = step.store
        if store.formats[group.f].quantized:
            ops.plan_decode(
                store,
                group.slots,
                group.lens,
                group.f,
                step.cache,
                max_len=group.max_len,
                ring_pages=group.ring_pages,
            )
        else:
            ops.plan_full(store, group.slots, group.lens, step.cache, max_len=group.max_len)

    def decode(
        self,
        step: DecodeStep,
        layer: int,
        q: torch.Tensor,
        group: DecodeGroup,
        window: int | None,
        residual: Residual | None,
    ) -> torch.Tensor:
        # Residual windows come from the rings in place, not from ``residual``.
        store, slots, lens = step.store, group.slots, group.lens
        if store.formats[group.f].quantized:
            return ops.decode(
                store,
                layer,
                q,
                slots,
                lens,
                window,
                group.f,
                step.cache,
                max_len=group.max_len,
                ring_pages=group.ring_pages,
            )
        return ops.decode_full(
            store, layer, q, slots, lens, window, step.cache, max_len=group.max_len
        )
