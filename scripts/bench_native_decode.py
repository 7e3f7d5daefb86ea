"""Attention time of one decode step, per layer: native kernel vs fast torch path vs SDPA.

Demo-model shapes (4 layers, 4 query heads, 2 KV heads, head dim 64, bfloat16 queries as the
engine computes them). For each batch size, context and format, a store is filled with random
keys and values in every layer; a "step" attends every layer once (so the pages of four layers
compete for the caches, as in the engine) and the time per layer is the step's over 4.
Compared, in one run:

* ``native``: ``tierkv.kv.backends.cpu.ops.decode`` (the C++ kernel over the pages);
* ``fast``: ``tierkv.kv.backends.torch.ops.decode`` with its per-step cache and workspace, as the
  engine
  calls it;
* ``sdpa32``/``sdpa16``: ``scaled_dot_product_attention`` over an uncompressed contiguous
  cache ``[B, 2, T, 64]`` in float32 / bfloat16 (no page table, no mask): the floor an
  uncompressed cache would cost.

With ``--tiered``, tiered slots instead (default policy ``k8v4/k4v2-g64``): each (request,
layer, KV head) holds a random 60-80% of the context in the high tier and most of the rest in
the low one (the others pruned), positions shuffled as decisions leave them; compared:

* ``native``: ``tierkv.kv.backends.cpu.ops.tiered_decode`` (one call: the kernel over each tier, the
  merge and the rescaled probabilities);
* ``fused``: ``tierkv.kv.attention.tiered.attend`` with a workspace (its fused torch path: a gather
  of
  each tier's pages, then dequantization folded into the matmuls), as the engine calls it.

Run: ``python scripts/bench_native_decode.py`` (both thread counts are measured in one run),
``python scripts/bench_native_decode.py --tiered --batch 16 --context 1024``; ``--q-heads 14``
gives 7 query heads per KV head (Qwen2.5's grouping) instead of the demo model's 2.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tierkv.kv.attention import tiered
from tierkv.kv.backends.cpu import ops as native
from tierkv.kv.backends.torch import ops as fast
from tierkv.kv.formats.quant import FORMATS, default_page_bytes
from tierkv.kv.policy.spec import KVPolicy
from tierkv.kv.store.kv_store import HIGH, LOW, KVStore
from tierkv.kv.store.pool import PagePool

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 4, 4, 2, 64  # Q_HEADS: the default of --q-heads
DTYPE = torch.bfloat16


def _time(step: Callable[[], None], repeat: int) -> float:
    """Median seconds of one call of ``step`` over ``repeat`` timed batches of calls."""
    step()
    start = time.perf_counter()
    step()
    once = time.perf_counter() - start
    calls = max(1, int(0.02 / max(once, 1e-7)))
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def _empty_store(pages: int, batch: int, context: int) -> KVStore:
    """A store of ``pages`` pages for ``batch`` requests of up to ``context + 1`` tokens."""
    pool = PagePool(pages, default_page_bytes(HEAD_DIM))
    return KVStore(pool, LAYERS, KV_HEADS, HEAD_DIM, DTYPE, batch, context + 1)


def _store(name: str, batch: int, context: int) -> tuple[KVStore, torch.Tensor, int]:
    """A store holding ``context`` random tokens per request in every layer, format ``name``."""
    fmt = FORMATS[name]
    per_page = fmt.layout(HEAD_DIM, DTYPE, default_page_bytes(HEAD_DIM)).tokens_per_page
    store = _empty_store(LAYERS * KV_HEADS * batch * -(-(context + 1) // per_page), batch, context)
    slots = torch.tensor([store.acquire_slot(fmt) for _ in range(batch)])
    store.reserve(slots, torch.full((batch,), context + 1))
    gen = torch.Generator().manual_seed(0)
    token_slots = slots.repeat_interleave(context)
    index = torch.arange(context).repeat(batch)
    for layer in range(LAYERS):
        k = torch.randn(batch * context, KV_HEADS, HEAD_DIM, generator=gen)
        v = torch.randn(batch * context, KV_HEADS, HEAD_DIM, generator=gen)
        store.write(layer, token_slots, index, k.to(DTYPE), v.to(DTYPE))
    return store, slots, store.register(fmt)


def _measure(
    name: str, batch: int, context: int, threads: tuple[int, ...], repeat: int, q_heads: int
) -> None:
    store, slots, f = _store(name, batch, context)
    lens = torch.full((batch,), context)
    q = torch.randn(batch, q_heads, HEAD_DIM).to(DTYPE)
    workspace: dict = {}
    group = q_heads // KV_HEADS
    qg = q.view(batch, KV_HEADS, group, HEAD_DIM)
    dense = {
        dtype: [torch.randn(2, batch, KV_HEADS, context, HEAD_DIM).to(dtype) for _ in range(LAYERS)]
        for dtype in (torch.float32, torch.bfloat16)
    }

    def native_step() -> None:
        cache: dict = {}
        for layer in range(LAYERS):
            native.decode(store, layer, q, slots, lens, None, f, cache)

    def fast_step() -> None:
        cache: dict = {}
        for layer in range(LAYERS):
            fast.decode(store, layer, q, slots, lens, None, f, cache, workspace)

    def sdpa_step(dtype: torch.dtype) -> Callable[[], None]:
        query = qg.to(dtype)

        def step() -> None:
            for kv in dense[dtype]:
                F.scaled_dot_product_attention(query, kv[0], kv[1])

        return step

    for n in threads:
        torch.set_num_threads(n)
        ms = {
            "native": _time(native_step, repeat),
            "fast": _time(fast_step, repeat),
            "sdpa32": _time(sdpa_step(torch.float32), repeat),
            "sdpa16": _time(sdpa_step(torch.bfloat16), repeat),
        }
        ms = {k: v * 1e3 / LAYERS for k, v in ms.items()}
        print(
            f"| {name} | {batch} | {context} | {n} | {ms['native']:.3f} | {ms['fast']:.3f} | "
            f"{ms['sdpa32']:.3f} | {ms['sdpa16']:.3f} | {ms['fast'] / ms['native']:.2f}x | "
            f"{ms['native'] / ms['sdpa32']:.2f} | {ms['native'] / ms['sdpa16']:.2f} |",
            flush=True,
        )


def _tiered_store(policy: KVPolicy, batch: int, context: int) -> tuple[KVStore, torch.Tensor]:
    """A store whose ``batch`` tiered slots hold, per (layer, KV head), a random share of
    ``context`` tokens in each tier, at shuffled positions below ``context``."""
    per_page = min(
        fmt.layout(HEAD_DIM, DTYPE, default_page_bytes(HEAD_DIM)).tokens_per_page
        for fmt in (policy.high, policy.low)
    )
    store = _empty_store(LAYERS * KV_HEADS * batch * (-(-context // per_page) + 2), batch, context)
    slots = torch.tensor([store.acquire_slot(policy, context) for _ in range(batch)])
    gen = torch.Generator().manual_seed(0)
    for layer in range(LAYERS):
        high = (torch.rand(batch, KV_HEADS, generator=gen) * 0.2 + 0.6) * context
        low = (context - high) * (torch.rand(batch, KV_HEADS, generator=gen) * 0.2 + 0.8)
        high, low = high.long(), low.long()
        store.resize(layer, slots, high, low)
        for b, slot in enumerate(slots.tolist()):
            for head in range(KV_HEADS):
                pos = torch.randperm(context, generator=gen)
                split = int(high[b, head])
                for tier, fmt, kept in (
                    (HIGH, policy.high, pos[:split]),
                    (LOW, policy.low, pos[split : split + int(low[b, head])]),
                ):
                    k, v = torch.randn(2, kept.numel(), 1, HEAD_DIM, generator=gen).to(DTYPE)
                    fields = fmt.encode(k, v, positions=kept, dtype=DTYPE)
                    index = torch.arange(kept.numel())
                    store.put(
                        layer,
                        tier,
                        torch.full_like(index, slot),
                        torch.full_like(index, head),
                        index,
                        {name: value[:, 0] for name, value in fields.items()},
                    )
    return store, slots


def _measure_tiered(
    spec: str, batch: int, context: int, threads: tuple[int, ...], repeat: int, q_heads: int
) -> None:
    policy = KVPolicy.parse(spec)
    store, slots = _tiered_store(policy, batch, context)
    q = torch.randn(batch, q_heads, HEAD_DIM).to(DTYPE)
    query_pos = torch.full((batch,), context)
    workspace: dict = {}

    def native_step() -> None:
        for layer in range(LAYERS):
            native.tiered_decode(store, layer, q, slots, query_pos, None)

    def fused_step() -> None:
        for layer in range(LAYERS):
            tiered.attend(store, layer, q[:, None], slots, query_pos[:, None], None, workspace)

    for n in threads:
        torch.set_num_threads(n)
        ms = {"native": _time(native_step, repeat), "fused": _time(fused_step, repeat)}
        ms = {k: v * 1e3 / LAYERS for k, v in ms.items()}
        print(
            f"| {spec} | {batch} | {context} | {n} | {ms['native']:.3f} | {ms['fused']:.3f} | "
            f"{ms['fused'] / ms['native']:.2f}x |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["k8v4", "k4v2", "k8v8"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--context", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--tiered", action="store_true", help="tiered slots instead")
    parser.add_argument("--policy", default="k8v4/k4v2-g64", help="the --tiered policy")
    parser.add_argument(
        "--q-heads", type=int, default=Q_HEADS, help="query heads, a multiple of the 2 KV heads"
    )
    args = parser.parse_args()
    if args.q_heads < KV_HEADS or args.q_heads % KV_HEADS:
        raise SystemExit(f"--q-heads must be a positive multiple of {KV_HEADS}")
    if not native.available():
        raise SystemExit(f"native kernel unavailable: {native.unavailable_reason()}")
    if args.tiered:
        print("ms per layer-call (one decode step over 4 layers / 4): attention of both tiers")
        print("| policy | B | context | threads | native | fused torch | fused/native |")
        print("|---|---|---|---|---|---|---|")
        for batch in args.batch:
            for context in args.context:
                _measure_tiered(
                    args.policy, batch, context, tuple(args.threads), args.repeat, args.q_heads
                )
        return
    print("ms per layer-call (one decode step over 4 layers / 4); ratios in the last columns")
    print(
        "| format | B | context | threads | native | fast | sdpa fp32 | sdpa bf16 | "
        "fast/native | native/sdpa32 | native/sdpa16 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.formats:
        for batch in args.batch:
            for context in args.context:
                _measure(name, batch, context, tuple(args.threads), args.repeat, args.q_heads)


if __name__ == "__main__":
    main()
