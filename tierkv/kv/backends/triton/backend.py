"""The ``triton`` backend: uniform decode over quantized pages (``kernels.paged_decode``),
tiered decode over both tiers in place (``tiered.tiered_decode``) and quantizing writes
(``writes.store_tokens``).

It runs where Triton can: on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, how the tests run it without a GPU). It is asked only by the
``triton`` chain: the engine's arena is a CPU tensor today, and on CPU the ``cpu`` backend's
C++ kernels are the fast path.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import TYPE_CHECKING

import torch

from tierkv.kv.backends.base import (
    DecodeGroup,
    DecodeStep,
    KVBackend,
    TieredAttention,
    UnitHost,
    high_page_tables,
)
from tierkv.kv.backends.partial import merge, residual_part
from tierkv.kv.formats.layout import PageLayout
from tierkv.kv.formats.quant import KVFormat

if TYPE_CHECKING:
    from tierkv.kv.store.kv_store import KVStore
    from tierkv.kv.store.views import Residual


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter, on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.cache
def _kernels():  # type: ignore[no-untyped-def]
    from tierkv.kv.backends.triton import kernels

    return kernels


class TritonBackend(KVBackend):
    """Quantized formats at any bit widths of the format table, any group size that divides
    the head dim, any GQA group; CUDA tensors, or CPU tensors under the interpreter."""

    name = "triton"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        return None

    def refusal(
        self, fmt: KVFormat, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> str | None:
        if device.type == "cpu" and not interpreting():
            return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"the triton backend runs on cuda, not {device.type}"
        if not fmt.quantized:
            return f"{fmt.name}: the triton backend decodes quantized pages only"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"the triton backend computes in float32, bfloat16 or float16, not {dtype}"
        return None

    def tiered_refusal(
        self,
        formats: tuple[KVFormat, KVFormat],
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> str | None:
        for fmt in formats:
            why = self.refusal(fmt, head_dim, dtype, device)
            if why is not None:
                return why
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
        # The ring's part and the merge are torch ops over ``residual``; the probabilities
        # the kernel returns are added to the scores as the torch path adds them.
        from tierkv.kv.backends.tiered_attend import add_received
        from tierkv.kv.backends.triton.tiered import tiered_decode

        store = step.store
        out, probs = tiered_decode(
            store,
            layer,
            q,
            slots,
            query_pos,
            window,
            formats=host.formats,
            pages=host.pages[layer],
            cache=host.kernel,
            residual=residual,
        )
        att = TieredAttention(out[:, None], probs[:, :, :, None])
        add_received(store, layer, slots, query_pos[:, None], att, host)
        return out

    def write_refusal(
        self, fmt: KVFormat, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> str | None:
        if device.type == "cpu" and not interpreting():
            return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"the triton backend runs on cuda, not {device.type}"
        return None

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
        from tierkv.kv.backends.triton.writes import store_tokens

        store_tokens(store, f, pages, rows, k, v, positions)

    def plan(self, step: DecodeStep, group: DecodeGroup) -> None:
        # Every layer's page table of the group [L, B, H, pages], moved to the arena's device
        # once per step, not once per layer. Columns past a head's own pages hold stale ids:
        # they point at its first page (never read: those positions are masked).
        store, f = step.store, group.f
        _, pages = high_page_tables(store, group.slots, f, group.max_len, stale_to_first=True)
        step.cache[("triton_pages", f)] = pages.to(store.pool.arena.device)

    def decode(
        self,
        step: DecodeStep,
        layer: int,
        q: torch.Tensor,
        group: DecodeGroup,
        window: int | None,
        residual: Residual | None,
    ) -> torch.Tensor:
        store, f, lens = step.store, group.f, group.lens
        fmt, layout = store.formats[f], store.layouts[f]
        if ("triton_pages", f) not in step.cache:
            self.plan(step, group)
        table = step.cache[("triton_pages", f)][layer]
        starts = torch.zeros_like(lens) if window is None else (lens - window).clamp(min=0)
        # The newest ``R`` positions of a slot with a residual window come from its ring.
        ends = lens if residual is None else lens - residual.window
        device = store.pool.arena.device
        out, lse = decode_pages(
            q,
            store.pool.arena,
            table,
            starts.to(device),
            ends.to(device),
            fmt,
            layout,
            store.num_kv_heads,
        )
        if residual is not None:
            out_r, lse_r = residual_part(q, residual, lens, window)
            out = merge(out, lse, out_r, lse_r)[0]
        return out.to(q.dtype)


def decode_pages(
    q: torch.Tensor,
    arena: torch.Tensor,
    table: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    fmt: KVFormat,
    layout: PageLayout,
    heads: int,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.paged_decode`` over pages of ``arena`` (any device Triton runs on): ``q``
    [B, Hq, D] attends the positions ``[starts, ends)`` [B] of each (request, KV head)'s pages
    ``table`` [B, heads, P], all stored in ``fmt`` laid out as ``layout``. Returns ``(out
    [B, Hq, D] float32, lse [B, Hq] float32)``, -inf where a row sees no position.

    The pages are cut into ``splits`` runs, each its own program, merged by log-sum-exp
    afterwards (default: enough splits that B x heads x splits programs fill a GPU's
    multiprocessors at long contexts; one in the interpreter or with few pages)."""
    from triton import next_power_of_2

    b, hq, dim = q.shape
    q = q.contiguous()
    num_pages = table.shape[-1]
    if splits is None:
        splits = _splits(b * heads, num_pages, q.device)
    per_split = max(1, -(-num_pages // splits))
    splits = max(1, -(-num_pages // per_split))
    out = torch.empty(b, hq, splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    offsets = layout.offsets()
    fields = {field.name: field for field in layout.fields}
    per_page = layout.tokens_per_page
    _kernels().paged_decode[(b, heads, splits)](
        q,
        arena,
        table,
        starts.contiguous(),
        ends.contiguous(),
        out,
        lse,
        num_pages,
        per_split,
        1.0 / math.sqrt(dim),
        arena.shape[1],
        offsets["k_codes"],
        offsets["k_scale"],
        offsets["k_zero"],
        offsets["v_codes"],
        offsets["v_scale"],
        offsets["v_zero"],
        q.stride(0),
        q.stride(1),
        table.stride(0),
        table.stride(1),
        HEADS=heads,
        G=hq // heads,
        GP=next_power_of_2(hq // heads),
        D=dim,
        DP=next_power_of_2(dim),
        TPP=per_page,
        BLOCK_T=next_power_of_2(per_page),
        KEY_BITS=fmt.key_bits,
        VALUE_BITS=fmt.value_bits,
        GROUP_W=dim // fields["k_scale"].numel,
    )
    if splits == 1:
        return out[:, :, 0], lse[:, :, 0]
    total = torch.logsumexp(lse, -1)
    # A split that saw no position has lse -inf (weight 0); a row that saw none stays -inf.
    weights = torch.exp(lse - torch.where(torch.isinf(total), 0.0, total)[..., None])
    return (out * weights[..., None]).sum(2), total


def _splits(programs: int, num_pages: int, device: torch.device) -> int:
    """Context splits: none in the interpreter; on a GPU, enough that every multiprocessor
    gets a few programs, each split keeping at least 8 pages."""
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-target // programs), num_pages // 8 or 1, 64))
