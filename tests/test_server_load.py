"""A bounded load test: 200 requests at concurrency 32, a tenth of them disconnecting mid-stream.

Afterwards no request got a 5xx, every completed response is well-formed, and every KV page is
back in the pool (as ``/metrics`` reports it).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from server_harness import MODEL_NAME, LiveServer, live_server

NUM_REQUESTS = 200
CONCURRENCY = 32
DISCONNECT_EVERY = 10
REQUEST_TIMEOUT = 30.0
TOTAL_TIMEOUT = 80.0
FIXED = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    # A pool of 256 pages: 32 concurrent requests usually run it dry and preempt some.
    with live_server(checkpoints["llama"], kv_cache_memory="384KiB") as s:
        yield s


async def _completion(client: openai.AsyncOpenAI, rng: random.Random, stream: bool) -> str:
    max_tokens = rng.randint(2, 10)
    n = rng.choice([1, 1, 2])
    kwargs = dict(
        model=MODEL_NAME,
        prompt="def add(a, b):" * rng.randint(1, 6),
        max_tokens=max_tokens,
        n=n,
        temperature=rng.choice([0.0, 0.8]),
        seed=rng.randint(0, 1000),
        extra_body=FIXED,
    )
    if not stream:
        out = await client.completions.create(**kwargs)
        assert out.object == "text_completion" and out.usage is not None
        assert sorted(c.index for c in out.choices) == list(range(n))
        assert all(c.finish_reason == "length" for c in out.choices)
        assert out.usage.completion_tokens == n * max_tokens
        return "completion"
    finishes: dict[int, str] = {}
    usage = None
    chunks = await client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            assert choice.index not in finishes, "text after the finish"
            if choice.finish_reason is not None:
                finishes[choice.index] = choice.finish_reason
    assert finishes == dict.fromkeys(range(n), "length")
    assert usage is not None and usage.completion_tokens == n * max_tokens
    return "completion-stream"


async def _chat(client: openai.AsyncOpenAI, rng: random.Random, stream: bool) -> str:
    max_tokens = rng.randint(2, 10)
    kwargs = dict(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Hello world! " * rng.randint(1, 4)}],
        max_tokens=max_tokens,
        temperature=rng.choice([0.0, 1.0]),
        extra_body=FIXED,
    )
    if not stream:
        out = await client.chat.completions.create(**kwargs)
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].finish_reason == "length"
        assert out.usage is not None and out.usage.completion_tokens == max_tokens
        return "chat"
    chunks = [c async for c in await client.chat.completions.create(**kwargs, stream=True)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    return "chat-stream"


async def _disconnect(client: openai.AsyncOpenAI, rng: random.Random) -> str:
    """Start a long stream, read two chunks, then hang up."""
    chunks = await client.completions.create(
        model=MODEL_NAME,
        prompt="class Point:",
        max_tokens=200,
        stream=True,
        seed=rng.randint(0, 1000),
        extra_body=FIXED,
    )
    seen = 0
    async for _ in chunks:
        seen += 1
        if seen == 2:
            break
    await chunks.close()
    return "disconnect"


async def _one(client: openai.AsyncOpenAI, i: int, gate: asyncio.Semaphore) -> str:
    rng = random.Random(i)
    async with gate:
        if i % DISCONNECT_EVERY == 0:
            work = _disconnect(client, rng)
        elif i % 2:
            work = _completion(client, rng, stream=bool(i % 3))
        else:
            work = _chat(client, rng, stream=bool(i % 3))
        try:
            return await asyncio.wait_for(work, REQUEST_TIMEOUT)
        except openai.APIStatusError as exc:
            return f"status {exc.status_code}"


async def _run(server: LiveServer) -> Counter[str]:
    gate = asyncio.Semaphore(CONCURRENCY)
    async with server.async_client() as client:
        results = await asyncio.gather(*(_one(client, i, gate) for i in range(NUM_REQUESTS)))
    return Counter(results)


def test_load_with_disconnects_returns_every_page(server: LiveServer) -> None:
    started = time.monotonic()
    outcomes = asyncio.run(asyncio.wait_for(_run(server), TOTAL_TIMEOUT))
    assert not [k for k in outcomes if k.startswith("status")], outcomes
    assert outcomes["disconnect"] == NUM_REQUESTS // DISCONNECT_EVERY
    assert sum(outcomes.values()) == NUM_REQUESTS
    assert time.monotonic() - started < TOTAL_TIMEOUT

    # Aborts reach the engine loop asynchronously: give them a moment to land.
    deadline = time.monotonic() + 10
    metrics = server.metrics()
    while metrics["tierkv:kv_pages_free"] != metrics["tierkv:kv_pages_total"]:
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
        metrics = server.metrics()
    assert metrics["tierkv:num_requests_running"] == 0
    assert metrics["tierkv:num_requests_waiting"] == 0
    assert metrics['tierkv:requests_finished_total{finish_reason="abort"}'] >= 1
    assert metrics["tierkv:kv_pages_total"] > 0
    with server.http() as http:
        assert http.get("/health").status_code == 200


def test_unstreamed_request_is_aborted_when_the_client_leaves(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = server.engine.step

    def slow_step() -> object:
        time.sleep(0.02)  # keeps the request running when the client gives up
        return step()

    monkeypatch.setattr(server.engine, "step", slow_step)
    aborted = server.metrics().get('tierkv:requests_finished_total{finish_reason="abort"}', 0)
    with server.http() as http, pytest.raises(httpx.TimeoutException):
        http.post(
            "/v1/completions",
            json={"prompt": "hi", "max_tokens": 200, "ignore_eos": True},
            timeout=0.3,
        )
    deadline = time.monotonic() + 10
    metrics = server.metrics()
    while metrics['tierkv:requests_finished_total{finish_reason="abort"}'] == aborted:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)
        metrics = server.metrics()
    assert metrics["tierkv:kv_pages_free"] == metrics["tierkv:kv_pages_total"]
