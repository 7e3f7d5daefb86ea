"""``tierkv eval fidelity``: the fidelity harness from the command line."""

from __future__ import annotations

import argparse
import sys

from tierkv.cli_args import DEMO_MODEL
from tierkv.eval.fidelity import FidelityConfig, run_fidelity
from tierkv.eval.report import format_categories, format_table, write_json
from tierkv.eval.suites import SUITES, choose_suite, suite_config
from tierkv.model.source import MODEL_HELP

_DEFAULTS = FidelityConfig(model="")  # the demo suite's sizes
_REAL = SUITES["real"]
SIZE_FLAGS = (
    ("ppl_windows", "teacher-forced windows"),
    ("ppl_window_len", "tokens per window"),
    ("ppl_prefix", "prompt tokens per window (prefilled, not scored)"),
    ("greedy_prompts", "prompts for greedy agreement (0 skips)"),
    ("greedy_prompt_len", "tokens per greedy prompt"),
    ("greedy_tokens", "greedy tokens generated per prompt"),
    ("retrieval_examples", "demo-format retrieval prompts per context length (0 skips)"),
    ("answer_prompts", "held-out chat prompts answered (0 skips)"),
    ("answer_tokens", "greedy tokens per answer"),
    ("needle_examples", "needle prompts per context length, evenly spaced depths (0 skips)"),
    ("needle_count", "needles per haystack (1 queried, the rest distractors)"),
    ("long_gen_prompts", "long-generation prompts (0 skips)"),
    ("long_gen_tokens", "tokens per long generation"),
)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval fidelity`` to the ``tierkv`` subcommands."""
    ev = subparsers.add_parser("eval", help="evaluations", description="Evaluations of the engine.")
    kinds = ev.add_subparsers(dest="eval", required=True, metavar="{fidelity}")
    p = kinds.add_parser(
        "fidelity",
        help="compressed vs fp16 KV: ppl ratio, KL, greedy agreement, retrieval",
        description=(
            "Compare each --kv-policy (default: the engine's default policy) and each --peer "
            "with the uncompressed cache: perplexity ratio and KL over teacher-forced decode "
            "steps after a prefix of held-out text, greedy agreement, retrieval; with the real "
            "suite, answer agreement on held-out chat prompts, needles in 1k-8k haystacks, "
            "long generation; and KV bytes per token measured from the pool."
        ),
    )
    p.add_argument(
        "--model", default=str(DEMO_MODEL), help=f"{MODEL_HELP} (default: the demo model)"
    )
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
        default=None,
        help="retrieval and needle context lengths, comma-separated (demo "
        f"{','.join(map(str, _DEFAULTS.contexts))}, real {','.join(map(str, _REAL['contexts']))})",
    )
    p.add_argument(
        "--suite",
        default="auto",
        choices=["auto", *SUITES],
        help="size preset: demo (the demo model's sweep) or real (chat models, about 30 min "
        "for three policies on 2 cores); auto picks real when the tokenizer has a chat "
        "template. Flags below override the preset.",
    )
    p.add_argument("--split", default="dev", choices=["dev", "test"], help="held-out split")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    sizes = p.add_argument_group("sizes (default: the suite's)")
    for name, help_ in SIZE_FLAGS:
        flag = "--" + name.replace("_", "-")
        both = f"demo {getattr(_DEFAULTS, name)}, real {_REAL.get(name, getattr(_DEFAULTS, name))}"
        sizes.add_argument(flag, type=int, default=None, help=f"{help_} ({both})")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype (demo auto, real float32)",
    )
    p.add_argument("--kv-cache-memory", default=None, help="KV pool size (demo 1GiB, real 2GiB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_fidelity_command)


def default_policies() -> list[str]:
    """The engine's default policy: ``default`` when this build has one, else the config's."""
    from tierkv.config import EngineConfig
    from tierkv.kv import KVPolicy

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

    suite = choose_suite(args.model) if args.suite == "auto" else args.suite
    contexts = (
        tuple(int(c) for c in args.contexts.split(",") if c.strip()) if args.contexts else None
    )
    config = suite_config(
        suite,
        args.model,
        split=args.split,
        contexts=contexts,
        dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory,
        seed=args.seed,
        **{name: getattr(args, name) for name, _ in SIZE_FLAGS},
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
    if format_categories(report):
        print(format_categories(report))
    for note in report.skipped:
        print(f"note: {note}")
    if any(not r.memory_freed for r in report.results):
        print("* kvpress masks these heads' pruned keys: bytes are ideal, memory is not freed")
    if args.json:
        write_json(args.json, report)
    return 0
