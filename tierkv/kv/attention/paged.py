"""PagedAttention: appends a step's keys and values to the store, then attends over them.

One engine step mixes decodes (one query token per request) and prefill chunks (many). Decodes
are attended in one batched call per storage format; each prefill chunk attends alone, since
chunks are few per step and differ in length.

Decodes of uniform slots go to the attention backends (``tierkv.kv.backends``): each format's
rows to the first backend of the configured chain that serves the format (``fast``, the
default: the C++ kernels of ``cpu``, then ``torch``'s fused ops, then ``reference``, which
gathers, dequantizes and attends densely and is what the others are tested against).

Requests under a differentiated policy (tiered slots) take ``tiered``: their decodes go to the
first backend of the chain whose ``tiered_decode`` serves their tier formats (attention over
both tiers that also adds to their tokens' scores), their prefill chunks to SDPA; after the
step's last layer (``finish_step``) the policy decides and compacts their tiers (by the first
backend whose ``compact`` serves them). New tokens are written by the first backend whose
``write`` serves their format, else encoded by the store. Uniform requests pay nothing for
tiers.

Uniform slots with a residual window (``KVPolicy.residual``) attend to the newest tokens
uncompressed: for backends that do not read rings in place their ring is read before the
step's write (``KVStore.read_residual``), the step's own tokens are appended to it, and each
query sees those entries inside its window and the quantized tokens before it, as one softmax
over both (a prefill chunk in blocks of queries, each with only its own windows' entries);
the ``cpu`` backend reads the ring in place after the write. Prefill chunks take SDPA (or the
native flash kernel in bfloat16, ``tierkv.kv.backends.partial``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierkv.batch import AttentionBatch
from tierkv.kv.attention import tiered
from tierkv.kv.attention.tiered_step import Unit, step_units
from tierkv.kv.attention.uniform_prefill import PrefillRow, attend_prefill
from tierkv.kv.backends import DecodeGroup, DecodeStep, chain
from tierkv.kv.backends.routing import BackendChain
from tierkv.kv.formats.rotation import rotate_qkv, rotate_rows
from tierkv.kv.store.kv_store import KVStore
from tierkv.kv.store.views import Residual


@dataclass
class _StepPlan:
    """What the layers of one step need, worked out once before the first (``plan``), so that
    no layer reads a value back from a tensor.

    ``decode`` [Bd]: the uniform requests decoding (batch indices), ``tokens`` [Bd] their
    tokens' indices in the step (None when they are all of its tokens, in order), ``slots`` and
    ``lens`` [Bd] their store slots and lengths after the step, ``groups`` the same rows by
    storage format; ``prefill``: the uniform requests prefilling; ``units``: the tiered
    requests (``tiered_step.step_units``) and ``is_tiered`` [B] which requests they are;
    ``reads_rings``: whether residual entries are read before the step's write, and
    ``ring_pages`` the ring pages of the largest ring to read; ``rotate``: the step's tokens
    whose requests store keys and values in the rotated basis (``KVPolicy.rotate``), all of
    them (a slice) or their indices, or None; ``only_tiered``: the one unit of tiered decodes
    when it is the whole step, its tokens in order (else None).
    """

    decode: torch.Tensor
    tokens: torch.Tensor | None
    slots: torch.Tensor
    lens: torch.Tensor
    groups: list[DecodeGroup]
    prefill: list[PrefillRow]
    units: list[Unit]
    is_tiered: torch.Tensor | None
    reads_rings: bool
    ring_pages: int
    rotate: torch.Tensor | slice | None
    only_tiered: Unit | None = None


class PagedAttention:
    """Appends a step's keys and values to the store, then attends over everything kept."""

    def __init__(
        self,
        store: KVStore,
        sliding_windows: list[int | None],
        backend: str = "reference",
    ) -> None:
        # Built (or loaded from the build cache) here, not at the first request's decode.
        self.chain = BackendChain(backend, chain(backend), store)
        self.store = store
        self.sliding_windows = sliding_windows
        self.backend = backend
        self._step: AttentionBatch | None = None
        self._step_cache: dict = {}
        self._plan: _StepPlan | None = None
        self._workspace: dict = {}
        self._decode_step = DecodeStep(store, self._step_cache, self._workspace)
        # Tiered prefill chunks take the fast dense paths where a backend of the chain says so.
        self._fused = any(b.fast_tiered_paths for b in self.chain.backends)
        store.writer_for = self.chain.writer

    def __call__(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """``q`` [N, Hq, D], ``k``/``v`` [N, Hkv, D] -> attention output [N, Hq, D]."""
        rows = self.plan(batch).rotate
        if rows is None:
            return self._attend(layer, q, k, v, batch)
        # Queries, keys and values of rotating requests into the stored basis, their output
        # back (``tierkv.kv.formats.rotation``); the attention in between is unchanged.
        q, k, v = rotate_qkv(q, k, v, rows)
        return rotate_rows(self._attend(layer, q, k, v, batch), rows, "out")

    def _attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        store = self.store
        plan = self.plan(batch)
        # The rings hold the newest tokens before this step only until the write below (the
        # native decode reads them after it, in place).
        rings = None
        if plan.reads_rings:
            rings = store.read_residual(layer, batch.slots, plan.ring_pages)
        store.write(layer, batch.token_slots, batch.token_index, k, v)
        window = self.sliding_windows[layer]
        if plan.only_tiered is not None:
            # A step of one unit of tiered decodes, the step's tokens in order: no scatter.
            unit = plan.only_tiered
            return tiered.decode_unit(self._decode_step, layer, q, unit, window, (k, v, rings))
        # A step of uniform decodes only (tokens None): their output is the step's, no gather.
        out = None if plan.tokens is None else torch.empty_like(q)
        if plan.groups:
            tokens = slice(None) if out is None else plan.tokens
            residual = None
            if rings is not None:
                residual = rings.select(plan.decode).append(
                    k[tokens][:, :, None], v[tokens][:, :, None], (plan.lens - 1)[:, None]
                )
            decoded = self._decode(layer, q[tokens], plan.groups, window, residual)
            if out is None:
                return decoded
            out[tokens] = decoded
        if plan.units:
            fresh = (k, v, rings)
            tiered.attend_rows(
                self._decode_step, layer, q, plan.units, window, out, self._fused, fresh
            )
        for pre in plan.prefill:
            own = slice(pre.start, pre.start + pre.n)
            residual = None
            if rings is not None:
                residual = rings.select(torch.tensor([pre.row])).append(
                    k[own].transpose(0, 1)[None],
                    v[own].transpose(0, 1)[None],
                    batch.token_index[own][None],
                )
            out[own] = attend_prefill(self.store, layer, q[own], pre, window, residual)
        return out

    @torch.inference_mode()
    def finish_step(self, batch: AttentionBatch) -> None:
        """After the step's last layer: the tier decisions of its tiered requests, all layers
        at once (``tiered.decide_step``)."""
        plan = self.plan(batch)
        if plan.is_tiered is None:
            return
        is_tiered = plan.is_tiered
        seen = torch.tensor(batch.context_lens) + torch.tensor(batch.query_lens)
        tiered.decide_step(
            self.store, batch.slots[is_tiered], seen[is_tiered], self.chain.compactor
        )

    def plan(self, batch: AttentionBatch) -> _StepPlan:
        """Work out, once per step (the runner calls it before the first layer; a layer calls
        it for a step nobody planned), how its requests are attended: which are uniform
        decodes, by format, and which prefill; which are tiered; whether residual rings are
        read before the write. Every value a layer needs on the host is read here."""
        if batch is self._step and self._plan is not None:
            return self._plan
        self._step, self._step_cache = batch, {}
        self._decode_step.cache = self._step_cache
        store = self.store
        decode, prefill, units, is_tiered = batch.decode_rows, batch.prefill_rows, [], None
        if store.num_tiered:
            is_tiered = store.slot_format[batch.slots, 1] >= 0
            units = step_units(store, batch, is_tiered)
            for unit in units:
                if unit.tokens.shape[1] == 1 and unit.host is not None:
                    unit.backend = self.chain.tiered(unit.host.formats)
            tiered_rows = is_tiered.tolist()
            decode = decode[~is_tiered[decode]]
            prefill = [r for r in prefill if not tiered_rows[r]]
        lens = torch.tensor(batch.context_lens, dtype=torch.int64)[decode] + 1
        tokens = torch.tensor(batch.query_starts, dtype=torch.int64)[decode]
        only_decodes = decode.numel() == batch.token_slots.numel() and not units
        slots = batch.slots[decode]
        groups = []
        for f, rows in store.by_format(slots) if decode.numel() else []:
            part = (slots, lens) if rows is None else (slots[rows], lens[rows])
            ring_pages = 0
            if store.num_residual and bool(store.residual[part[0]].any()):
                per_page = store.layouts[0].tokens_per_page
                ring_pages = int(store.ring[part[0]].max()) // per_page
            groups.append(DecodeGroup(f, rows, *part, int(part[1].max()), ring_pages))
            self.chain.decoder(f, store.dtype).plan(self._decode_step, groups[-1])
        high = store.slot_format[batch.slots, 0].tolist()
        recent = store.residual[batch.slots].tolist() if store.num_residual else None
        ring = store.ring[batch.slots].tolist() if store.num_residual else None
        prefill_rows = [
            PrefillRow(
                row,
                batch.slot_list[row],
                batch.query_starts[row],
                batch.query_lens[row],
                batch.context_lens[row],
                recent[row] if recent else 0,
                ring[row] if ring else 0,
                high[row],
            )
            for row in prefill
        ]
        reads, ring_pages = False, 0
        if store.num_residual:
            # A prefill chunk reads them (its later tokens may overwrite ring entries its first
            # queries need), and so does a decode whose backend does not read rings in place.
            in_place = all(
                self.chain.decoder(g.f, store.dtype).reads_rings_in_place for g in groups
            )
            reads = bool(batch.prefill_rows) or not in_place
            per_page = store.layouts[0].tokens_per_page
            ring_pages = max(max(ring) // per_page, 1)
        store.plan_write(batch.token_slots, batch.token_index)
        rotate: torch.Tensor | slice | None = None
        if store.num_rotated:
            mask = store.rotated[batch.token_slots]
            if bool(mask.all()):
                rotate = slice(None)
            elif bool(mask.any()):
                rotate = mask.nonzero()[:, 0]
        self._plan = _StepPlan(
            decode,
            None if only_decodes else tokens,
            slots,
            lens,
            groups,
            prefill_rows,
            units,
            is_tiered,
            reads,
            ring_pages,
            rotate,
        )
        # Decode rows come in batch order, one token each: such a unit of all of the step's
        # tokens is the step, in order.
        whole = len(units) == 1 and units[0].tokens.shape[0] == batch.token_slots.numel()
        if whole and units[0].backend is not None and not decode.numel() and not prefill_rows:
            self._plan.only_tiered = units[0]
        return self._plan

    def _decode(
        self,
        layer: int,
        q: torch.Tensor,
        groups: list[DecodeGroup],
        window: int | None,
        residual: Residual | None,
    ) -> torch.Tensor:
        """Each format's rows through the first backend of the chain that serves it."""
        out = torch.empty_like(q)
        for group in groups:
            rows = group.rows
            backend = self.chain.decoder(group.f, q.dtype)
            part_residual = None
            if residual is not None and not backend.reads_rings_in_place:
                part_residual = residual.select(rows)
            part_q = q if rows is None else q[rows]
            part = backend.decode(self._decode_step, layer, part_q, group, window, part_residual)
            if rows is None:
                return part  # one format: no scatter
            out[rows] = part
        return out
