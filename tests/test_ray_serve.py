"""Scale-out on Ray Serve: 2 replicas of the server on a local Ray cluster, one killed mid-load.

Also ``tierkv serve --replicas 2`` itself, and the pieces that need no cluster. Bounded: every
client call has a timeout, every wait a deadline; the module takes about a minute on 2 cores
(two Ray starts are most of it), once the C++ kernels are built (cached per machine, and built
before any deadline starts). Skipped only where Ray is not installed or cannot start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from server_harness import free_port, offline_env, tierkv_command

from tierkv import extension
from tierkv.server.ray_serve import (
    APP_NAME,
    DEPLOYMENT_NAME,
    REPLICA_HEADER,
    ReplicaSpec,
    build_application,
)

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tierkv[serve]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed")

T = TypeVar("T")
MODEL = "tiny"
TIMEOUT = 60.0  # one client call; generous for 2 engines sharing 2 cores
START_TIMEOUT = 120.0  # Ray's start, or the deployment of both replicas
REPLACE_TIMEOUT = 90.0  # Ray noticing the killed replica and a new one becoming ready
REPLICA_PREFIX = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"
ENGINE = dict(
    dtype="float32",
    kv_cache_memory="4MiB",
    max_model_len=256,
    max_num_seqs=8,
)


def _bounded(fn: Callable[[], T], timeout: float, what: str) -> T:
    """``fn()`` in a thread, failing the test (not hanging it) after ``timeout`` seconds."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"{what} took more than {timeout:g} s")
    finally:
        pool.shutdown(wait=False)


@pytest.fixture(scope="module")
def base_url(demo_model_dir: str) -> Iterator[str]:
    """Serve's HTTP proxy on 127.0.0.1 with 2 replicas of the demo model, 0.5 CPU each."""
    # The kernels built (once per machine, cached) before the clock of this test starts: the
    # replicas then load the build instead of compiling it on 2 cores inside their deadline.
    extension.available()
    try:
        # In this thread, not a helper one: Ray's processes die with the thread that started
        # them (PR_SET_PDEATHSIG). ray.init bounds its own waits.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=80 * 2**20,
        )
    except Exception as exc:  # noqa: BLE001 - any failure to start is a reason to skip
        pytest.skip(f"Ray cannot start here: {exc!r}")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        spec = ReplicaSpec(model=demo_model_dir, served_model_name=MODEL, engine=ENGINE)
        app = build_application(spec, replicas=2, num_cpus=0.5, max_ongoing_requests=8)
        _bounded(lambda: serve.run(app, name=APP_NAME, route_prefix="/"), START_TIMEOUT, "deploy")
        yield f"http://127.0.0.1:{port}"
    finally:
        _bounded(serve.shutdown, 60, "serve.shutdown")
        ray.shutdown()


@pytest.fixture(scope="module")
def demo_model_dir() -> str:
    from tierkv.cli_args import DEMO_MODEL

    return str(DEMO_MODEL)


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key="unused",
        max_retries=0,
        timeout=TIMEOUT,
        http_client=httpx.Client(trust_env=False, timeout=TIMEOUT),
    )


def _complete(client: openai.OpenAI, i: int, max_tokens: int = 8) -> str:
    """One completion; the id of the replica that served it."""
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=f"Once upon a time {i}", max_tokens=max_tokens, temperature=0
    )
    completion = raw.parse()
    assert completion.choices[0].text is not None
    return raw.headers[REPLICA_HEADER]


def _replicas() -> dict[str, Any]:
    """Live replica actors by replica id."""
    return {
        actor["name"].removeprefix(REPLICA_PREFIX): ray.get_actor(
            actor["name"], namespace=actor["namespace"]
        )
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(REPLICA_PREFIX)
    }


def _running_replicas() -> int:
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return 0
    states = app.deployments[DEPLOYMENT_NAME].replica_states
    return states.get("RUNNING", 0)


def _kv_stats(http: httpx.Client, replica: str) -> dict[str, float]:
    """``replica``'s pool gauges, from /metrics (the proxy picks the replica: ask until it is
    ``replica`` that answers)."""
    for _ in range(60):
        response = http.get("/metrics")
        if response.headers[REPLICA_HEADER] == replica:
            samples = {}
            for line in response.text.splitlines():
                if line.startswith("tierkv:"):
                    name, _, value = line.rpartition(" ")
                    samples[name] = float(value)
            return samples
    pytest.fail(f"60 /metrics requests never reached replica {replica}")


