"""``tierkv serve``'s flags, and the model defaults filled in after parsing.

Its own module so that both the subcommand (``server.cli``) and the Ray Serve config builder
(``server.ray_serve``, which parses a config's options as these flags) read them without
importing each other.
"""

from __future__ import annotations

import argparse
import os

from tierkv.cli_args import DEMO_MODEL, add_engine_args
from tierkv.config import parse_size
from tierkv.model.source import MODEL_HELP
from tierkv.server.guard import ServerLimits

SERVE_HELP = "serve a model over an OpenAI-compatible HTTP API"
SERVE_DESCRIPTION = (
    "Serve a model over the OpenAI API (/v1/completions, "
    "/v1/chat/completions, /v1/models), with vLLM's /tokenize, /detokenize and /version, "
    "/health and Prometheus /metrics. SIGTERM or Ctrl-C stops accepting connections, "
    "gives requests in flight --shutdown-timeout seconds, then aborts them; a second "
    "signal exits at once."
)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Add every ``tierkv serve`` flag (and the positional MODEL) to ``parser``."""
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help=f"{MODEL_HELP} (default: the bundled demo model)",
    )
    parser.add_argument(
        "--model",
        dest="model_option",
        default=None,
        metavar="MODEL",
        help="the model, as the positional MODEL (vLLM's spelling; give one or the other)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default %(default)s)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TIERKV_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health and /metrics "
        "(default: $TIERKV_API_KEY; /metrics stays open for Prometheus, as in vLLM)",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help=f"the model name clients send (default: MODEL as given, or '{DEMO_MODEL.name}')",
    )
    limits = ServerLimits()
    parser.add_argument(
        "--max-request-body-bytes",
        type=parse_size,
        default=limits.max_body_bytes,
        metavar="SIZE",
        help="largest request body, e.g. 16MiB; larger gets a 413 (default: 8MiB)",
    )
    parser.add_argument(
        "--max-prompts-per-request",
        type=int,
        default=limits.max_prompts,
        help="most prompts in one /v1/completions request (default: %(default)s)",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=limits.read_timeout,
        metavar="SECONDS",
        help="seconds a client has to send a request's headers (else the connection is "
        "closed), then its body (else a 408) (default: %(default)g)",
    )
    parser.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=limits.timeout_keep_alive,
        metavar="SECONDS",
        help="close an idle keep-alive connection after this long (default: %(default)g)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=limits.shutdown_timeout,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, seconds requests in flight have to finish before they are "
        "aborted; 0 aborts them at once, as vLLM does by default (default: %(default)g)",
    )
    scale = parser.add_argument_group(
        "scale-out (Ray Serve; pip install 'tierkv[serve]')",
        "With --replicas above 1, Ray Serve's HTTP proxy listens on --host:--port and routes each "
        "request to one of N replicas, each with an engine of its own; each response names its "
        "replica in the x-tierkv-replica header. Ray's proxy, not tierkv's, holds the "
        "connections: --read-timeout then bounds the body read only, not the headers.",
    )
    scale.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="engines to serve with, each a Ray Serve replica; 1 serves in this process "
        "without Ray (default: %(default)s)",
    )
    scale.add_argument(
        "--replica-cpus",
        type=float,
        default=1.0,
        metavar="CPUS",
        help="CPUs Ray reserves for each replica, fractions allowed (default: %(default)g)",
    )
    scale.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="Ray cluster to join, e.g. auto or ray://host:10001; 'local' always starts a "
        "new one (default: Ray's own: $RAY_ADDRESS, else the cluster last started on this "
        "machine, else a new local one)",
    )
    add_engine_args(parser, model_flag=False)


def build_serve_parser() -> argparse.ArgumentParser:
    """A parser of ``tierkv serve``'s options alone (what follows ``tierkv serve``)."""
    parser = argparse.ArgumentParser(prog="tierkv serve", description=SERVE_DESCRIPTION)
    add_serve_args(parser)
    return parser


def resolve_serve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in ``tierkv serve``'s model defaults (shared with the Ray Serve config builder)."""
    if args.model_option is not None:
        if args.model is not None and args.model != args.model_option:
            raise ValueError(
                f"two models given: {args.model!r} and --model {args.model_option!r}; give one"
            )
        args.model = args.model_option
    if args.served_model_name is None:
        args.served_model_name = args.model if args.model is not None else DEMO_MODEL.name
    if args.model is None:
        args.model = str(DEMO_MODEL)
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    return args
