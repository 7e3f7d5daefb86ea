"""``tierkv bench``: the benchmarks from the command line, their flags and handlers.

The benchmark modules themselves are imported inside the handlers: they pull in transformers,
which other subcommands should not pay for.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tierkv.bench import DATASETS
from tierkv.cli_args import DEMO_MODEL, add_backend_arg
from tierkv.config import DTYPES, EngineConfig
from tierkv.model.source import MODEL_HELP

if TYPE_CHECKING:  # imported where used: it pulls in transformers
    from tierkv.bench.throughput import Workload


def add_dataset_arg(parser: argparse.ArgumentParser) -> None:
    """``--dataset-name``: where a benchmark's prompts come from (``Workload``)."""
    parser.add_argument(
        "--dataset-name",
        choices=DATASETS,
        default="random",
        help=(
            "random: uniformly random token ids; stdlib: windows of the demo corpus's held-out "
            "Python source (real text, whose attention tiered KV policies can compress) "
            "(default: random)"
        ),
    )


def add_prefix_args(parser: argparse.ArgumentParser) -> None:
    """``--random-prefix-len``: a shared prefix before every prompt (``Workload``)."""
    parser.add_argument(
        "--random-prefix-len",
        type=int,
        default=0,
        help="tokens of one shared prefix (drawn like the prompts) put before every prompt, "
        "as vLLM's flag of that name: a shared system prompt (default: 0)",
    )


