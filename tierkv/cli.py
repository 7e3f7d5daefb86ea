"""The ``tierkv`` command: generate, serve and bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tierkv import __version__
from tierkv.bench import DATASETS
from tierkv.config import DTYPES, EngineConfig
from tierkv.eval.cli import add_eval_parser
from tierkv.kv import BACKENDS
from tierkv.model.source import MODEL_HELP
from tierkv.server.cli import add_serve_parser

if TYPE_CHECKING:  # imported where used: it pulls in transformers
    from tierkv.bench.throughput import Workload

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
            "= k8v8/k4v2-g64:ah=1,w=128,r=32); fp16 "
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


def add_backend_arg(parser: argparse.ArgumentParser) -> None:
    """``--attention-backend``: the attention implementation over the KV pages."""
    parser.add_argument(
        "--attention-backend",
        default=EngineConfig.attention_backend,
        choices=list(BACKENDS),
        help="fast (default: C++ kernels that read the KV pages in place and dequantize in "
        "registers, built on first use; fused torch ops where no compiler is) or reference "
        "(gather, dequantize, attend; what the tests trust)",
    )


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
    )


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="complete a prompt, streaming tokens to the terminal",
        description="Complete PROMPT with a local model (a Hugging Face folder, a .gguf file or "
        "smollm2) and stream the text as it is generated.",
    )
    p.add_argument("prompt", help="the text to complete (with --chat: the user message)")
    add_engine_args(p)
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    p.add_argument(
        "--max-tokens", type=int, default=128, help="tokens to generate at most (default: 128)"
    )
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    p.add_argument(
        "--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)"
    )
    p.add_argument(
        "--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = all (default: 0)"
    )
    p.add_argument(
        "--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument(
        "--ignore-eos", action="store_true", help="keep going past the end-of-sequence token"
    )
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from tierkv.engine.engine import Engine
    from tierkv.sampling import SamplingParams

    engine = Engine(EngineConfig.from_kwargs(args.model, **engine_kwargs(args)))
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=args.stop,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        ignore_eos=args.ignore_eos,
    )
    if args.chat:
        prompt: str | list[int] = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}]
        )
    else:
        prompt = args.prompt
        sys.stdout.write(prompt)
    engine.add_request(prompt, params)
    printed = 0
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.text[printed:])
            sys.stdout.flush()
            printed = len(out.text)
    sys.stdout.write("\n")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kv-cache-memory", default="1GiB", help="KV pool size for every policy (default: 1GiB)"
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


def _workload(args: argparse.Namespace, **engine: str) -> Workload:
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
    prompts = _workload(args).prompts()
    records, duration = asyncio.run(
        run_load(
            args.base_url,
            name,
            prompts,
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

    work = _workload(args, dtype=args.dtype, attention_backend=args.attention_backend)
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
    )
    print(format_table(results))
    if args.json:
        write_json(args.json, work, results)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full ``tierkv`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="tierkv",
        description="An LLM inference engine with a differentiated, paged KV cache.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{generate,serve,bench,eval}"
    )
    _add_generate(sub)
    add_serve_parser(sub)
    _add_bench(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tierkv`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"tierkv: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
