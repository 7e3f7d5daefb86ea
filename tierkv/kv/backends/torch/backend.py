"""The ``torch`` backend: decode over quantized pages in fused torch ops (``ops.decode``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tierkv.kv.backends.base import DecodeGroup, DecodeStep, KVBackend, UnitHost, byte_refusal
from tierkv.kv.backends.tiered_attend import decode_and_score
from tierkv.kv.backends.torch import ops
from tierkv.kv.formats.quant import KVFormat

if TYPE_CHECKING:
    from tierkv.kv.store.views import Residual


class TorchBackend(KVBackend):
    """Quantized formats whose channel groups fill whole bytes at both bit widths."""

    name = "torch"
    fast_tiered_paths = True

    def refusal(
        self, fmt: KVFormat, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> str | None:
        if not fmt.quantized:
            return f"{fmt.name}: the torch backend decodes quantized pages only"
        return byte_refusal(fmt, head_dim)

    def tiered_refusal(
        self,
        formats: tuple[KVFormat, KVFormat],
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> str | None:
        for fmt in formats:
            if not ops.supports(fmt, head_dim):
                return f"{fmt.name}: the torch backend's fused tiered ops do not read it"
        return None

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
        # The dequantization folded into the two matmuls of each tier, one softmax over both.
        store, workspace = step.store, step.workspace
        return decode_and_score(
            store, layer, q, slots, query_pos, window, host, residual, workspace
        )

    def plan(self, step: DecodeStep, group: DecodeGroup) -> None:
        # Every layer's page table, gathered once per step before its first layer.
        ops.plan_pages(
            step.store, group.slots, group.lens, group.f, step.cache, max_len=group.max_len
        )

    def decode(
        self,
        step: DecodeStep,
        layer: int,
        q: torch.Tensor,
        group: DecodeGroup,
        window: int | None,
        residual: Residual | None,
    ) -> torch.Tensor:
        return ops.decode(
            step.store,
            layer,
            q,
            group.slots,
            group.lens,
            window,
            group.f,
            step.cache,
            step.workspace,
            residual,
            max_len=group.max_len,
        )
