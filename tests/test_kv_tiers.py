"""Differentiated (tiered) KV policies: reference attention, compaction, accounting, budget."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierkv.batch import AttentionBatch
from tierkv.kv.attention.paged import PagedAttention
from tierkv.kv.formats.quant import default_page_bytes, dequantize, quantize
from tierkv.kv.formats.rotation import rotate
from tierkv.kv.policy.compact import apply_decisions
from tierkv.kv.policy.spec import KVPolicy
from tierkv.kv.store.kv_store import HIGH, LOW, KVStore
from tierkv.kv.store.pool import PagePool

LAYERS, HEADS, HEAD_DIM = 2, 2, 32


def _store(num_pages: int = 256, max_seqs: int = 4, max_len: int = 160) -> KVStore:
    pool = PagePool(num_pages, default_page_bytes(HEAD_DIM))
    return KVStore(pool, LAYERS, HEADS, HEAD_DIM, torch.float32, max_seqs, max_len)


def _requant(x: torch.Tensor, high_bits: int, low_bits: int | None) -> torch.Tensor:
    """What a token should read back as: quantized high, and re-quantized low if demoted, in
    the rotated basis the policies store (``h=1``), seen back in the model's."""
    out = dequantize(quantize(rotate(x, "in"), high_bits, 32))
    out = out if low_bits is None else dequantize(quantize(out, low_bits, 32))
    return rotate(out, "out")