def test_cli_replicas_serve_through_ray_and_exit_on_sigterm(tmp_path: Path) -> None:
    """``tierkv serve --replicas 2``, as the README shows it: a cluster of its own, both
    replicas answering, and SIGTERM deletes the application and leaves Ray, exit status 0.

    First in this module, so it runs before the module's cluster starts (2 cores).
    """
    extension.available()  # built before the replicas' clock starts, as in the fixture
    port = free_port()
    log = tmp_path / "serve.log"
    command = tierkv_command(
        "serve", "--replicas", "2", "--replica-cpus", "0.5", "--port", str(port),
        "--ray-address", "local", "--served-model-name", MODEL,
        *(f"--{key.replace('_', '-')}={value}" for key, value in ENGINE.items()),
    )  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=offline_env(), start_new_session=True
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        seen: set[str] = set()
        client = _client(base_url)
        # Serving once both replicas answer and the command has logged its banner (the proxy
        # routes to a replica as soon as it is up, before the whole deployment is).
        while len(seen) < 2 or "through Ray Serve: 2 replicas" not in log.read_text():
            if process.poll() is not None:
                text = log.read_text()
                if "Started a local Ray instance" not in text:
                    pytest.skip(f"Ray cannot start here: {text.strip().splitlines()[-1:]}")
                pytest.fail(f"tierkv serve --replicas 2 exited: {text[-3000:]}")
            assert time.monotonic() < deadline, f"not serving both replicas: {seen}"
            try:
                seen.add(_complete(client, len(seen)))
            except (openai.APIConnectionError, openai.APIStatusError):
                time.sleep(0.5)  # the proxy or the application is not up yet
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_two_replicas_spread_survive_a_kill_and_return_every_page(base_url: str) -> None:
    client = _client(base_url)
    started = time.monotonic()

    # 1. Requests spread over both replicas (concurrent, so Ray's router sees both busy).
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda i: _complete(client, i), range(16), timeout=TIMEOUT * 2))
    replicas = _replicas()
    assert set(served) == set(replicas), (served, list(replicas))
    assert len(replicas) == 2
    # A streamed chat goes through Ray's proxy as server-sent events.
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert [chunk for chunk in stream]

    # 2. One replica killed while both are loaded: the other keeps serving, nothing hangs.
    victim = served[0]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_complete, client, i, 24) for i in range(24)]
        time.sleep(0.5)  # the load is spread over both replicas by now
        in_flight = sum(not f.done() for f in futures)
        ray.kill(replicas[victim], no_restart=True)
        done, not_done = concurrent.futures.wait(futures, timeout=TIMEOUT * 3)
    assert in_flight, "the load ended before the kill: nothing was killed mid-load"
    assert not not_done, f"{len(not_done)} requests hung after the kill"
    outcomes = [f.exception() or f.result() for f in futures]
    survivors = [o for o in outcomes if isinstance(o, str)]
    failures = [o for o in outcomes if not isinstance(o, str)]
    # Requests the killed replica was running end in an error (Ray's proxy answers 500), not a
    # hang; the survivor served the rest.
    assert all(isinstance(f, openai.APIError) for f in failures), failures
    assert any(o != victim for o in survivors), outcomes
    # The survivor keeps serving while the victim is being replaced (a request Ray's router
    # sent to the dead replica before it learnt of the death may fail: one retry).
    for attempt in range(3):
        try:
            assert _complete(client, 100 + attempt) != victim
            break
        except openai.APIError:
            if attempt == 2:
                raise

    # 3. Ray replaces the killed replica: two running again, one of them new.
    deadline = time.monotonic() + REPLACE_TIMEOUT
    while not (_running_replicas() == 2 and victim not in (now := _replicas()) and len(now) == 2):
        assert time.monotonic() < deadline, "Ray did not replace the killed replica in time"
        time.sleep(0.5)
    (replacement,) = set(now) - set(replicas)
    seen: set[str] = set()
    for i in range(40):
        seen.add(_complete(client, 200 + i))
        if seen == set(now):
            break
    assert seen == set(now), f"the replacement {replacement} never served ({seen})"

    # 4. Every replica's pool is whole again: no request running, every page free.
    with httpx.Client(base_url=base_url, trust_env=False, timeout=TIMEOUT) as http:
        for replica in now:
            stats = _kv_stats(http, replica)
            assert stats["tierkv:num_requests_running"] == 0, (replica, stats)
            assert stats["tierkv:kv_pages_used"] == 0, (replica, stats)
            assert stats["tierkv:kv_pages_free"] == stats["tierkv:kv_pages_total"], stats
    assert time.monotonic() - started < 180


def test_replica_header_names_the_replica() -> None:
    """Every response, errors included, carries the replica's id (no Ray needed)."""
    from fastapi import FastAPI

    from tierkv.server.ray_serve import ReplicaHeader

    app = FastAPI()
    app.get("/ok")(lambda: {"ok": True})
    app.add_middleware(ReplicaHeader, replica_id="r1")
    transport = httpx.ASGITransport(app=app)

    async def fetch() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return [await http.get("/ok"), await http.get("/missing")]

    for response in asyncio.run(fetch()):
        assert response.headers[REPLICA_HEADER] == "r1"


def test_serve_run_config_takes_tierkv_serve_options(demo_model_dir: str) -> None:
    """``app_builder`` (the ``serve run`` config's import path) parses tierkv serve's options."""
    from tierkv.server.ray_serve import app_builder

    app = app_builder(
        {"model": demo_model_dir, "replicas": 3, "replica_cpus": 0.5, "kv_cache_memory": "4MiB"}
    )
    deployment = app._bound_deployment
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options["num_cpus"] == 0.5
    assert deployment.max_ongoing_requests == 64  # the engine's --max-num-seqs default
    with pytest.raises(ValueError, match="invalid tierkv serve options"):
        app_builder({"model": demo_model_dir, "no_such_option": 1})


def test_health_check_fails_once_the_engine_loop_is_dead() -> None:
    """``check_health`` (Ray's probe) passes while the engine runs and raises once it died."""
    from types import SimpleNamespace

    from tierkv.server.ray_serve import TierkvReplica

    engine = SimpleNamespace(is_running=True)
    replica = TierkvReplica()
    replica.app = SimpleNamespace(state=SimpleNamespace(engine=engine, replica_id="r1"))
    asyncio.run(replica.check_health())
    engine.is_running = False
    with pytest.raises(RuntimeError, match="r1: the engine loop has died"):
        asyncio.run(replica.check_health())
