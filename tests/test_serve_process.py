"""``tierkv serve`` as a process: the port checked before the model loads, the startup banner,
and the bounded drain on SIGTERM (a second signal exits at once)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_harness import free_port, offline_env, run_tierkv, tierkv_command

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo-model"
STARTUP_S = 120.0  # a model load on a busy 2-core machine


def test_a_busy_port_fails_before_the_model_loads() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        # The model does not exist: had it been loaded first, that would be the error.
        run = run_tierkv("serve", "--model", "/nonexistent", "--port", port)
    assert run.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr and "Traceback" not in run.stderr


def test_serve_refuses_two_different_models() -> None:
    run = run_tierkv("serve", "a-model", "--model", "another")
    assert run.returncode == 2 and "two models given" in run.stderr


class _Serve:
    """``tierkv serve --model DEMO`` on a free port, its log in a file (the reference attention
    backend: nothing to compile first)."""

    def __init__(self, tmp_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"serve-{self.port}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                tierkv_command(
                    "serve",
                    "--model",
                    str(DEMO),
                    "--port",
                    str(self.port),
                    "--attention-backend",
                    "reference",
                    *flags,
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=offline_env(),
            )
        self.http = httpx.Client(base_url=self.url, trust_env=False, timeout=30)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"not started: {self.log.read_text()}"
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)

    def stream(self, max_tokens: int, n: int = 1) -> Iterator[str]:
        """The data lines of a streamed completion; the first is read on the first ``next``."""
        body = {"prompt": "def f(x):", "max_tokens": max_tokens, "ignore_eos": True, "n": n}
        with self.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    yield line[6:]

    def exit_seconds(self, limit: float) -> float:
        start = time.monotonic()
        self.proc.wait(limit)
        return time.monotonic() - start

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_sigterm_drains_within_the_bound(tmp_path: Path) -> None:
    serve = _Serve(tmp_path, "--shutdown-timeout", "4")
    try:
        banner = serve.log.read_text()
        assert f"on {serve.url}" in banner and "KV pool" in banner
        assert "max_model_len 2048" in banner and "kv_policy default" in banner
        # 8 x 2000 tokens: far longer than the bound on any CPU (over 10 s for 1 x 2000 here).
        short, long = serve.stream(40), serve.stream(2000, n=8)
        next(short), next(long)  # both running
        serve.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no new connections
            httpx.get(f"{serve.url}/health", timeout=5)
        finished = [json.loads(d) for d in short if d != "[DONE]"]
        assert finished[-1]["choices"][0]["finish_reason"] == "length"
        rest = list(long)
        assert rest[-1] == "[DONE]" and "the engine was shut down" in rest[-2]
        assert serve.exit_seconds(15) < 15
        assert serve.proc.returncode in (0, -signal.SIGTERM)
        assert "aborting 1 request(s) still in flight" in serve.log.read_text()
    finally:
        serve.close()


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    serve = _Serve(tmp_path, "--shutdown-timeout", "600")
    try:
        long = serve.stream(2000, n=8)
        next(long)
        serve.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert serve.proc.poll() is None  # draining: the request has 600 s
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.exit_seconds(15) < 15
        assert "Traceback" not in serve.log.read_text()
    finally:
        serve.close()
