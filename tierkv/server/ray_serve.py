"""Scale-out on Ray Serve: tierkv's OpenAI server as a Ray Serve deployment, one engine per
replica.

``tierkv serve --replicas N`` (N > 1) runs ``run_ray_server``; ``serve run`` takes the same
application from a config file through ``app_builder`` (see the README's "Scale-out with Ray
Serve"). Each replica is a Ray actor that builds its own ``Engine`` and the same FastAPI app
``tierkv serve`` runs (``create_app``), wrapped by ``serve.ingress``; Ray Serve's HTTP proxy
listens on the host and port given and routes every request to one replica.

- The engine is built when the replica starts; the app's lifespan starts the engine loop thread
  (Ray runs it at replica start) and stops it when Ray shuts the replica down.
- ``check_health`` fails once the replica's engine loop has died, so Ray replaces the replica
  instead of routing requests to a dead engine.
- Every response carries ``x-tierkv-replica``: the Ray Serve replica id that served it, so a
  client (or a test) can tell the replicas apart, and read one replica's ``/metrics``.

Ray is optional (``pip install "tierkv[serve]"``); this module imports it only when used.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierkv.server.guard import ServerLimits

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("tierkv.server")

APP_NAME = "tierkv"
DEPLOYMENT_NAME = "TierkvServer"
REPLICA_HEADER = "x-tierkv-replica"
# The engine's liveness is a property read, so checking often costs nothing and a dead engine's
# replica is replaced within seconds instead of Ray's default 10 s period.
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 10.0
# Beyond --shutdown-timeout, how long deleting the application may take at exit.
DELETE_GRACE_S = 20.0
INSTALL_HINT = 'Ray Serve is not installed: pip install "tierkv[serve]"'


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica serves and how: pickled by Ray and shipped to each replica."""

    model: str
    served_model_name: str
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig keyword arguments
    api_key: str | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ReplicaSpec:
        """The spec of ``tierkv serve``'s parsed (and model-resolved) arguments."""
        from tierkv.cli_args import engine_kwargs

        # A local path made absolute: a replica's working directory need not be this one.
        model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
        return cls(
            model=model,
            served_model_name=args.served_model_name,
            engine=engine_kwargs(args),
            api_key=args.api_key,
            limits=ServerLimits.from_args(args),
        )


class ReplicaHeader:
    """ASGI middleware that names the replica in a header of every HTTP response."""

    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def _app_factory(spec: ReplicaSpec) -> Callable[[], FastAPI]:
    """A builder that ``serve.ingress`` calls on each replica as it starts (not on the driver):
    the model loads in the replica's process, never in the process that deploys it."""

    def build() -> FastAPI:
        from ray import serve

        from tierkv import extension
        from tierkv.config import EngineConfig
        from tierkv.engine.engine import Engine
        from tierkv.server.app import create_app

        replica_id = serve.get_replica_context().replica_id.unique_id
        # Load (or build, once per machine) the C++ kernels now, so the replica turns ready
        # with them, rather than holding its first request for the build. Never raises: without
        # them the engine runs its torch paths.
        extension.available()
        engine = Engine(EngineConfig.from_kwargs(spec.model, **spec.engine))
        app = create_app(engine, spec.served_model_name, spec.api_key, spec.limits)
        app.state.replica_id = replica_id
        app.add_middleware(ReplicaHeader, replica_id=replica_id)
        return app

    return build


class TierkvReplica:
    """One replica: the FastAPI app of one engine (set by the ingress wrapper as ``self.app``).

    The ingress wrapper runs the app's lifespan, which starts the engine loop at replica start
    and stops it at replica shutdown, as it does under uvicorn.
    """

    app: FastAPI  # provided by Ray's ASGI wrapper once the builder has run

    async def check_health(self) -> None:
        """Ray's health probe: raising marks the replica unhealthy and Ray replaces it."""
        engine = self.app.state.engine
        if not engine.is_running:
            raise RuntimeError(f"replica {self.app.state.replica_id}: the engine loop has died")