def add_comparison_args(parser: argparse.ArgumentParser, default_policy: str = "fp16") -> None:
    """``--model``, ``--dtype`` and a repeatable ``--kv-policy`` (``default_policy`` when none
    is given), for policy comparisons."""
    parser.add_argument("--model", default=str(DEMO_MODEL), help=MODEL_HELP)
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="compute dtype")
    parser.add_argument(
        "--kv-policy",
        action="append",
        default=None,
        help=f"KV policy to run (repeatable; default: {default_policy})",
    )
    add_backend_arg(parser)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``bench throughput``, ``bench decode`` and ``bench serve`` to the ``tierkv``
    subcommands."""
    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks of the engine.")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="{throughput,decode,serve}")
    p = kinds.add_parser(
        "throughput",
        help="offline output tokens/s on a synthetic batch workload",
        description=(
            "Generate --num-prompts prompts of --input-len tokens (--dataset-name), "
            "--output-len tokens each (EOS ignored, greedy), through the engine under each "
            "--kv-policy and, with --compare-hf, through transformers' generate on the same "
            "model and prompts, with its dynamic cache (hf-dynamic) and its QuantizedCache at 4 "
            "and 2 bits (hf-quanto-4, hf-quanto-2; needs optimum-quanto). Each row runs in its "
            "own process and reports output tokens/s, the most requests running at once, "
            "preemptions, peak RSS and, for the engine, the seconds spent in steps that compute "
            "prompt tokens and in decode-only steps, with those steps' mean batch."
        ),
    )
    # The engine's own default policy, so a bare run measures what `tierkv serve` serves.
    add_comparison_args(p, default_policy=EngineConfig.kv_policy)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    add_dataset_arg(p)
    add_prefix_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kv-cache-memory", default="1GiB", help="KV pool size for every policy (default: 1GiB)"
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the engine's prefix caching (default: on, as the engine's)",
    )
    p.add_argument(
        "--compare-prefix-caching",
        action="store_true",
        help="run each policy again with prefix caching the other way (rows marked no-pc "
        "without it)",
    )
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument(
        "--compare-hf",
        action="store_true",
        help="add transformers' generate (dynamic and quantized caches) on the same prompts",
    )
    p.add_argument(
        "--hf-batch-size",
        type=int,
        default=None,
        help="HF batch size (default: all prompts at once)",
    )
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.set_defaults(func=_run_throughput)

    p = kinds.add_parser(
        "decode",
        help="single-request decode speed and achieved memory bandwidth vs context length",
        description=(
            "Time single-request decode steps after prompts of each --contexts length, and "
            "report achieved bandwidth = (weight bytes + KV bytes read per step) / step time "
            "next to this machine's measured copy and read bandwidth and the bandwidth of a "
            "large matrix-vector product in the compute dtype by the engine's own linear layer "
            "(what a batch-1 step's linear layers can reach)."
        ),
    )
    add_comparison_args(p)
    p.add_argument("--contexts", default="512,1024,2048", help="comma-separated context lengths")
    p.add_argument(
        "--steps",
        type=int,
        default=32,
        help="decode steps timed per context (after steps // 4 untimed ones)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds over the policies, alternating; each row is its median round",
    )
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.set_defaults(func=_run_decode)

    p = kinds.add_parser(
        "serve",
        help="serving load against a running tierkv serve (TTFT, TPOT, ITL, E2E percentiles)",
        description=(
            "Stream --num-prompts synthetic completions (random token ids, EOS ignored) to a "
            "running server at --base-url with Poisson arrivals at --request-rate and at most "
            "--max-concurrency in flight; report latency percentiles and throughput."
        ),
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server to load")
    p.add_argument(
        "--model",
        default=str(DEMO_MODEL),
        help=f"the served model ({MODEL_HELP}), for its tokenizer",
    )
    p.add_argument(
        "--served-model-name", default=None, help="model name to send (default: the server's first)"
    )
    p.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    add_dataset_arg(p)
    add_prefix_args(p)
    p.add_argument(
        "--multi-turn",
        type=int,
        default=1,
        help="turns per conversation: each of --num-prompts conversations sends this many "
        "requests in turn, each resending the history (earlier user windows of --input-len "
        "tokens and the answers as generated, --output-len tokens) plus a new user window; "
        "TTFT of the first and last turns is reported apart (default: 1)",
    )
    p.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s (default: inf)"
    )
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report to this JSON file")
    p.set_defaults(func=_run_serve_bench)


def _run_decode(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tierkv.bench.decode import format_table, measure_bandwidth, run_rounds
    from tierkv.engine.engine import resolve_dtype

    bandwidth = measure_bandwidth(resolve_dtype(args.dtype))
    contexts = [int(c) for c in args.contexts.split(",")]
    results = run_rounds(
        args.model,
        args.kv_policy or ["fp16"],
        contexts,
        args.steps,
        args.dtype,
        bandwidth,
        args.attention_backend,
        args.repeats,
    )
    print(format_table(results, bandwidth))
    if args.json:
        payload = {"bandwidth": asdict(bandwidth), "results": [asdict(r) for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _workload(args: argparse.Namespace, **engine: str | bool) -> Workload:
    """The benchmark workload the ``bench`` flags describe (``engine``: the engine's dtype and
    attention backend, for the benchmarks that run it)."""
    from tierkv.bench.throughput import Workload

    return Workload(
        args.model,
        args.num_prompts,
        args.input_len,
        args.output_len,
        args.seed,
        dataset=args.dataset_name,
        prefix_len=args.random_prefix_len,
        **engine,
    )


def _run_serve_bench(args: argparse.Namespace) -> int:
    import asyncio
    from dataclasses import asdict

    from tierkv.bench.serve import (
        ServerUnreachable,
        format_report,
        run_load,
        served_model,
        summarize,
    )

    try:
        name = served_model(args.base_url, args.api_key, args.served_model_name)
    except ServerUnreachable as exc:
        print(f"tierkv: error: {exc}", file=sys.stderr)
        return 1
    work = _workload(args)
    turns = 2 * args.multi_turn - 1
    windows = work.windows([work.prefix_len] + [work.input_len] * work.num_prompts * turns)
    conversations = [
        [windows[0] + windows[1 + c * turns]] + windows[2 + c * turns : 1 + (c + 1) * turns]
        for c in range(work.num_prompts)
    ]
    records, duration = asyncio.run(
        run_load(
            args.base_url,
            name,
            conversations,
            args.output_len,
            args.request_rate,
            args.max_concurrency,
            args.seed,
            args.api_key,
            args.timeout,
        )
    )
    report = summarize(records, duration)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.failed == 0 else 1


def _run_throughput(args: argparse.Namespace) -> int:
    from tierkv.bench.throughput import format_table, hf_caches, run_throughput, write_json

    work = _workload(
        args,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        prefix_caching=args.enable_prefix_caching,
    )
    caches, skipped = hf_caches(args.compare_hf)
    if skipped:
        print(skipped, file=sys.stderr)
    results = run_throughput(
        work,
        args.kv_policy or [EngineConfig.kv_policy],
        args.kv_cache_memory,
        args.max_num_seqs,
        caches,
        args.hf_batch_size or args.num_prompts,
        args.compare_prefix_caching,
    )
    print(format_table(results))
    if args.json:
        write_json(args.json, work, results)
    return 0
