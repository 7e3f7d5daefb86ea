"""The ``tierkv`` command: generate, serve, bench and eval.

The top of the command's import graph: this module wires in the subcommand modules
(``server.cli``, ``bench.cli``, ``eval.cli``), and none of them imports it back; the flags they
share live in ``tierkv.cli_args``.
"""

from __future__ import annotations

import argparse
import sys

from tierkv import __version__
from tierkv.bench.cli import add_bench_parser
from tierkv.cli_args import add_engine_args, engine_kwargs
from tierkv.config import EngineConfig
from tierkv.eval.cli import add_eval_parser
from tierkv.server.cli import add_serve_parser


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
    add_bench_parser(sub)
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
