"""The ``torch`` backend: decode over quantized pages in fused torch ops (``ops.decode``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tierkv.kv.backends.base import DecodeGroup, DecodeStep, KVBackend, byte_refusal
from tierkv.kv.backends.torch import ops
from tierkv.kv.formats.quant import KVFormat

if TYPE_CHECKING:
    from tierkv.kv.store.views import Residual


class TorchBackend(KVBackend):
    """Quantized formats whose channel groups fill whole bytes at both bit widths."""

    name = "torch"

    def refusal(
        self, fmt: KVFormat, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> str | None:
        if not fmt.quantized:
            return f"{fmt.name}: the torch backend decodes quantized pages only"
        return byte_refusal(fmt, head_dim)

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
