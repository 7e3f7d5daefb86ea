"""TokenWriter: appending a step's new tokens, at every layer, from one plan.

Uniform slots store token ``i`` at index ``i`` of the high tier. Tiered slots store each tier as
a dense prefix per head: new tokens are appended after the head's high tokens, and decisions
(``compact.apply_decisions``) rewrite both tiers compactly; a token's position is its stored
``pos`` field. Slots with a residual window also copy new tokens into their rings (``ring``).

Where a step's tokens go is worked out once, at its first layer's ``write`` (``_WritePlan``),
and reused by its other layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierkv.kv.store.ring import ResidualRing
from tierkv.kv.store.tables import HIGH
from tierkv.kv.store.tier_io import TokenIO


@dataclass
class _WritePlan:
    """Where one step's new tokens go at every layer (``KVStore._write_plan``).

    ``parts`` holds, per high-tier format, the rows of the step's tokens in that format (None:
    all of them) with their page ids and rows in the page, ``[N, layers, heads]``; ``added``
    [max_seqs] is the tokens each slot gains per layer. The ring fields say which tokens are
    copied into residual rings (``ring_keep`` [K], a slice when all are, None without rings),
    to which FULL pages ``[K, layers, heads]`` and rows ``[K, 1]``.
    """

    index: torch.Tensor
    slots: torch.Tensor
    version: int
    written: set[int]
    parts: list[tuple[int, torch.Tensor | None, torch.Tensor, torch.Tensor]]
    added: torch.Tensor
    ring_keep: torch.Tensor | slice | None
    ring_pages: torch.Tensor | None
    ring_offset: torch.Tensor | None


class TokenWriter(TokenIO, ResidualRing):
    """Appends new tokens to the high tier and the residual rings (a mixin of ``KVStore``)."""

    # Where the current step's tokens go (see ``_write_plan``); valid while the tables'
    # ``_version`` is the one it was made at. A class default: a store starts without one.
    _plan: _WritePlan | None = None

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        index: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Append token ``index`` (its position) of each slot: ``k``/``v`` are [N, heads, dim].

        A slot's tokens of one call are consecutive positions after those it has seen. They go
        to the high tier, after the tokens each head holds there; each slot's tokens are encoded
        in its own format (one vectorised write per format). Slots with a residual window also
        copy them, uncompressed, into their rings.
        """
        plan = self._write_plan(layer, slots, index)
        for f, rows, pages, offset in plan.parts:
            part = (k, v, index) if rows is None else (k[rows], v[rows], index[rows])
            self._encode_into(f, pages[:, layer], offset[:, layer], *part)
        keep = plan.ring_keep
        if keep is not None and (isinstance(keep, slice) or keep.numel()):
            # Only a slot's newest ``ring`` tokens of the call are written: older ones would be
            # overwritten within the same scatter, whose order is undefined.
            pages = plan.ring_pages[:, layer]
            offset = plan.ring_offset.expand_as(pages)
            self._encode_into(0, pages, offset, k[keep], v[keep], index[keep])
        self.seen[:, layer] += plan.added
        self.count[:, layer, :, HIGH] += plan.added[:, None]

    def _write_plan(self, layer: int, slots: torch.Tensor, index: torch.Tensor) -> _WritePlan:
        """Where the step's tokens (``index``) go, in every layer: worked out at the step's first
        ``write`` and reused by its other layers.

        Each layer's write changes only its own counts, so the destinations of every layer are
        known before the first. The plan holds for the same ``index`` and ``slots`` tensors while
        nothing else changed the tables (the ``_version`` it was made at), until a layer is
        written twice (a new step).
        """
        plan = self._plan
        if not (
            plan is not None
            and plan.index is index
            and plan.slots is slots
            and plan.version == self._version
            and layer not in plan.written
        ):
            plan = self.plan_write(slots, index)
        plan.written.add(layer)
        return plan

    def plan_write(self, slots: torch.Tensor, index: torch.Tensor) -> _WritePlan:
        """Work out where a step's tokens (``index`` of ``slots``) go in every layer, before
        its first ``write`` (which then reads no value back from a tensor); ``write`` makes it
        itself for a step nobody planned."""
        # Uniform slots hold every seen token, so this is ``index`` itself for them.
        dest = self.count[slots, :, :, HIGH] + (index[:, None] - self.seen[slots])[..., None]
        layers = torch.arange(self.num_layers)[:, None]
        heads = torch.arange(self.num_kv_heads)
        parts = []
        for f, rows in self.by_format(slots):
            part_slots, part_dest = (slots, dest) if rows is None else (slots[rows], dest[rows])
            per_page = self.layouts[f].tokens_per_page
            pages = self.tables[
                part_slots[:, None, None], layers, heads, HIGH, part_dest // per_page
            ]
            parts.append((f, rows, pages, part_dest % per_page))
        added = torch.bincount(slots, minlength=self.seen.shape[0])
        ring_keep = ring_pages = ring_offset = None
        if self.num_residual:
            ring_keep, ring_pages, ring_offset = self._ring_targets(slots, index)
            if ring_keep.numel() == index.numel():
                # Every token (a decode step's): the rows as they are, no copy per layer.
                ring_keep = slice(None)
        plan = self._plan = _WritePlan(
            index, slots, self._version, set(), parts, added, ring_keep, ring_pages, ring_offset
        )
        return plan
