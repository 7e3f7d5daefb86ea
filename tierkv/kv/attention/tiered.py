"""Tiered (differentiated) slots at one layer: routing each unit to what attends it, and the
decisions after a step.

Tiered heads hold different numbers of tokens in two formats, with gaps in their positions;
attending them also yields each token's attention probability, which is added to its score
layer by layer (``tierkv.kv.backends.tiered_attend``, the torch oracle). A unit of decodes goes
to the backend of the chain that serves its tier formats (``KVBackend.tiered_decode``: the
``cpu`` kernel reading both tiers in place and adding to the scores in place, the ``torch``
backend's fused ops, or ``reference``); a prefill chunk takes SDPA (``attend_prefill``) where
it can, else ``attend``. After the step's last layer the policy decides every token's tier
(``SlotTiers.decide``) for all layers at once and the tiers are compacted
(``compact.apply_decisions``, by a backend's compaction kernel where one serves the formats).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tierkv.kv.attention.tiered_prefill import attend_prefill, dense_serves
from tierkv.kv.attention.tiered_step import Unit, same_formats
from tierkv.kv.backends.base import DecodeStep, KVBackend, TieredAttention
from tierkv.kv.backends.tiered_attend import add_received, attend, tier_columns
from tierkv.kv.policy.compact import apply_decisions
from tierkv.kv.store.kv_store import HIGH, LOW, KVStore
from tierkv.kv.store.views import Residual

# The backend that compacts slots stored in a (high, low) pair of format indices, or None
# for the torch ops of ``apply_decisions``.
Compactor = Callable[[tuple[int, int]], KVBackend | None]

__all__ = [
    "TieredAttention",
    "add_received",
    "attend",
    "attend_rows",
    "decide_step",
    "decode_unit",
]


def decide_step(
    store: KVStore, slots: torch.Tensor, seen: torch.Tensor, compactor: Compactor | None = None
) -> None:
    """After a step's last layer: decide the tiers of the ``slots`` [B] (tiered, having seen
    ``seen`` [B] tokens) whose decision step this is, and compact them (by the backend
    ``compactor`` picks for their formats, else by torch ops).

    Every layer at once: a slot's layers and KV heads are independent units of the decision
    (``read_tier(None, ...)``), so the decision's few dozen tensor ops run once per step rather
    than once per layer; nothing reads a layer's cache again within the step, so deciding at
    its end is deciding right after each layer's attention.
    """
    deciding = store.tiers.deciding(slots, seen)
    if not bool(deciding.any()):
        return
    slots, seen = slots[deciding], seen[deciding]
    for rows in same_formats(store, slots):
        part = slots[rows]
        slot = int(part[0])
        formats = (int(store.slot_format[slot, HIGH]), int(store.slot_format[slot, LOW]))
        backend = None if compactor is None else compactor(formats)
        _decide(store, part, seen[rows], backend)


def _decide(
    store: KVStore, slots: torch.Tensor, seen: torch.Tensor, compactor: KVBackend | None
) -> None:
    """``decide_step`` for slots sharing their tier formats."""
    high = store.read_tier(None, slots, HIGH, ("score", "pos"))
    low = store.read_tier(None, slots, LOW, ("score", "pos"))
    pos, valid = tier_columns(high, low)
    scores = torch.cat([high.fields["score"], low.fields["score"]], 2)[..., 0]
    width = high.fields["pos"].shape[2]
    is_low = torch.arange(pos.shape[2]) >= width
    costs = store.costs(int(slots[0]))
    to_high, to_low = store.tiers.decide(slots, seen, scores, pos, valid, is_low, costs)
    apply_decisions(store, None, slots, to_high, to_low, width, compactor)


def attend_rows(
    step: DecodeStep,
    layer: int,
    q: torch.Tensor,
    units: list[Unit],
    window: int | None,
    out: torch.Tensor,
    fused: bool,
    fresh: tuple[torch.Tensor, torch.Tensor, Residual | None],
) -> None:
    """Attend and score for the tiered requests of a step (``step_units``) at one layer,
    writing their rows of ``out`` (``decide_step`` decides after the last layer). A unit of
    decodes sharing tier formats is one call to its backend (``Unit.backend``); a prefill
    chunk goes alone, by SDPA where ``fused`` (the chain has fast backends) and it can
    (``dense_serves``), else by ``attend`` (fused over the codes where ``fused``). ``fresh``
    is the step's keys and values [N, H, D] and, when slots have residual rings, their entries
    read before the step's write (``KVStore.read_residual``; None if the step did not read
    them).
    """
    store = step.store
    for unit in units:
        tokens, query_pos, slots, host = unit.tokens, unit.query_pos, unit.slots, unit.host
        if unit.backend is not None:
            rows = tokens[:, 0]
            out[rows] = decode_unit(step, layer, q[rows], unit, window, fresh)
            continue
        residual = _residual(store, layer, unit, fresh)
        if fused and dense_serves(q, residual, window, host):
            att, query_pos = attend_prefill(
                store, layer, q[tokens], slots, query_pos, window, residual, host
            )
        else:
            workspace = step.workspace if fused else None
            att = attend(
                store, layer, q[tokens], slots, query_pos, window, workspace, residual, host
            )
        out[tokens] = att.out
        add_received(store, layer, slots, query_pos, att, host)


def decode_unit(
    step: DecodeStep,
    layer: int,
    q: torch.Tensor,
    unit: Unit,
    window: int | None,
    fresh: tuple[torch.Tensor, torch.Tensor, Residual | None],
) -> torch.Tensor:
    """The output [B, Hq, D] of a unit of tiered decodes, ``q`` [B, Hq, D] its queries, by its
    backend (``Unit.backend``), which also adds to its tokens' scores."""
    backend = unit.backend
    assert backend is not None and unit.host is not None, "a unit of decodes has a backend"
    residual = None
    if not backend.reads_rings_in_place:
        residual = _residual(step.store, layer, unit, fresh)
    return backend.tiered_decode(
        step, layer, q, unit.slots, unit.query_pos[:, 0], window, unit.host, residual
    )


def _residual(
    store: KVStore,
    layer: int,
    unit: Unit,
    fresh: tuple[torch.Tensor, torch.Tensor, Residual | None],
) -> Residual | None:
    """The ring entries a unit's queries see uncompressed (None when its slots have none)."""
    host = unit.host
    if host is not None and not host.recent:
        return None
    if host is None and not bool((store.residual[unit.slots] > 0).any()):
        return None
    k, v, rings = fresh
    if rings is None:
        # Read after the step's write: a decode's ring then holds its newest positions, the
        # step's own token included (a prefill chunk always has them read before).
        return store.read_residual(layer, unit.slots, host and host.ring_pages)
    own_k = k[unit.tokens].permute(0, 2, 1, 3)
    own_v = v[unit.tokens].permute(0, 2, 1, 3)
    return rings.select(unit.rows).append(own_k, own_v, unit.query_pos)
