"""What tiered attention works out once per step: how the tiered requests are grouped into
units (``step_units``) and what each unit's layers need to know on the host
(``tierkv.kv.backends.base.UnitHost``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tierkv.kv.backends.base import KVBackend, UnitHost
from tierkv.kv.store.kv_store import HIGH, LOW, RESIDUAL, KVStore

if TYPE_CHECKING:
    from tierkv.batch import AttentionBatch


def same_formats(store: KVStore, slots: torch.Tensor) -> list[torch.Tensor]:
    """The indices into ``slots`` [B] grouped by their (high, low) formats: what one batched
    tiered call may take together."""
    _, group = store.slot_format[slots].unique(dim=0, return_inverse=True)
    return [torch.nonzero(group == g).flatten() for g in range(int(group.max()) + 1)]


@dataclass
class Unit:
    """Tiered requests of a step attended in one call: decodes sharing their tier formats, or
    one prefill chunk. ``tokens`` [R, n] are their tokens' indices in the step, ``query_pos``
    [R, n] their positions, ``slots`` [R] their store slots, ``rows`` [R] their rows of the
    step's batch; ``host``: what the layers need to know about them on the host, read once
    per step; ``backend``: for decodes, the backend of the chain that serves their tier formats
    (``PagedAttention.plan`` picks it; None for a prefill chunk)."""

    tokens: torch.Tensor
    query_pos: torch.Tensor
    slots: torch.Tensor
    rows: torch.Tensor
    host: UnitHost | None = None
    backend: KVBackend | None = None


def step_units(store: KVStore, batch: AttentionBatch, is_tiered: torch.Tensor) -> list[Unit]:
    """How ``attend_rows`` groups the tiered requests (``is_tiered`` [B]) of a step: the same
    at every layer, so worked out once per step."""
    lens = torch.tensor(batch.query_lens, dtype=torch.int64)
    decode = torch.nonzero(is_tiered & (lens == 1)).flatten()
    groups: list[torch.Tensor] = []
    if decode.numel():
        groups += [decode[rows] for rows in same_formats(store, batch.slots[decode])]
    groups += [torch.tensor([r]) for r in torch.nonzero(is_tiered & (lens > 1)).flatten().tolist()]
    starts = torch.tensor(batch.query_starts, dtype=torch.int64)
    units = []
    for rows in groups:
        n = batch.query_lens[int(rows[0])]
        tokens = starts[rows][:, None] + torch.arange(n)
        slots = batch.slots[rows]
        query_pos = batch.token_index[tokens]
        units.append(Unit(tokens, query_pos, slots, rows, _unit_host(store, slots, query_pos, n)))
    return units


def _unit_host(store: KVStore, slots: torch.Tensor, query_pos: torch.Tensor, n: int) -> UnitHost:
    """The host-side facts of a unit of ``slots`` adding ``n`` tokens each at ``query_pos``."""
    slot = int(slots[0])
    formats = (int(store.slot_format[slot, HIGH]), int(store.slot_format[slot, LOW]))
    # At each layer the step's write appends the unit's n tokens to every head's high tier
    # before attention reads it; the low tier is only changed by decisions, after the step.
    count = store.count[slots][..., :RESIDUAL].amax(dim=(0, 2))  # [L, 2]
    count[:, HIGH] += n
    per_page = [store.layouts[f].tokens_per_page for f in formats]
    pages = [(-(-high // per_page[HIGH]), -(-low // per_page[LOW])) for high, low in count.tolist()]
    last_pos = int(query_pos.max())
    counting = int((query_pos >= store.tiers.score_start[slots][:, None]).sum())
    ring = int(store.ring[slots].max()) if store.num_residual else 0
    return UnitHost(
        formats,
        pages,
        last_pos,
        counting,
        int(store.residual[slots].max()) if store.num_residual else 0,
        max(ring // store.layouts[0].tokens_per_page, 1),
        int(store.tiers.pool[slots].max()),
    )
