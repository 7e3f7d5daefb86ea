"""Reference attention over both tiers of differentiated (tiered) slots, and its bookkeeping.

Tiered heads hold different numbers of tokens in two formats, with gaps in their positions, so
attention is an explicit masked softmax: keys and values of both tiers are gathered and
dequantized, masked by each head's counts and by the stored positions (causality and sliding
windows), and the attention probabilities come out of the same pass. They are added to the
tokens' scores layer by layer; after the step's last layer the policy decides every token's
tier (``SlotTiers.decide``) for all layers at once and the tiers are compacted
(``compact.apply_decisions``). It equals dense attention over the dequantized kept tokens; the
fast paths must match it: decodes go to the native kernel (``native.tiered_decode``, reading
both tiers in place and adding the probabilities to the scores in place; the decision
gathers only scores and positions) where it is built, else to the fused torch path
(``workspace``); prefill chunks take SDPA (``_attend_prefill``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tierkv.kv.attention import tiered_ring
from tierkv.kv.backends.cpu import ops as native
from tierkv.kv.backends.partial import causal_attention, flash_serves, residual_prefill
from tierkv.kv.backends.torch import ops as fast
from tierkv.kv.formats.quant import KVFormat
from tierkv.kv.policy.compact import apply_decisions
from tierkv.kv.store.kv_store import HIGH, LOW, RESIDUAL, KVStore
from tierkv.kv.store.views import Residual, TierRead, causal_visibility

if TYPE_CHECKING:
    from tierkv.batch import AttentionBatch


@dataclass
class TieredAttention:
    """The result of ``attend``: the output and the probabilities of every token.

    Token columns ``T`` are those ``read_tier`` gives for the high tier, then the low tier's;
    ``probs`` is ``[B, H, G, nq, T]`` (G query heads per KV head), or None when ``scored``:
    the native decode already added them to the stored scores, or no query counts.
    """

    out: torch.Tensor
    probs: torch.Tensor | None
    scored: bool = False


def _columns(high: TierRead, low: TierRead) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, H, T] and validity of the columns of ``high`` then ``low``."""
    pos = torch.cat([high.fields["pos"], low.fields["pos"]], 2)[..., 0].long()
    return pos, torch.cat([high.valid, low.valid], -1)


