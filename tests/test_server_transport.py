"""The HTTP transport: the API key before any body, size and time limits, vLLM's utility routes,
and ``tierkv serve`` as a process (port check, banner, bounded drain on SIGTERM)."""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from server_harness import MAX_MODEL_LEN, MODEL_NAME, LiveServer, free_port, live_server, run_tierkv
from transformers import AutoTokenizer

from tierkv import __version__
from tierkv.server.guard import ServerLimits
from tierkv.server.launcher import LINGER_S

KEY = "sk-transport"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ServerLimits(max_body_bytes=64 * 1024, max_prompts=4, read_timeout=1.0)


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    with live_server(checkpoints["llama"], api_key=KEY, limits=LIMITS) as s:
        yield s


def _connect(server: LiveServer) -> socket.socket:
    url = urlsplit(server.base_url)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the next response on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed without an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: (\d+)", head.lower())
    assert match, head
    while len(body) < int(match.group(1)):
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body)


def _send_until_closed(sock: socket.socket, limit_s: float) -> int:
    """Send junk until the server closes ``sock`` (within ``limit_s``); the bytes sent."""
    sock.settimeout(1.0)
    sent, start = 0, time.monotonic()
    with contextlib.suppress(OSError):  # the reset or broken pipe of the close
        while time.monotonic() - start < limit_s:
            sent += sock.send(b"x" * 65536)
        raise AssertionError(f"still open after {limit_s} s")
    return sent


