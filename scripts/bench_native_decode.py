"""Attention time of one decode step, per layer: native kernel vs fast torch path vs SDPA.

Demo-model shapes (4 layers, 4 query heads, 2 KV heads, head dim 64, bfloat16 queries as the
engine computes them). For each batch size, context and format, a store is filled with random
keys and values in every layer; a "step" attends every layer once (so the pages of four layers
compete for the caches, as in the engine) and the time per layer is the step's over 4.
Compared, in one run:

* ``native``: ``tierkv.kv.native.decode`` (the C++ kernel over the pages);
* ``fast``: ``tierkv.kv.fast.decode`` with its per-step cache and workspace, as the engine
  calls it;
* ``sdpa32``/``sdpa16``: ``scaled_dot_product_attention`` over an uncompressed contiguous
  cache ``[B, 2, T, 64]`` in float32 / bfloat16 (no page table, no mask): the floor an
  uncompressed cache would cost.

Run: ``python scripts/bench_native_decode.py`` (both thread counts are measured in one run).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tierkv.kv import fast, native
from tierkv.kv.pool import PagePool
from tierkv.kv.quant import FORMATS, default_page_bytes
from tierkv.kv.store import KVStore

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 4, 4, 2, 64
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


def _store(name: str, batch: int, context: int) -> tuple[KVStore, torch.Tensor, int]:
    """A store holding ``context`` random tokens per request in every layer, format ``name``."""
    fmt = FORMATS[name]
    per_page = fmt.layout(HEAD_DIM, DTYPE, default_page_bytes(HEAD_DIM)).tokens_per_page
    pages = LAYERS * KV_HEADS * batch * -(-(context + 1) // per_page)
    store = KVStore(
        PagePool(pages, default_page_bytes(HEAD_DIM)),
        LAYERS,
        KV_HEADS,
        HEAD_DIM,
        DTYPE,
        batch,
        context + 1,
    )
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


def _measure(name: str, batch: int, context: int, threads: tuple[int, ...], repeat: int) -> None:
    store, slots, f = _store(name, batch, context)
    lens = torch.full((batch,), context)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM).to(DTYPE)
    workspace: dict = {}
    group = Q_HEADS // KV_HEADS
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["k8v4", "k4v2", "k8v8"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--context", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if not native.available():
        raise SystemExit(f"native kernel unavailable: {native.unavailable_reason()}")
    print("ms per layer-call (one decode step over 4 layers / 4); ratios in the last columns")
    print(
        "| format | B | context | threads | native | fast | sdpa fp32 | sdpa bf16 | "
        "fast/native | native/sdpa32 | native/sdpa16 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.formats:
        for batch in args.batch:
            for context in args.context:
                _measure(name, batch, context, tuple(args.threads), args.repeat)


if __name__ == "__main__":
    main()
