"""Flags shared by the ``tierkv`` subcommands that build an engine, and what they parse to.

A leaf below every CLI module: ``tierkv.cli``, ``tierkv.server.cli``, ``tierkv.bench.cli`` and
``tierkv.eval.cli`` import from here, and this module imports none of them (nor the server), so
the command's modules form no import cycle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tierkv.config import DTYPES, EngineConfig
from tierkv.kv import BACKENDS
from tierkv.model.source import MODEL_HELP

# The bundled model every subcommand falls back to (the repository's assets/, beside tierkv/).
DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo-model"


def add_engine_args(parser: argparse.ArgumentParser, model_flag: bool = True) -> None:
    """Flags that configure an engine, shared by every subcommand that builds one."""
    if model_flag:
        parser.add_argument(
            "--model",
            default=str(DEMO_MODEL),
            help=f"{MODEL_HELP} (default: the bundled demo model)",
        )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="compute dtype (auto = bfloat16, the faster one measured on CPU)",
    )
    parser.add_argument(
        "--kv-policy",
        default=EngineConfig.kv_policy,
        help=(
            "KV cache policy: default (the tuned differentiated policy, the default; "
            "= k8v8/k4v2-g64:ah=1,al=0.8,w=128,pk=15,r=32); fp16 "
            "(uncompressed); uniform k8v8, k8v4, k8v2, k4v4, k4v2, k4v1, k2v2 (optional group "
            "size suffix, e.g. k4v2-g64, and residual window of uncompressed newest tokens, "
            "e.g. k8v8:r=32, the default; r=0 for none); differentiated HIGH/LOW[-gN] such as "
            "k8v4/k4v2[:ah=2.0,al=0.2,w=64,sw=64,pk=7,di=8]"
        ),
    )
    parser.add_argument(
        "--kv-budget",
        type=float,
        default=None,
        help="budget mode: KV bytes per request as a fraction of fp16's, e.g. 0.2 (uses the "
        "tiers of a differentiated --kv-policy, else default's)",
    )
    add_backend_arg(parser)
    parser.add_argument(
        "--kv-cache-memory",
        default="1GiB",
        help="bytes for the KV page pool, e.g. 512MiB or 4GiB (default: 1GiB)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output (default: the model's context)",
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=64, help="most requests running at once (default: 64)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one engine step (default: 2048)",
    )
    parser.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a seeded sampled request gives the same output alone or in any batch (like "
        "vLLM's VLLM_BATCH_INVARIANT=1): every linear layer through one native kernel whose "
        "per-token sums ignore the batch. Default: TIERKV_BATCH_INVARIANT (1/0) if set, else "
        "on in bfloat16 (a few percent of throughput) and off in float32 (about 25-30%%) and "
        "float16 (much slower); see README",
    )
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=EngineConfig.enable_prefix_caching,
        help="reuse the KV pages of prompt prefixes computed before (vLLM's automatic prefix "
        "caching; on by default, --no-enable-prefix-caching turns it off). Uncompressed "
        "policies share at any page; quantized and tiered ones only at the fixed prompt cuts "
        "of batch-invariant mode (docs/prefix_caching.md)",
    )


def add_backend_arg(parser: argparse.ArgumentParser) -> None:
    """``--attention-backend``: the attention implementation over the KV pages."""
    parser.add_argument(
        "--attention-backend",
        default=EngineConfig.attention_backend,
        choices=list(BACKENDS),
        help="fast (default: for each KV format the first of cpu, torch, reference that "
        "serves it), cpu (C++ kernels that read the KV pages in place and dequantize in "
        "registers, built on first use), torch (fused torch ops), triton (a Triton kernel: "
        "CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or reference (gather, "
        "dequantize, attend; what the tests trust). Formats a backend lacks fall back to "
        "reference",
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """Engine keyword arguments from parsed ``add_engine_args`` flags."""
    return dict(
        dtype=args.dtype,
        kv_policy=args.kv_policy,
        kv_budget=args.kv_budget,
        attention_backend=args.attention_backend,
        kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        batch_invariant=args.batch_invariant,
        enable_prefix_caching=args.enable_prefix_caching,
    )
