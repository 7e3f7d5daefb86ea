"""Runs the real server (uvicorn on 127.0.0.1, a free port) in a background thread for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from fastapi import FastAPI

from tierkv.config import EngineConfig
from tierkv.engine.engine import Engine
from tierkv.server.app import create_app
from tierkv.server.guard import ServerLimits
from tierkv.server.launcher import make_server

MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 256
ENGINE_KWARGS: dict[str, Any] = dict(
    dtype="float32", kv_cache_memory="4MiB", max_model_len=MAX_MODEL_LEN, max_num_seqs=32
)
TIMEOUT = 30.0


@dataclass
class LiveServer:
    """A running server and the engine behind it."""

    base_url: str
    app: FastAPI
    engine: Engine

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        """The official client, without retries or proxies, bounded in time."""
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=api_key,
            max_retries=0,
            timeout=TIMEOUT,
            http_client=httpx.Client(trust_env=False, timeout=TIMEOUT),
        )

    def async_client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=api_key,
            max_retries=0,
            timeout=TIMEOUT,
            http_client=httpx.AsyncClient(
                trust_env=False, timeout=TIMEOUT, limits=httpx.Limits(max_connections=64)
            ),
        )

    def http(self) -> httpx.Client:
        """A raw HTTP client, for bodies the official client would refuse to send."""
        return httpx.Client(base_url=self.base_url, trust_env=False, timeout=TIMEOUT)

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of ``/metrics`` by name."""
        with self.http() as http:
            text = http.get("/metrics").text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples


@contextmanager
def live_server(
    model: Path,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    **engine_kwargs: Any,
) -> Iterator[LiveServer]:
    """Serve ``model`` until the block ends; the engine loop starts and stops with it.

    The server is ``tierkv serve``'s (its middleware, protocol and limits) but in a thread.
    """
    engine = Engine(EngineConfig.from_kwargs(str(model), **{**ENGINE_KWARGS, **engine_kwargs}))
    limits = limits or ServerLimits(shutdown_timeout=5)
    app = create_app(engine, MODEL_NAME, api_key, limits)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = make_server(app, limits, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app, engine)
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


def free_port() -> int:
    """A port free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_tierkv(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``tierkv ARGS`` in a subprocess, offline, its output captured."""
    return subprocess.run(
        tierkv_command(*args), capture_output=True, text=True, timeout=timeout, env=offline_env()
    )


def tierkv_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tierkv.cli", *args]


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