def _closed_by_peer(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


# -- the API key, before any body ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("GET", "/version"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/no/such/route"),
    ],
)
def test_every_route_but_health_and_metrics_needs_the_key(
    server: LiveServer, method: str, path: str
) -> None:
    with server.http() as http:
        # A malformed body too: the key is checked first, so a 401, never a 400.
        response = http.request(method, path, content=b'{"prompt": ', headers={})
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        wrong = http.request(method, path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200


def test_a_keyless_huge_body_is_refused_unread(server: LiveServer) -> None:
    # 100 MB announced, 1 KB sent, and the client then waits: the 401 comes from the headers
    # alone, at once (a server reading first would wait for the body and answer 408).
    with _connect(server) as sock:
        start = time.monotonic()
        sock.sendall(_head("/v1/completions", {"Content-Length": str(100 * 10**6)}))
        sock.sendall(b"x" * 1024)
        status, body = _response(sock)
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert time.monotonic() - start < LIMITS.read_timeout
        # The rest is discarded for a moment only (so the client can read the answer); the
        # kernel's socket buffers take some megabytes more.
        assert _send_until_closed(sock, LINGER_S + 5) < 20 * 2**20


# -- size and time limits -------------------------------------------------------------------------


def test_a_declared_oversized_body_gets_413_unread(server: LiveServer) -> None:
    with _connect(server) as sock:
        sock.sendall(_head("/v1/completions", {**AUTH, "Content-Length": str(10**8)}))
        status, body = _response(sock)
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_a_chunked_body_is_counted_as_it_streams(server: LiveServer) -> None:
    with _connect(server) as sock:
        sock.sendall(_head("/v1/completions", {**AUTH, "Transfer-Encoding": "chunked"}))
        chunk = b"x" * 8192
        try:  # the server answers (and closes) as soon as the limit is passed
            for _ in range(2 * LIMITS.max_body_bytes // len(chunk)):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _ = _response(sock)
    assert status == 413


def test_too_many_prompts_in_one_request(server: LiveServer) -> None:
    with server.http() as http:
        for prompt in (["hi"] * 5, [[1, 2]] * 5):
            response = http.post("/v1/completions", json={"prompt": prompt}, headers=AUTH)
            assert response.status_code == 400
            assert response.json()["error"]["param"] == "prompt"
            assert "at most 4" in response.json()["error"]["message"]


def test_a_stalled_body_gets_408(server: LiveServer) -> None:
    with _connect(server) as sock:
        start = time.monotonic()
        sock.sendall(_head("/v1/completions", {**AUTH, "Content-Length": "100"}))
        sock.sendall(b'{"prompt": ')
        status, body = _response(sock)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert time.monotonic() - start < LIMITS.read_timeout + 5


def test_stalled_and_dribbling_headers_are_closed_within_the_timeout(server: LiveServer) -> None:
    silent = [_connect(server) for _ in range(20)]
    dribbling = [_connect(server) for _ in range(20)]
    for sock in dribbling:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n")
    start = time.monotonic()
    open_ = silent + dribbling
    while open_ and time.monotonic() - start < LIMITS.read_timeout + 5:
        time.sleep(0.1)
        for sock in dribbling:  # a header line now and then keeps no deadline from running
            if sock in open_:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-Slow: 1\r\n")
        open_ = [s for s in open_ if not _closed_by_peer(s)]
    for sock in silent + dribbling:
        sock.close()
    assert not open_, f"{len(open_)} of 40 stalled connections still open"
    with server.http() as http:  # and the server still serves
        assert http.get("/v1/models", headers=AUTH).status_code == 200


# -- vLLM's utility routes -----------------------------------------------------------------------


def test_tokenize_and_detokenize_match_the_tokenizer(
    server: LiveServer, checkpoints: dict[str, Path]
) -> None:
    hf = AutoTokenizer.from_pretrained(str(checkpoints["llama"]))
    text = "def add(a, b):\n    return a + b"
    messages = [{"role": "user", "content": "Hello world!"}]
    with server.http() as http:
        out = http.post("/tokenize", json={"prompt": text, "model": MODEL_NAME}, headers=AUTH)
        assert out.status_code == 200, out.text
        body = out.json()
        assert body["tokens"] == hf.encode(text)
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
        bare = http.post(
            "/tokenize", json={"prompt": text, "add_special_tokens": False}, headers=AUTH
        )
        assert bare.json()["tokens"] == hf.encode(text, add_special_tokens=False)

        chat = http.post("/tokenize", json={"messages": messages}, headers=AUTH).json()
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert chat["tokens"] == hf.encode(rendered, add_special_tokens=False)
        no_prompt = http.post(
            "/tokenize", json={"messages": messages, "add_generation_prompt": False}, headers=AUTH
        ).json()
        assert len(no_prompt["tokens"]) < len(chat["tokens"])

        back = http.post("/detokenize", json={"tokens": body["tokens"]}, headers=AUTH)
        assert back.status_code == 200
        assert back.json()["prompt"] == hf.decode(body["tokens"])

        assert http.get("/version", headers=AUTH).json() == {"version": __version__}


@pytest.mark.parametrize(
    ("path", "raw", "status"),
    [
        ("/tokenize", b'{"prompt": "abc\\ud800"}', 400),  # a lone surrogate: no tokenizer takes it
        ("/tokenize", b'{"prompt": 5}', 400),
        ("/tokenize", b'{"prompt": "hi", "model": "other"}', 404),
        ("/detokenize", b'{"tokens": [1, 10000000]}', 400),
        ("/detokenize", b'{"tokens": [true, false]}', 400),
        ("/detokenize", b'{"tokens": "abc"}', 400),
    ],
)
def test_utility_routes_refuse_bad_input(
    server: LiveServer, path: str, raw: bytes, status: int
) -> None:
    with server.http() as http:
        response = http.post(
            path, content=raw, headers={**AUTH, "Content-Type": "application/json"}
        )
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


# -- tierkv bench serve -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["absent", "keyless", "wrong key"])
def test_bench_serve_reports_an_unusable_server_in_one_line(server: LiveServer, case: str) -> None:
    url = f"http://127.0.0.1:{free_port()}" if case == "absent" else server.base_url
    key = ["--api-key", "nope"] if case == "wrong key" else []
    run = run_tierkv("bench", "serve", "--base-url", url, "--num-prompts", "1", *key)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    expected = {
        "absent": "no server answers",
        "keyless": "needs an API key: pass --api-key",
        "wrong key": "refuses this --api-key",
    }[case]
    assert run.stderr.startswith("tierkv: error: ") and expected in run.stderr
