"""The ``tierkv serve`` subcommand: its arguments and its handler.

``tierkv.cli`` imports this module to wire the command in, so names from ``tierkv.cli`` are
imported inside the functions, once both modules are fully loaded.
"""

from __future__ import annotations

import argparse


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``tierkv`` subcommands; its ``func`` default is ``serve``."""
    from tierkv.cli import DEMO_MODEL, add_engine_args
    from tierkv.model.source import MODEL_HELP

    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over the OpenAI API (/v1/completions, "
        "/v1/chat/completions, /v1/models), with /health and Prometheus /metrics.",
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help=f"{MODEL_HELP} (default: the bundled demo model)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default %(default)s)")
    parser.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on the /v1 routes"
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help=f"the model name clients send (default: MODEL as given, or '{DEMO_MODEL.name}')",
    )
    add_engine_args(parser, model_flag=False)
    parser.set_defaults(func=serve)
    return parser


def serve(args: argparse.Namespace) -> int:
    """Handler of ``tierkv serve``: fill in the model defaults, then serve until interrupted."""
    from tierkv.cli import DEMO_MODEL

    # Imported here so that other subcommands do not pay for the web stack.
    from tierkv.server.app import run_server

    if args.served_model_name is None:
        args.served_model_name = args.model if args.model is not None else DEMO_MODEL.name
    if args.model is None:
        args.model = str(DEMO_MODEL)
    run_server(args)
    return 0
