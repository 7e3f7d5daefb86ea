"""The ``reference`` backend: each slot's kept tokens gathered and decoded to the compute dtype
(``KVStore.gather``), then dense SDPA over them. It equals dense attention over the dequantized
cache by construction, serves every format on any device torch runs on, and is the oracle the
other backends are tested against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tierkv.kv.backends.base import DecodeGroup, DecodeStep, KVBackend, UnitHost
from tierkv.kv.backends.tiered_attend import decode_and_score
from tierkv.kv.formats.quant import KVFormat

if TYPE_CHECKING:
    from tierkv.kv.store.views import Residual


class ReferenceBackend(KVBackend):
    """Gather-dequantize-SDPA decode: serves everything, fast at nothing."""

    name = "reference"

    def refusal(
        self, fmt: KVFormat, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> str | None:
        return None

    def tiered_refusal(
        self,
        formats: tuple[KVFormat, KVFormat],
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> str | None:
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
        # Both tiers gathered and dequantized, one masked softmax (``tiered_attend.attend``).
        store = step.store
        return decode_and_score(store, layer, q, slots, query_pos, window, host, residual)

    def decode(
        self,
        step: DecodeStep,
        layer: int,
        q: torch.Tensor,
        group: DecodeGroup,
        window: int | None,
        residual: Residual | None,
    ) -> torch.Tensor:
        lens = group.lens
        keys, values = step.store.gather(layer, group.slots, group.max_len, q.dtype, group.f)
        b, heads, length, dim = keys.shape
        group = q.shape[1] // heads
        pos = torch.arange(length, device=lens.device)
        visible = pos[None, :] < lens[:, None]
        if window is not None:
            visible &= pos[None, :] > (lens[:, None] - 1 - window)
        if residual is not None:
            # The newest ``window`` positions are read uncompressed from the residual instead.
            visible &= pos[None, :] < (lens - residual.window)[:, None]
            visible = torch.cat([visible, residual.visible((lens - 1)[:, None], window)[:, 0]], 1)
            keys = torch.cat([keys, residual.keys.to(keys.dtype)], 2)
            values = torch.cat([values, residual.values.to(values.dtype)], 2)
        # The query heads that share a KV head become the "query rows" of one attention call.
        qg = q.view(b, heads, group, dim)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=visible[:, None, None, :])
        return out.reshape(b, heads * group, dim)