def build_application(
    spec: ReplicaSpec, replicas: int, num_cpus: float = 1.0, max_ongoing_requests: int = 64
) -> Application:
    """The Ray Serve application: ``replicas`` copies of the server, ``num_cpus`` each.

    ``max_ongoing_requests`` is how many requests Ray hands one replica at once; it defaults to
    the engine's ``max_num_seqs`` so the engine can batch them (Ray's own default, 5, would cap
    each engine's batch at 5).
    """
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    ingress = serve.ingress(_app_factory(spec))(TierkvReplica)
    deployment = serve.deployment(
        ingress,
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        # A replica being stopped gives its requests --shutdown-timeout to finish, then Ray
        # stops it (the lifespan then stops its engine).
        graceful_shutdown_timeout_s=spec.limits.shutdown_timeout,
    )
    return deployment.bind()


def _parse(argv: list[str]) -> argparse.Namespace:
    from tierkv.server.serve_args import build_serve_parser, resolve_serve_args

    try:
        parsed = build_serve_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed why; a config error is not an exit
        raise ValueError(f"invalid tierkv serve options in the Ray Serve config: {argv}") from exc
    return resolve_serve_args(parsed)


def app_builder(args: Mapping[str, Any]) -> Application:
    """The application of a ``serve run`` config: ``args`` are ``tierkv serve``'s options by
    their long names (``model``, ``replicas``, ``kv_cache_memory``, ``replica_cpus``...)."""
    argv = [] if args.get("model") is None else [str(args["model"])]
    for key, value in args.items():
        if key != "model":
            argv += [f"--{key.replace('_', '-')}", str(value)]
    parsed = _parse(argv)
    return build_application(
        ReplicaSpec.from_args(parsed), parsed.replicas, parsed.replica_cpus, parsed.max_num_seqs
    )


def run_ray_server(args: argparse.Namespace) -> None:
    """``tierkv serve --replicas N``: start (or join) Ray, deploy, serve until SIGINT/SIGTERM.

    The first signal deletes the application (each replica's lifespan stops its engine) and
    leaves Ray; a local cluster started here ends with it. A second signal exits at once.
    """
    from tierkv.config import EngineConfig
    from tierkv.server.launcher import bind_socket, configure_logging

    configure_logging()
    spec = ReplicaSpec.from_args(args)
    # Refused arguments and a busy port fail here, in a second, not after Ray has started.
    EngineConfig.from_kwargs(spec.model, **spec.engine)
    if args.ray_address in (None, "local"):  # a joined cluster's Serve may hold the port
        bind_socket(args.host, args.port).close()
    try:
        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions
    except ImportError as exc:
        raise ValueError(INSTALL_HINT) from exc

    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    # SIGTERM as SIGINT, so both unwind through the cleanup below (set after ray.init, which
    # installs a SIGTERM handler of its own; SIGINT too, as uvicorn does, even where the shell
    # started this process with SIGINT ignored).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        # Where Serve already runs on a joined cluster, its proxy keeps its own host and port.
        serve.start(
            http_options=HTTPOptions(
                host=args.host, port=args.port, keep_alive_timeout_s=int(args.timeout_keep_alive)
            )
        )
        app = build_application(spec, args.replicas, args.replica_cpus, args.max_num_seqs)
        serve.run(app, name=APP_NAME, route_prefix="/")
        host = f"[{args.host}]" if ":" in args.host else args.host
        logger.info(
            "serving %r (%s) on http://%s:%d through Ray Serve: %d replicas, one engine each "
            "(%g CPU each); each response names its replica in %s",
            spec.served_model_name,
            spec.model,
            host,
            args.port,
            args.replicas,
            args.replica_cpus,
            REPLICA_HEADER,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down: deleting the Ray Serve application; signal again to exit")
    finally:
        # Delete only our application: on a joined cluster, Serve and other applications stay
        # up; a local cluster started here ends with ray.shutdown(). Bounded: a SIGTERM sent to
        # the whole process group has also stopped Ray's own processes, and deleting through
        # them would wait forever.
        _bounded(lambda: serve.delete(APP_NAME), args.shutdown_timeout + DELETE_GRACE_S)
        ray.shutdown()


def _bounded(fn: Callable[[], object], timeout: float) -> None:
    """Run ``fn`` for ``timeout`` seconds at most (in a daemon thread), logging a failure."""

    def run() -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - shutting down: report, go on
            logger.warning("deleting the Ray Serve application failed: %r", exc)

    thread = threading.Thread(target=run, name="tierkv-ray-delete", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        logger.warning("the Ray Serve application was not deleted in %g s: leaving Ray", timeout)
