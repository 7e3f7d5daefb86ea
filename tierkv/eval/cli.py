"""``tierkv eval fidelity``: the fidelity harness from the command line."""

from __future__ import annotations

import argparse
import sys

from tierkv.eval.fidelity import FidelityConfig, format_table, run_fidelity, write_json

_DEFAULTS = FidelityConfig(model="")  # the documented defaults of every size flag


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval fidelity`` to the ``tierkv`` subcommands."""
    from tierkv.cli import DEMO_MODEL

    ev = subparsers.add_parser("eval", help="evaluations", description="Evaluations of the engine.")
    kinds = ev.add_subparsers(dest="eval", required=True, metavar="{fidelity}")
    p = kinds.add_parser(
        "fidelity",
        help="compressed vs fp16 KV: ppl ratio, KL, greedy agreement, retrieval",
        description=(
            "Compare each --kv-policy (default: the engine's default policy) and each --peer "
            "with the uncompressed cache on held-out text of the demo corpus: perplexity ratio "
            "over teacher-forced decode steps, KL of next-token distributions, greedy "
            "agreement, retrieval accuracy per context length, and KV bytes per token."
        ),
    )
    p.add_argument("--model", default=str(DEMO_MODEL), help="local Hugging Face model folder")
    p.add_argument(
        "--kv-policy",
        action="append",
        default=None,
        help="tierkv policy to evaluate (repeatable; default: the engine's default policy)",
    )
    p.add_argument(
        "--peer",
        action="append",
        default=None,
        help="peer method (repeatable): hf:full, snapkv@0.5, expected@0.5, streaming@0.5, "
        "knorm@0.5, adakv-snapkv@0.5, quanto-int4, quanto-int2, kivi-2, kivi-4",
    )
    p.add_argument(
        "--all-peers", action="store_true", help="every peer of the default sweep that is installed"
    )
    p.add_argument(
        "--contexts",
        default=",".join(str(c) for c in _DEFAULTS.contexts),
        help="retrieval context lengths, comma-separated (default: %(default)s)",
    )
    p.add_argument("--split", default="dev", choices=["dev", "test"], help="held-out split")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    sizes = p.add_argument_group("sizes (defaults fit the 30-minute default sweep)")
    for name, help_ in (
        ("ppl_windows", "teacher-forced windows"),
        ("ppl_window_len", "tokens per window"),
        ("ppl_prefix", "prompt tokens per window (prefilled, not scored)"),
        ("greedy_prompts", "prompts for greedy agreement"),
        ("greedy_prompt_len", "tokens per greedy prompt"),
        ("greedy_tokens", "greedy tokens generated per prompt"),
        ("retrieval_examples", "retrieval prompts per context length"),
    ):
        flag = "--" + name.replace("_", "-")
        default = getattr(_DEFAULTS, name)
        sizes.add_argument(flag, type=int, default=default, help=f"{help_} (default: {default})")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--kv-cache-memory", default=_DEFAULTS.kv_cache_memory)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_fidelity_command)


def default_policies() -> list[str]:
    """The engine's default policy: ``default`` when this build has one, else the config's."""
    from tierkv.config import EngineConfig
    from tierkv.kv.policy import KVPolicy

    try:
        KVPolicy.parse("default")
    except ValueError:
        fallback = EngineConfig(model="").kv_policy
        print(
            f"tierkv: note: this build has no 'default' KV policy; evaluating the engine "
            f"config's default ({fallback})",
            file=sys.stderr,
        )
        return [fallback]
    return ["default"]


def run_fidelity_command(args: argparse.Namespace) -> int:
    """Run the harness as the flags say, print the table, write the JSON."""
    from tierkv.eval.peers import default_peers, parse_peer

    config = FidelityConfig(
        model=args.model,
        split=args.split,
        contexts=tuple(int(c) for c in args.contexts.split(",") if c.strip()),
        ppl_windows=args.ppl_windows,
        ppl_window_len=args.ppl_window_len,
        ppl_prefix=args.ppl_prefix,
        greedy_prompts=args.greedy_prompts,
        greedy_prompt_len=args.greedy_prompt_len,
        greedy_tokens=args.greedy_tokens,
        retrieval_examples=args.retrieval_examples,
        dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory,
        seed=args.seed,
    )
    skipped: list[str] = []
    peers = []
    if args.all_peers:
        peers, skipped = default_peers()
    peers += [parse_peer(s) for s in args.peer or []]
    for message in skipped:
        print(f"tierkv: note: {message}", file=sys.stderr)
    report = run_fidelity(
        config,
        args.kv_policy or default_policies(),
        peers,
        skipped,
        progress=not args.no_progress,
    )
    print(format_table(report))
    if any(not r.memory_freed for r in report.results):
        print("* kvpress masks these heads' pruned keys: bytes are ideal, memory is not freed")
    if args.json:
        write_json(args.json, report)
    return 0
