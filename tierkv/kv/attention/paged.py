"""PagedAttention: appends a step's keys and values to the store, then attends over them.

One engine step mixes decodes (one query token per request) and prefill chunks (many). Decodes
are attended in one batched call per storage format; each prefill chunk attends alone, since
chunks are few per step and differ in length.

Decodes of uniform slots go to the attention backends (``tierkv.kv.backends``): each format's
rows to the first backend of the configured chain that serves the format (``fast``, the
default: the C++ kernels of ``cpu``, then ``torch``'s fused ops, then ``reference``, which
gathers, dequantizes and attends densely and is what the others are tested against).

Requests under a differentiated policy (tiered slots) take ``tiered``, an explicit softmax over
both tiers that also returns the attention probabilities their scores need (the ``cpu``
kernel's ``tiered_decode`` where the chain has it, ``torch``'s fused ops where it has those);
after the step's last layer (``finish_step``) the policy decides and compacts their tiers.
Uniform requests pay nothing for tiers.

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
import torch.nn.functional as F

from tierkv.batch import AttentionBatch
from tierkv.kv.attention import tiered
from tierkv.kv.backends import DecodeStep, KVBackend, chain
from tierkv.kv.backends.cpu import ops as native
from tierkv.kv.backends.partial import causal_attention, flash_serves, residual_prefill
from tierkv.kv.store.kv_store import KVStore
from tierkv.kv.store.views import Residual, causal_visibility

# Queries per attention call of a prefill chunk with a residual window (see ``_prefill``).
_PREFILL_BLOCK = 256


@dataclass
class _StepRows:
    """How one step's requests are attended (``PagedAttention._rows``).

    ``decode`` [Bd]: the uniform requests decoding (batch indices), ``tokens`` [Bd] their
    tokens' indices in the step (None when they are all of its tokens, in order), ``slots`` and
    ``lens`` [Bd] their store slots and lengths after the step; ``prefill``: the uniform
    requests prefilling; ``units``: the tiered requests (``tiered.step_units``).
    """

    decode: torch.Tensor
    tokens: torch.Tensor | None
    slots: torch.Tensor
    lens: torch.Tensor
    prefill: list[int]
    units: list[tiered.Unit]


class PagedAttention:
    """Appends a step's keys and values to the store, then attends over everything kept."""

    def __init__(
        self,
        store: KVStore,
        sliding_windows: list[int | None],
        backend: str = "reference",
    ) -> None:
        # Built (or loaded from the build cache) here, not at the first request's decode.
        self.chain = chain(backend)
        self.store = store
        self.sliding_windows = sliding_windows
        self.backend = backend
        self._step: AttentionBatch | None = None
        self._step_cache: dict = {}
        self._workspace: dict = {}
        self._decode_step = DecodeStep(store, self._step_cache, self._workspace)
        self._by_format: dict[tuple[int, torch.dtype], KVBackend] = {}
        names = {b.name for b in self.chain}
        # The cpu backend's other kernels (quantizing writes, tiered decode, compaction) and
        # the torch backend's fused tiered path follow the chain too.
        self._native = "cpu" in names
        self._fused = "torch" in names or self._native
        store.token_writer = native.store_tokens if self._native else None

    def __call__(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """``q`` [N, Hq, D], ``k``/``v`` [N, Hkv, D] -> attention output [N, Hq, D]."""
        store = self.store
        self._cache(batch)
        # The rings hold the newest tokens before this step only until the write below (the
        # native decode reads them after it, in place).
        rings = store.read_residual(layer, batch.slots) if self._reads_rings(batch) else None
        store.write(layer, batch.token_slots, batch.token_index, k, v)
        window = self.sliding_windows[layer]
        rows = self._rows(batch)
        # A step of uniform decodes only (tokens None): their output is the step's, no gather.
        out = None if rows.tokens is None else torch.empty_like(q)
        if rows.decode.numel():
            tokens = slice(None) if out is None else rows.tokens
            residual = None
            if rings is not None:
                residual = rings.select(rows.decode).append(
                    k[tokens][:, :, None], v[tokens][:, :, None], (rows.lens - 1)[:, None]
                )
            decoded = self._decode(layer, q[tokens], rows.slots, rows.lens, window, residual)
            if out is None:
                return decoded
            out[tokens] = decoded
        if rows.units:
            workspace = self._workspace if self._fused else None
            fresh = (k, v, rings)
            tiered.attend_rows(
                store, layer, q, rows.units, window, out, workspace, fresh, self._native
            )
        for row in rows.prefill:
            start, n = batch.query_starts[row], batch.query_lens[row]
            residual = None
            if rings is not None:
                own = slice(start, start + n)
                residual = rings.select(torch.tensor([row])).append(
                    k[own].transpose(0, 1)[None],
                    v[own].transpose(0, 1)[None],
                    batch.token_index[own][None],
                )
            out[start : start + n] = self._prefill(
                layer,
                q[start : start + n],
                int(batch.slots[row]),
                batch.context_lens[row],
                window,
                residual,
            )
        return out

    @torch.inference_mode()
    def finish_step(self, batch: AttentionBatch) -> None:
        """After the step's last layer: the tier decisions of its tiered requests, all layers
        at once (``tiered.decide_step``)."""
        if not self.store.num_tiered:
            return
        is_tiered, _ = self._tiered(batch)
        seen = torch.tensor(batch.context_lens) + torch.tensor(batch.query_lens)
        tiered.decide_step(self.store, batch.slots[is_tiered], seen[is_tiered], self._native)

    def _cache(self, batch: AttentionBatch) -> dict:
        """What the layers of ``batch``'s step share (a new step starts an empty one)."""
        if batch is not self._step:
            self._step, self._step_cache = batch, {}
            self._decode_step.cache = self._step_cache
        return self._step_cache

    def _rows(self, batch: AttentionBatch) -> _StepRows:
        """How the requests of ``batch``'s step are attended, worked out at its first layer."""
        cached = self._cache(batch).get("rows")
        if cached is not None:
            return cached
        decode, prefill, units = batch.decode_rows, batch.prefill_rows, []
        if self.store.num_tiered:
            is_tiered, units = self._tiered(batch)
            decode = decode[~is_tiered[decode]]
            prefill = [r for r in prefill if not is_tiered[r]]
        lens = torch.tensor(batch.context_lens, dtype=torch.int64)[decode] + 1
        tokens = torch.tensor(batch.query_starts, dtype=torch.int64)[decode]
        only_decodes = decode.numel() == batch.token_slots.numel() and not units
        cached = _StepRows(
            decode, None if only_decodes else tokens, batch.slots[decode], lens, prefill, units
        )
        self._step_cache["rows"] = cached
        return cached

    def _tiered(self, batch: AttentionBatch) -> tuple[torch.Tensor, list[tiered.Unit]]:
        """Which requests of the step are tiered ([B]) and how they are attended
        (``tiered.step_units``), worked out at the step's first layer."""
        cached = self._cache(batch).get("tiered")
        if cached is None:
            is_tiered = self.store.slot_format[batch.slots, 1] >= 0
            cached = (is_tiered, tiered.step_units(self.store, batch, is_tiered))
            self._step_cache["tiered"] = cached
        return cached

    def _reads_rings(self, batch: AttentionBatch) -> bool:
        """Whether some request of the step needs its residual entries read before the write:
        a prefill chunk (its later tokens may overwrite ring entries its first queries need),
        or a decode the native kernel does not serve."""
        store = self.store
        if not store.num_residual:
            return False
        reads = self._step_cache.get("reads_rings")
        if reads is None:
            formats = [f for f, _ in store.by_format(batch.slots[batch.decode_rows])]
            in_place = all(self._backend(f, store.dtype).reads_rings_in_place for f in formats)
            reads = bool(batch.prefill_rows) or not in_place
            self._step_cache["reads_rings"] = reads
        return reads

    def _backend(self, f: int, dtype: torch.dtype) -> KVBackend:
        """The first backend of the chain that serves format index ``f`` in ``dtype``."""
        key = (f, dtype)
        backend = self._by_format.get(key)
        if backend is None:
            store = self.store
            fmt, dim, device = store.formats[f], store.head_dim, store.pool.arena.device
            backend = next(b for b in self.chain if b.serves(fmt, dim, dtype, device))
            self._by_format[key] = backend
        return backend

    def _decode(
        self,
        layer: int,
        q: torch.Tensor,
        slots: torch.Tensor,
        lens: torch.Tensor,
        window: int | None,
        residual: Residual | None,
    ) -> torch.Tensor:
        """Each format's rows through the first backend of the chain that serves it."""
        out = torch.empty_like(q)
        for f, rows in self.store.by_format(slots):
            args = (q, slots, lens) if rows is None else (q[rows], slots[rows], lens[rows])
            backend = self._backend(f, q.dtype)
            part_residual = None
            if residual is not None and not backend.reads_rings_in_place:
                part_residual = residual.select(rows)
            part = backend.decode(self._decode_step, layer, *args, window, f, part_residual)
            if rows is None:
                return part  # one format: no scatter
            out[rows] = part
        return out

    def _prefill(
        self,
        layer: int,
        q: torch.Tensor,
        slot: int,
        context: int,
        window: int | None,
        residual: Residual | None,
    ) -> torch.Tensor:
        n = q.shape[0]
        total = context + n
        keys, values = self.store.gather(layer, torch.tensor([slot]), total, q.dtype)
        keys, values = keys[:, :, :total], values[:, :, :total]
        queries = q.transpose(0, 1)[None]
        kpos = torch.arange(total)
        if residual is None:
            return causal_attention(queries, keys, values, context, window)[0].transpose(0, 1)
        if window is None or (flash_serves(queries) and window > int(residual.window[0])):
            out = residual_prefill(queries, keys, values, context, residual, window)
            return out[0].transpose(0, 1)
        # Each block of queries sees the quantized keys older than its residual windows and,
        # uncompressed, the ring's entries and the chunk's own tokens within those windows: a
        # block of B queries adds B + R - 1 keys, where the whole chunk at once would add n.
        window_r = int(residual.window[0])
        ring = residual.keys.shape[2] - n
        out = torch.empty_like(queries)
        for start in range(0, n, _PREFILL_BLOCK):
            stop = min(n, start + _PREFILL_BLOCK)
            qpos = torch.arange(context + start, context + stop)
            seen = context + stop
            quantized = causal_visibility(qpos, kpos[:seen], window)
            quantized &= kpos[:seen] <= qpos[:, None] - window_r
            own = torch.arange(max(0, start - window_r + 1), stop) + ring
            cols = torch.cat([torch.arange(ring), own])
            block = Residual(
                residual.keys[:, :, cols],
                residual.values[:, :, cols],
                residual.pos[:, cols],
                residual.window,
            )
            out[:, :, start:stop] = F.scaled_dot_product_attention(
                queries[:, :, start:stop],
                torch.cat([keys[:, :, :seen], block.keys.to(keys.dtype)], 2),
                torch.cat([values[:, :, :seen], block.values.to(values.dtype)], 2),
                attn_mask=torch.cat([quantized, block.visible(qpos[None], window)[0]], 1),
                enable_gqa=True,
            )
        return out[0].transpose(0, 1)
