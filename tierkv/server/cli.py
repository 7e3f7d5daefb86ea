"""The ``tierkv serve`` subcommand: its parser entry and its handler.

The flags live in ``server.serve_args`` (the Ray Serve config builder reads them too); the
servers are imported inside ``serve``, so other subcommands do not pay for the web stack.
"""

from __future__ import annotations

import argparse

from tierkv.cli_args import engine_kwargs
from tierkv.server.serve_args import (
    SERVE_DESCRIPTION,
    SERVE_HELP,
    add_serve_args,
    resolve_serve_args,
)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``tierkv`` subcommands; its ``func`` default is ``serve``."""
    parser = subparsers.add_parser("serve", help=SERVE_HELP, description=SERVE_DESCRIPTION)
    add_serve_args(parser)
    parser.set_defaults(func=serve)
    return parser


def serve(args: argparse.Namespace) -> int:
    """Handler of ``tierkv serve``: fill in the model defaults, then serve until interrupted."""
    resolve_serve_args(args)
    if args.replicas > 1:
        # Several engines: Ray Serve runs them, each in a replica of its own.
        from tierkv.server.ray_serve import run_ray_server

        run_ray_server(args)
        return 0
    # Imported here so that other subcommands do not pay for the web stack.
    from tierkv.server.app import run_server

    run_server(args, engine_kwargs(args))
    return 0
