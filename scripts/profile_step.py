"""Where a model's engine steps spend their time: prefill chunks and decode batches, per op.

Measures, on this machine and in one process:

1. the machine: the bf16 (or float32) matrix rate the engine's linear kernels reach on the
   model's own weight shapes, at the row counts of a prefill chunk and of a decode batch, and
   a large square matmul's rate; and its memory bandwidth (``tierkv bench decode``'s);
2. the engine: ``--requests`` random prompts of ``--input-len`` tokens, admitted together,
   then ``--decode-steps`` decode steps, each phase profiled with ``torch.profiler``. Ops are
   grouped (linear layers, attention, norms, rope, activations, sampling, other) by their
   self CPU time; what the profiler does not see in an op is host overhead (Python, the
   scheduler, step planning);
3. the ratios that say how far a phase is from the machine: a prefill step's linear FLOPs
   over its linear time against the matrix rate, a decode step's weight bytes over its time
   against the memory bandwidth.

    python scripts/profile_step.py --model smollm2 --policy fp16 --json /tmp/profile.json

Not a test: a measurement. Run it alone on the machine (other load skews every figure).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tierkv import LLM, SamplingParams
from tierkv.bench.decode import measure_bandwidth
from tierkv.model.layers import linear, pack_weight

# Op name fragments per group, first match wins (lower-case).
GROUPS = [
    ("linear", ("linear", "addmm", "aten::mm", "matmul", "mkldnn", "bmm")),
    ("attention", ("paged", "flash", "decode", "attention", "softmax", "sdpa", "tiered")),
    ("kv write", ("store_tokens", "encode", "quantize", "index_put", "scatter")),
    ("norm", ("rms", "norm", "rsqrt", "pow", "mean")),
    ("rope", ("rotary", "rope", "cos", "sin")),
    ("activation", ("silu", "gelu", "mul", "add")),
    ("sampling", ("topk", "sort", "multinomial", "argmax", "log_softmax", "cumsum")),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other ops"


def rate_gflops(fn, flops: float, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of ``fn``."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def machine(llm: LLM, rows: list[int]) -> dict[str, object]:
    """Matrix rates on the model's weight shapes and the memory bandwidth.

    Each shape is timed twice per kernel: ``hot``, one weight reused (it stays in the caches,
    as a prefill chunk's rows reuse it), and ``cold``, cycling through enough copies of it to
    exceed the caches (a decode step reads each layer's weights once, from memory).
    """
    engine = llm.engine
    dtype = engine.dtype
    shapes = sorted(
        {tuple(m.weight.shape) for m in engine.model.modules() if isinstance(m, torch.nn.Linear)}
    )
    shapes.append((engine.spec.vocab_size, engine.spec.hidden_size))  # the LM head
    out: dict[str, object] = {"shapes": {}}
    for out_f, in_f in shapes:
        copies = max(1, (256 << 20) // (out_f * in_f * 2))
        weights = [torch.randn(out_f, in_f).to(dtype) for _ in range(copies)]
        packs = [pack_weight(w) for w in weights]
        for m in rows:
            x = torch.randn(m, in_f).to(dtype)
            flops = 2.0 * m * in_f * out_f
            row: dict[str, float] = {}
            for name, call in (
                ("invariant", lambda w, p, x=x: linear(x, w, invariant=True)),
                ("onednn", lambda w, p, x=x: linear(x, w, packed=p)),
            ):
                row[f"{name}_hot"] = rate_gflops(partial(call, weights[0], packs[0]), flops)
                cycle = partial(_cycle, call, weights, packs)
                row[f"{name}_cold"] = rate_gflops(cycle, flops * copies)
            out["shapes"][f"{m}x{in_f}x{out_f}"] = row
    big = torch.randn(2048, 2048).to(dtype)
    out["square_2048_gflops"] = rate_gflops(lambda: big @ big, 2.0 * 2048**3)
    bw = measure_bandwidth(dtype)
    out["bandwidth_gb_s"] = {"copy": bw.copy_gb_s, "read": bw.read_gb_s, "matvec": bw.matvec_gb_s}
    return out


def _cycle(call, weights: list[torch.Tensor], packs: list) -> None:  # noqa: ANN001
    for w, p in zip(weights, packs, strict=True):
        call(w, p)


def prompts_pending(llm: LLM) -> bool:
    """Whether a request still waits or has prompt tokens left to compute."""
    scheduler = llm.engine.scheduler
    return bool(scheduler.waiting) or any(
        r.num_computed_tokens < len(r.prompt_token_ids) for r in scheduler.running
    )


def profiled(llm: LLM, steps: int | None) -> dict[str, object]:
    """Run ``steps`` engine steps (``None``: until every prompt is computed) under the
    profiler: wall time, op groups, top ops."""
    engine = llm.engine
    done = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        while (done < steps) if steps is not None else prompts_pending(llm):
            engine.step()
            done += 1
        wall = time.perf_counter() - start
    groups: dict[str, float] = defaultdict(float)
    ops = []
    for e in prof.key_averages():
        self_s = e.self_cpu_time_total / 1e6
        groups[group_of(e.key)] += self_s
        ops.append((self_s, e.key, e.count))
    seen = sum(groups.values())
    groups["host (not in an op)"] = max(0.0, wall - seen)
    ops.sort(reverse=True)
    return {
        "wall_s": wall,
        "steps": done,
        "groups_s": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_ops": [{"op": k, "self_s": s, "calls": c} for s, k, c in ops[:15]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--policy", default="fp16")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    llm = LLM(
        args.model,
        dtype=args.dtype,
        kv_policy=args.policy,
        kv_cache_memory="1GiB",
        max_model_len=args.input_len + args.decode_steps + 8,
        enable_prefix_caching=False,
    )
    engine = llm.engine
    rng = random.Random(0)
    vocab = engine.spec.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.decode_steps + 2, ignore_eos=True)
    llm.generate([[rng.randrange(1, vocab) for _ in range(64)]] * 2, params, use_tqdm=False)
    for _ in range(args.requests):
        engine.add_request([rng.randrange(1, vocab) for _ in range(args.input_len)], params)
    budget = engine.config.max_num_batched_tokens
    # Until every prompt is computed: the batch-invariant mode's fixed cut points may take
    # more steps than tokens / budget, and a decode phase that includes a prefill chunk's
    # linear layers says nothing about decoding.
    prefill = profiled(llm, None)
    decode = profiled(llm, args.decode_steps)
    while engine.has_unfinished():
        engine.step()

    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    linear_params = sum(
        m.weight.numel() for m in engine.model.modules() if isinstance(m, torch.nn.Linear)
    )
    prompt_tokens = args.requests * args.input_len
    # The LM head runs on the sampled rows only (one per request at the end of its prompt).
    lm_head = engine.spec.vocab_size * engine.spec.hidden_size
    prefill_flops = 2.0 * (linear_params - lm_head) * prompt_tokens + 2.0 * lm_head * args.requests
    rows = [min(budget, prompt_tokens), args.requests]
    result = {
        "model": args.model,
        "policy": args.policy,
        "dtype": str(engine.dtype),
        "batch_invariant": engine.batch_invariant,
        "threads": torch.get_num_threads(),
        "workload": {"requests": args.requests, "input_len": args.input_len},
        "prefill": prefill,
        "decode": decode,
        "prefill_tokens_per_s": prompt_tokens / prefill["wall_s"],
        "prefill_linear_gflops": prefill_flops / prefill["groups_s"].get("linear", 1e-9) / 1e9,
        "decode_weight_gb_s": weights * args.decode_steps / decode["wall_s"] / 1e9,
        "machine": machine(llm, rows),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