def _held(store: KVStore, slot: int, layer: int, tier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [H, T] padded with -1, scores) of the tokens a tier holds."""
    read = store.read_tier(layer, torch.tensor([slot]), tier)
    pos = read.fields["pos"][0, ..., 0].long().masked_fill(~read.valid[0], -1)
    return pos, read.fields["score"][0, ..., 0]


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_tiered_attention_equals_dense_attention_over_the_kept_dequantized_tokens(
    backend: str,
) -> None:
    store = _store()
    policy = KVPolicy.parse("k8v4/k4v2:ah=1.2,al=0.6,w=8,sw=16")
    gen = torch.Generator().manual_seed(0)
    prompt, steps = 70, 6
    slot = store.acquire_slot(policy, prompt)
    total = prompt + steps
    k = torch.randn(total, HEADS, HEAD_DIM, generator=gen) * 2
    v = torch.randn(total, HEADS, HEAD_DIM, generator=gen)
    q = torch.randn(total, 2 * HEADS, HEAD_DIM, generator=gen) * 2
    attention = PagedAttention(store, [None, 24], backend)
    for layer in range(LAYERS):
        store.reserve(torch.tensor([slot]), torch.tensor([prompt]))
        batch = AttentionBatch.build([slot], [0], [prompt])
        attention(layer, q[:prompt], k[:prompt], v[:prompt], batch)
    attention.finish_step(batch)
    kept_after_prefill = store.num_tokens[slot].clone()
    assert (kept_after_prefill < prompt).any()  # the thresholds pruned something
    for step in range(prompt, total):
        store.reserve(torch.tensor([slot]), torch.tensor([step + 1]))
        batch = AttentionBatch.build([slot], [step], [1])
        for layer in range(LAYERS):
            # The oracle: the tokens kept before this step (by their stored positions and
            # tiers) plus the new one, dequantized independently, attended densely.
            hi_pos, _ = _held(store, slot, layer, HIGH)
            lo_pos, _ = _held(store, slot, layer, LOW)
            want = []
            for head in range(HEADS):
                ph = torch.cat([hi_pos[head][hi_pos[head] >= 0], torch.tensor([step])])
                pl = lo_pos[head][lo_pos[head] >= 0]
                keys = torch.cat([_requant(k[ph, head], 8, None), _requant(k[pl, head], 8, 4)])
                vals = torch.cat([_requant(v[ph, head], 4, None), _requant(v[pl, head], 4, 2)])
                positions = torch.cat([ph, pl])
                if layer == 1:
                    window = positions > step - 24
                    keys, vals = keys[window], vals[window]
                logits = q[step, 2 * head : 2 * head + 2] @ keys.T / math.sqrt(HEAD_DIM)
                want.append(logits.softmax(-1) @ vals)
            out = attention(
                layer, q[step : step + 1], k[step : step + 1], v[step : step + 1], batch
            )
            torch.testing.assert_close(out[0], torch.cat(want), rtol=1e-5, atol=1e-5)
        attention.finish_step(batch)
    counts = store.count[slot]
    assert (counts[..., LOW] > 0).any() and (counts.sum(-1) != counts.sum(-1).max()).any()
    store.release_slot(slot)
    assert store.pool.num_free == store.pool.num_pages


@pytest.mark.parametrize(
    ("pool", "chunks", "ring"), [(1, [12], 0), (3, [12], 0), (1, [12], 3), (3, [9, 3], 3)]
)
def test_prefill_scores_are_the_normalised_attention_of_the_last_window(
    pool: int, chunks: list[int], ring: int
) -> None:
    """Scores after the prompt: what its last ``sw`` queries gave each token, over the
    quantized keys and, with a residual ring of ``r``, each query's newest ``r`` positions
    uncompressed (a chunk boundary inside the scoring window included)."""
    store = _store()
    policy = KVPolicy.parse(f"k8v8/k4v4:ah=0,al=0,sw=5,pk={pool},r={ring}")  # all kept high
    gen = torch.Generator().manual_seed(1)
    n = sum(chunks)
    slot = store.acquire_slot(policy, n)
    k = torch.randn(n, HEADS, HEAD_DIM, generator=gen)
    q = torch.randn(n, 2 * HEADS, HEAD_DIM, generator=gen)
    store.reserve(torch.tensor([slot]), torch.tensor([n]))
    attention, done = PagedAttention(store, [None, None]), 0
    for size in chunks:
        part = slice(done, done + size)
        attention(0, q[part], k[part], k[part], AttentionBatch.build([slot], [done], [size]))
        done += size
    pos, score = _held(store, slot, 0, HIGH)
    kq = _requant(k, 8, None)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    exact = causal & ~torch.ones(n, n, dtype=torch.bool).tril(-ring)  # within the ring
    for head in range(HEADS):
        qh = q[:, 2 * head : 2 * head + 2].transpose(0, 1) / math.sqrt(32)
        logits = torch.where(exact, qh @ k[:, head].T, qh @ kq[:, head].T)
        probs = logits.masked_fill(~causal, -torch.inf).softmax(-1)  # [2, n, n]
        # Per chunk: what its queries among the last 5 gave, max over the group, pooled (each
        # token also takes the largest of its pool // 2 neighbours per side); chunks add up,
        # each to the tokens written so far.
        received, start = torch.zeros(n), 0
        for size in chunks:
            end = start + size
            part = probs[:, max(start, n - 5) : end, :end].sum(1).amax(0)
            padded = torch.nn.functional.pad(part, (pool // 2, pool // 2))
            received[:end] += padded.unfold(0, pool, 1).amax(-1)
            start = end
        seen_by = n - torch.clamp(torch.arange(n), min=n - 5)
        assert pos[head][pos[head] >= 0].tolist() == list(range(n))
        torch.testing.assert_close(score[head, :n] / seen_by, received / seen_by)


@settings(max_examples=25, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["admit", "append", "decide", "release"]),
            st.integers(0, 3),
            st.integers(1, 50),
            st.integers(0, 2**31 - 1),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_randomised_tier_workload_keeps_exact_accounting_and_contents(
    events: list[tuple[str, int, int, int]],
) -> None:
    """Admissions, appends, random keep/demote/prune decisions (at one layer or at every layer
    at once), preemptions and aborts (both are releases): pages are exact, unique, never
    leaked, freed ones reused, and every head holds exactly the positions the decisions
    kept."""
    store = _store(num_pages=90, max_len=150)
    pool = store.pool
    policy = KVPolicy.parse("k8v4/k2v2")
    slots: dict[int, int] = {}
    seen: dict[int, int] = {}
    # Expected positions per (request, layer, head, tier).
    held: dict[int, list[list[list[set[int]]]]] = {}
    freed: set[int] = set()
    for kind, req, n, seed in events:
        gen = torch.Generator().manual_seed(seed)
        if kind == "admit" and req not in slots:
            if store.pages_to_admit(n, policy) > pool.num_free:
                continue
            slots[req] = store.acquire_slot(policy, n)
            seen[req], held[req] = 0, [[[set(), set()] for _ in range(HEADS)] for _ in range(2)]
            kind = "append"
        if kind == "append" and req in slots:
            slot, target = slots[req], min(150, seen[req] + n)
            if store.pages_to_grow(slot, target) > pool.num_free or target == seen[req]:
                continue
            before = set(_owned(store, slots.values()).tolist())
            store.reserve(torch.tensor([slot]), torch.tensor([target]))
            new = set(_owned(store, slots.values()).tolist()) - before
            assert len(new & freed) == min(len(new), len(freed))  # freed pages come back first
            freed -= new
            count = target - seen[req]
            for layer in range(LAYERS):
                kv = torch.randn(count, HEADS, HEAD_DIM, generator=gen)
                index = torch.arange(seen[req], target)
                store.write(layer, torch.full((count,), slot), index, kv, kv)
                for head in range(HEADS):
                    held[req][layer][head][HIGH] |= set(index.tolist())
            seen[req] = target
        elif kind == "decide" and req in slots:
            slot = torch.tensor([slots[req]])
            # One layer, or every layer at once (None: units layer * HEADS + head).
            layer = n % (LAYERS + 1) if n % (LAYERS + 1) < LAYERS else None
            before = set(_owned(store, slots.values()).tolist())
            high, low = store.read_tier(layer, slot, HIGH), store.read_tier(layer, slot, LOW)
            valid = torch.cat([high.valid, low.valid], -1)
            width = high.valid.shape[-1]
            fate = torch.randint(0, 3, valid.shape, generator=gen)
            is_low = torch.arange(valid.shape[-1]) >= width
            to_high = valid & ~is_low & (fate == 0)
            to_low = valid & (fate == 1)
            pos = torch.cat([high.fields["pos"], low.fields["pos"]], 2)[0, ..., 0]
            for unit in range(pos.shape[0]):
                at = (layer, unit) if layer is not None else divmod(unit, HEADS)
                tiers = held[req][at[0]][at[1]]
                tiers[HIGH] = set(pos[unit][to_high[0, unit]].tolist())
                tiers[LOW] = set(pos[unit][to_low[0, unit]].tolist())
            apply_decisions(store, layer, slot, to_high, to_low, width)
            freed |= before - set(_owned(store, slots.values()).tolist())
        elif kind == "release" and req in slots:
            freed |= set(_owned(store, [slots[req]]).tolist())
            store.release_slot(slots.pop(req))
            seen.pop(req), held.pop(req)
        owned = _owned(store, slots.values())
        assert owned.numel() == owned.unique().numel() == pool.num_used
        assert pool.num_used + pool.num_free == pool.num_pages
        for r, slot in slots.items():
            for layer in range(LAYERS):
                for tier in (HIGH, LOW):
                    pos, _ = _held(store, slot, layer, tier)
                    for head in range(HEADS):
                        got = pos[head][pos[head] >= 0].tolist()
                        assert sorted(got) == sorted(held[r][layer][head][tier])
    for slot in slots.values():
        store.release_slot(slot)
    assert pool.num_free == pool.num_pages


def _owned(store: KVStore, slots: object) -> torch.Tensor:
    held = [
        store.tables[s, layer, h, tier, : store.held[s, layer, h, tier]]
        for s in slots  # type: ignore[attr-defined]
        for layer in range(LAYERS)
        for h in range(HEADS)
        for tier in (HIGH, LOW)
    ]
    return torch.cat(held) if held else torch.empty(0, dtype=torch.int64)