def attend(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    query_pos: torch.Tensor,
    window: int | None,
    workspace: dict | None = None,
    residual: Residual | None = None,
    host: UnitHost | None = None,
) -> TieredAttention:
    """Attention of ``q`` [B, nq, Hq, D] at positions ``query_pos`` [B, nq] over what ``slots``
    keep at ``layer``; the slots must share their tier formats. Output in ``q``'s dtype.

    Given a ``workspace`` (the fast backend's buffers) and tier formats
    ``tierkv.kv.backends.torch.ops``
    serves, keys and values are never decoded: the dequantization is folded into the two
    matmuls of each tier (``fast.key_scores``, ``fast.value_mix``), with one softmax over both.
    With ``residual`` (slots with a ring, the step's own tokens appended), each query's newest
    positions come from it uncompressed (``tierkv.kv.attention.tiered_ring``). ``host``: the
    unit's host-side facts (``step_units``), read from the tables when None.
    """
    high = store.read_tier(layer, slots, HIGH, host=host and host.tier(layer, HIGH))
    low = store.read_tier(layer, slots, LOW, host=host and host.tier(layer, LOW))
    if host is None:
        slot = int(slots[0])
        formats = (store.format_of(slot, HIGH), store.format_of(slot, LOW))
    else:
        formats = (store.formats[host.formats[HIGH]], store.formats[host.formats[LOW]])
    pos, valid = _columns(high, low)
    b, nq, hq, dim = q.shape
    heads = store.num_kv_heads
    qg = q.float().view(b, nq, heads, hq // heads, dim).permute(0, 2, 3, 1, 4)
    visible = valid[:, :, None, None, :] & causal_visibility(
        query_pos[:, None, None, :], pos[:, :, None, None, :], window
    )
    if residual is not None:
        visible = tiered_ring.hide_recent(visible, pos, query_pos, residual.window)
    fused = workspace is not None and all(fast.supports(f, dim) for f in formats)
    if fused:
        logits, mix = _fused(qg, (high, low), formats, valid, workspace)
    else:
        kh, vh = formats[0].decode(high.fields, torch.float32)
        kl, vl = formats[1].decode(low.fields, torch.float32)
        keys = torch.cat([kh, kl], 2)
        # Stale bytes past a head's count may decode to NaN: the logits' mask removes it from
        # the keys, but in the values a zero probability would keep it.
        values = torch.cat([vh, vl], 2).masked_fill(~valid[..., None], 0.0)
        logits = qg @ keys[:, :, None].transpose(-1, -2) / math.sqrt(dim)
    logits = logits.masked_fill(~visible, -torch.inf)
    if residual is not None:
        logits = torch.cat([logits, tiered_ring.ring_logits(qg, residual, query_pos, window)], -1)
    probs = logits.softmax(-1)
    ring_probs = None
    if residual is not None:
        probs, ring_probs = probs.split([pos.shape[2], probs.shape[-1] - pos.shape[2]], -1)
    out = mix(probs) if fused else probs @ values[:, :, None]
    if ring_probs is not None:
        out = out + tiered_ring.ring_mix(ring_probs, residual)
        last = None if host is None else host.last_pos
        probs = tiered_ring.fold(probs, ring_probs, pos, valid, residual, last)
    out = out.permute(0, 3, 1, 2, 4).reshape(b, nq, hq, dim)
    return TieredAttention(out.to(q.dtype), probs)


def _fused(
    qg: torch.Tensor,
    reads: tuple[TierRead, TierRead],
    formats: tuple[KVFormat, KVFormat],
    valid: torch.Tensor,
    workspace: dict,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Logits ``[B, H, G, nq, T]`` of both tiers straight from their codes (see
    ``tierkv.kv.backends.torch.ops``), and the function that mixes their values by probabilities of
    that
    shape into the output ``[B, H, G, nq, D]``."""
    b, heads, group, nq, dim = qg.shape
    rows = qg.reshape(b, heads, group * nq, dim) * (1.0 / math.sqrt(dim))
    # Each non-empty tier with its name (for its workspace buffers) and its first column.
    tiers, start = [], 0
    for read, fmt, name in zip(reads, formats, ("high", "low"), strict=True):
        width = read.fields["pos"].shape[2]
        if width:
            tiers.append((read.fields, fmt, name, slice(start, start + width)))
        start += width
    scores = []
    for f, fmt, name, _ in tiers:
        keys = fast.unpack(f["k_codes"], fmt.key_bits, workspace, f"{name}_k")
        # Stale scales past a head's count may be NaN; the caller's mask removes them.
        scale, zero = (f[n].float().transpose(-1, -2) for n in ("k_scale", "k_zero"))
        scores.append(fast.key_scores(rows, keys, scale, zero, fmt.key_bits))
    logits = torch.cat(scores, -1).view(b, heads, group, nq, -1)

    def mix(probs: torch.Tensor) -> torch.Tensor:
        flat = probs.reshape(b, heads, group * nq, -1)
        out = torch.zeros(b, heads, group * nq, dim)
        for f, fmt, name, cols in tiers:
            # A zero probability would not remove a stale NaN scale from the values.
            keep = valid[:, :, None, cols]
            scale, zero = (
                torch.where(keep, f[n].float().transpose(-1, -2), 0.0)
                for n in ("v_scale", "v_zero")
            )
            values = fast.unpack(f["v_codes"], fmt.value_bits, workspace, f"{name}_v")
            out += fast.value_mix(flat[..., cols], values, scale, zero, fmt.value_bits)
        return out.view(b, heads, group, nq, dim)

    return logits, mix


def add_received(
    store: KVStore,
    layer: int,
    slots: torch.Tensor,
    query_pos: torch.Tensor,
    att: TieredAttention,
    host: UnitHost | None = None,
) -> None:
    """Add the attention the tokens of ``slots`` received at ``layer`` to their stored scores
    (the native decode already did). ``host``: as ``attend``'s."""
    if att.scored:
        return
    if host is None:
        if not bool((query_pos >= store.tiers.score_start[slots][:, None]).any()):
            return
    elif not host.counting:
        return
    tiers = [None, None] if host is None else [host.tier(layer, HIGH), host.tier(layer, LOW)]
    high = store.read_tier(layer, slots, HIGH, ("score",), tiers[HIGH])
    low = store.read_tier(layer, slots, LOW, ("score",), tiers[LOW])
    width = high.fields["score"].shape[2]
    stored = torch.cat([high.fields["score"], low.fields["score"]], 2)[..., 0]
    pool = None if host is None else host.pool
    scores = stored + store.tiers.received(att.probs, slots, query_pos, pool)
    formats = (None, None) if host is None else host.formats
    store.write_scores(layer, slots, HIGH, scores[..., :width], formats[HIGH])
    store.write_scores(layer, slots, LOW, scores[..., width:], formats[LOW])


def decide_step(
    store: KVStore, slots: torch.Tensor, seen: torch.Tensor, native: bool = False
) -> None:
    """After a step's last layer: decide the tiers of the ``slots`` [B] (tiered, having seen
    ``seen`` [B] tokens) whose decision step this is, and compact them (by the native kernel
    with ``native``, where it serves the slots' formats).

    Every layer at once: a slot's layers and KV heads are independent units of the decision
    (``read_tier(None, ...)``), so the decision's few dozen tensor ops run once per step rather
    than once per layer; nothing reads a layer's cache again within the step, so deciding at
    its end is deciding right after each layer's attention.
    """
    deciding = store.tiers.deciding(slots, seen)
    if not bool(deciding.any()):
        return
    slots, seen = slots[deciding], seen[deciding]
    for rows in _same_formats(store, slots):
        _decide(store, slots[rows], seen[rows], native and _native_serves(store, slots[rows]))


def _same_formats(store: KVStore, slots: torch.Tensor) -> list[torch.Tensor]:
    """The indices into ``slots`` [B] grouped by their (high, low) formats: what one batched
    tiered call may take together."""
    _, group = store.slot_format[slots].unique(dim=0, return_inverse=True)
    return [torch.nonzero(group == g).flatten() for g in range(int(group.max()) + 1)]


def _decide(store: KVStore, slots: torch.Tensor, seen: torch.Tensor, native: bool) -> None:
    """``decide_step`` for slots sharing their tier formats."""
    high = store.read_tier(None, slots, HIGH, ("score", "pos"))
    low = store.read_tier(None, slots, LOW, ("score", "pos"))
    pos, valid = _columns(high, low)
    scores = torch.cat([high.fields["score"], low.fields["score"]], 2)[..., 0]
    width = high.fields["pos"].shape[2]
    is_low = torch.arange(pos.shape[2]) >= width
    costs = store.costs(int(slots[0]))
    to_high, to_low = store.tiers.decide(slots, seen, scores, pos, valid, is_low, costs)
    apply_decisions(store, None, slots, to_high, to_low, width, native)


@dataclass
class Unit:
    """Tiered requests of a step attended in one call: decodes sharing their tier formats, or
    one prefill chunk. ``tokens`` [R, n] are their tokens' indices in the step, ``query_pos``
    [R, n] their positions, ``slots`` [R] their store slots, ``rows`` [R] their rows of the
    step's batch; ``native``: decodes whose tier formats the native kernel serves. ``host``:
    what the layers need to know about them on the host, read once per step."""

    tokens: torch.Tensor
    query_pos: torch.Tensor
    slots: torch.Tensor
    native: bool
    rows: torch.Tensor
    host: UnitHost | None = None


@dataclass
class UnitHost:
    """A unit's host-side facts for one step (``step_units``), so that no layer reads them
    back from tensors: ``formats`` the store format indices of its high and low tiers;
    ``pages[layer]`` the pages covering the largest count of each tier at that layer once
    the step's tokens are written; ``last_pos`` its largest query position; ``counting`` how
    many of a prefill chunk's queries score (every decode query does); ``recent`` the largest
    residual window of its slots (0: none) and ``ring_pages`` the pages of the largest ring;
    ``pool`` the largest prefill pooling kernel."""

    formats: tuple[int, int]
    pages: list[tuple[int, int]]
    last_pos: int
    counting: int
    recent: int
    ring_pages: int
    pool: int

    def tier(self, layer: int, tier: int) -> tuple[int, int]:
        """``(format index, pages)`` of one tier at ``layer``, for ``KVStore.read_tier``."""
        return self.formats[tier], self.pages[layer][tier]


def step_units(store: KVStore, batch: AttentionBatch, is_tiered: torch.Tensor) -> list[Unit]:
    """How ``attend_rows`` groups the tiered requests (``is_tiered`` [B]) of a step: the same
    at every layer, so worked out once per step."""
    lens = torch.tensor(batch.query_lens, dtype=torch.int64)
    decode = torch.nonzero(is_tiered & (lens == 1)).flatten()
    groups: list[torch.Tensor] = []
    if decode.numel():
        groups += [decode[rows] for rows in _same_formats(store, batch.slots[decode])]
    groups += [torch.tensor([r]) for r in torch.nonzero(is_tiered & (lens > 1)).flatten().tolist()]
    starts = torch.tensor(batch.query_starts, dtype=torch.int64)
    units = []
    for rows in groups:
        n = batch.query_lens[int(rows[0])]
        tokens = starts[rows][:, None] + torch.arange(n)
        slots = batch.slots[rows]
        native_decode = n == 1 and _native_serves(store, slots)
        query_pos = batch.token_index[tokens]
        host = _unit_host(store, slots, query_pos, n)
        units.append(Unit(tokens, query_pos, slots, native_decode, rows, host))
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


def attend_rows(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    units: list[Unit],
    window: int | None,
    out: torch.Tensor,
    workspace: dict | None = None,
    fresh: tuple[torch.Tensor, torch.Tensor, Residual | None] | None = None,
    native: bool = False,
) -> None:
    """Attend and score for the tiered requests of a step (``step_units``) at one layer,
    writing their rows of ``out`` (``decide_step`` decides after the last layer). Decodes
    sharing tier formats form one batched call; prefill chunks go alone. ``workspace`` selects
    the fused torch paths, ``native`` the cpu backend's ``tiered_decode`` where it serves.
    ``fresh`` is the step's keys and values [N, H, D] and, when slots have residual rings,
    their entries read before the step's write (``KVStore.read_residual``;
    None if the step did not read them: then only the native decode needs them).
    """
    for unit in units:
        tokens, query_pos, slots = unit.tokens, unit.query_pos, unit.slots
        host = unit.host
        if native and unit.native:
            att = _attend_native(
                store, layer, q[tokens[:, 0]], slots, query_pos[:, 0], window, host
            )
            out[tokens] = att.out
            add_received(store, layer, slots, query_pos, att, host)
            continue
        residual = _residual(store, layer, unit, fresh)
        if (
            workspace is not None
            and tokens.shape[1] > 1
            and _dense_serves(q, residual, window, host)
        ):
            att, query_pos = _attend_prefill(
                store, layer, q[tokens], slots, query_pos, window, residual, host
            )
        else:
            att = attend(
                store, layer, q[tokens], slots, query_pos, window, workspace, residual, host
            )
        out[tokens] = att.out
        add_received(store, layer, slots, query_pos, att, host)


def _dense_serves(
    q: torch.Tensor, residual: Residual | None, window: int | None, host: UnitHost | None = None
) -> bool:
    """Whether ``_attend_prefill`` serves a chunk: ``residual_prefill`` takes a sliding window
    only through the native flash kernel and when the window is wider than the ring."""
    if residual is None or window is None:
        return True
    recent = int(residual.window.max()) if host is None else host.recent
    return flash_serves(q[:1, 0].transpose(0, 1)[None]) and window > recent


def _residual(
    store: KVStore,
    layer: int,
    unit: Unit,
    fresh: tuple[torch.Tensor, torch.Tensor, Residual | None] | None,
) -> Residual | None:
    """The ring entries a unit's queries see uncompressed (None when its slots have none)."""
    host = unit.host
    if host is not None and not host.recent:
        return None
    if fresh is None or (host is None and not bool((store.residual[unit.slots] > 0).any())):
        return None
    k, v, rings = fresh
    if rings is None:
        # Read after the step's write: a decode's ring then holds its newest positions, the
        # step's own token included (a prefill chunk always has them read before).
        return store.read_residual(layer, unit.slots, host and host.ring_pages)
    own_k = k[unit.tokens].permute(0, 2, 1, 3)
    own_v = v[unit.tokens].permute(0, 2, 1, 3)
    return rings.select(unit.rows).append(own_k, own_v, unit.query_pos)


def _attend_prefill(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    query_pos: torch.Tensor,
    window: int | None,
    residual: Residual | None = None,
    host: UnitHost | None = None,
) -> tuple[TieredAttention, torch.Tensor]:
    """``attend`` for a prefill chunk of one request (``q`` [1, n, Hq, D]).

    Chunks come before the request's first decision, so its tokens are all in the high tier, in
    position order: the output is dense causal attention over them (``causal_attention``, or
    ``residual_prefill`` with a ring), and probabilities are computed only for the queries that
    score (the last ``sw`` of the prompt), none when no query of the chunk does. Returns the
    attention, its probabilities covering those queries, and their positions.
    """
    n = q.shape[1]
    total = (int(query_pos[0, -1]) if host is None else host.last_pos) + 1
    f = None if host is None else host.formats[HIGH]
    keys, values = store.gather(layer, slots, total, q.dtype, f)
    # The probabilities span every column ``read_tier`` gives (whole pages); attention, only
    # the tokens.
    _, heads, width, dim = keys.shape
    queries = q[0].transpose(0, 1)[None]
    context = total - n
    if residual is None:
        out = causal_attention(queries, keys[:, :, :total], values[:, :, :total], context, window)
    else:
        kept = (keys[:, :, :total], values[:, :, :total])
        live = None if host is None else _live_entries(store, host, residual, context, n)
        out = residual_prefill(queries, *kept, context, residual, window, live)
    if host is None:
        counting = int((query_pos[0] >= store.tiers.score_start[slots[0]]).sum())
    else:
        counting = host.counting
    if not counting:
        return TieredAttention(out[0].transpose(0, 1)[None], None, scored=True), query_pos
    first = n - counting
    columns = torch.arange(width)
    visible = causal_visibility(query_pos[0, first:], columns, window)
    group = q.shape[2] // heads
    scoring = queries[:, :, first:].float().view(1, heads, group, n - first, dim)
    logits = scoring @ keys.float()[:, :, None].transpose(-1, -2) * (1.0 / math.sqrt(dim))
    if residual is None:
        probs = logits.masked_fill_(~visible, -torch.inf).softmax(-1)
        return TieredAttention(out[0].transpose(0, 1)[None], probs), query_pos[:, first:]
    # Column c holds position c: the ring's entries fold back onto their columns.
    scored_pos = query_pos[:, first:]
    pos = columns.expand(1, heads, width)
    visible = tiered_ring.hide_recent(visible[None, None], pos, scored_pos, residual.window)
    logits = logits.masked_fill_(~visible, -torch.inf)
    ring = tiered_ring.ring_logits(scoring, residual, scored_pos, window)
    probs, ring_probs = torch.cat([logits, ring], -1).softmax(-1).split([width, ring.shape[-1]], -1)
    valid = columns[None, None] < total
    last = None if host is None else host.last_pos
    probs = tiered_ring.fold(probs, ring_probs, pos, valid.expand(1, heads, width), residual, last)
    return TieredAttention(out[0].transpose(0, 1)[None], probs), scored_pos


def _live_entries(
    store: KVStore, host: UnitHost, residual: Residual, context: int, n: int
) -> tuple[int, int, int]:
    """``residual_prefill``'s host facts for a chunk of one slot: its residual window, the
    empty entries of ``residual`` (columns without a token) and the first live position: the
    slot's ring holds its newest ``min(context, ring)`` positions before the chunk, then come
    the chunk's own ``n``."""
    live = min(context, host.ring_pages * store.layouts[0].tokens_per_page)
    return host.recent, residual.pos.shape[1] - live - n, context - live


def _native_serves(store: KVStore, slots: torch.Tensor) -> bool:
    """Whether the native kernel serves both tier formats of ``slots`` (which share them)."""
    formats = (store.format_of(int(slots[0]), HIGH), store.format_of(int(slots[0]), LOW))
    return native.available() and all(native.supports(f, store.head_dim) for f in formats)


def _attend_native(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    query_pos: torch.Tensor,
    window: int | None,
    host: UnitHost | None = None,
) -> TieredAttention:
    """``attend`` for one decode query per slot (``q`` [B, Hq, D] at ``query_pos`` [B]), by
    the native kernel reading both tiers in place, which then adds the probabilities to the
    stored scores (a decode query always counts: it is past the prompt)."""
    known = {} if host is None else {"formats": host.formats, "has_ring": host.recent > 0}
    out, _ = native.tiered_decode(store, layer, q, slots, query_pos, window, score=True, **known)
    return TieredAttention(out[:, None], None, scored=True)
