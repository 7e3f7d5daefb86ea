"""Serving load: streamed completions against a running server, Poisson arrivals, a concurrency
cap, and latency percentiles (TTFT, TPOT, ITL, end-to-end) as ``vllm bench serve`` reports them.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx


class ServerUnreachable(RuntimeError):
    """The server cannot be used: it does not answer, refuses the key, or serves no model."""


def served_model(base_url: str, api_key: str | None, name: str | None = None) -> str:
    """Check that the server answers ``/v1/models`` with this key; the model to request is
    ``name``, else the server's first. Raises ``ServerUnreachable`` saying why not, before any
    load is sent (one clear line rather than a failure per request)."""
    url = base_url.rstrip("/") + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(url, headers=headers, timeout=30)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        reason = str(exc) or type(exc).__name__
        raise ServerUnreachable(f"no server answers at {base_url} ({reason})") from exc
    if resp.status_code == 401:
        given = "refuses this --api-key" if api_key else "needs an API key: pass --api-key"
        raise ServerUnreachable(f"the server at {base_url} {given} (HTTP 401)")
    if resp.status_code != 200:
        raise ServerUnreachable(f"GET {url} answered HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        models = [m["id"] for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ServerUnreachable(f"GET {url} did not answer a model list: {exc!r}") from exc
    if name is not None:
        return name
    if not models:
        raise ServerUnreachable(f"the server at {base_url} serves no model")
    return models[0]


@dataclass
class RequestRecord:
    """Timings of one streamed request (seconds); ``error`` is set when it failed."""

    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None
    turn: int = 0
    token_ids: list[int] = field(default_factory=list)


@dataclass
class ServeReport:
    """Aggregates over all requests of a run."""

    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_tokens_per_s: float
    percentiles: dict[str, dict[str, float]]  # metric -> {"p50", "p90", "p99", "mean"} in ms


async def _one(
    client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str]
) -> RequestRecord:
    record = RequestRecord()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                record.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return record
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    record.token_ids += choice.get("token_ids") or []
                if not any(c.get("text") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if record.ttft == 0.0:
                    record.ttft = now - start
                else:
                    record.itls.append(now - last)
                last = now
    except httpx.HTTPError as exc:
        record.error = repr(exc)
        return record
    record.e2e = time.perf_counter() - start
    return record


async def run_load(
    base_url: str,
    model: str,
    conversations: list[list[list[int]]],
    output_len: int,
    request_rate: float,
    max_concurrency: int,
    seed: int,
    api_key: str | None,
    timeout_s: float,
) -> tuple[list[RequestRecord], float]:
    """Send every conversation; arrivals are Poisson at ``request_rate`` (inf: all at once).

    A conversation is its turns' token windows, user and assistant alternating and ending
    with a user turn: its ``i``-th request's prompt is the history so far and the ``i``-th
    user window, so later turns resend the history as chat clients do. The history holds
    each answer as generated (its token ids, which the server returns with vLLM's
    ``return_token_ids``), or the recorded assistant window where a server returns none. A
    single-turn conversation is one prompt."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(max_concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/completions"

    async def chat(client: httpx.AsyncClient, turns: list[list[int]]) -> list[RequestRecord]:
        # One conversation holds its concurrency slot for all its turns, as a user would.
        records = []
        history = list(turns[0])
        async with gate:
            for t in range(0, len(turns), 2):
                body = {
                    "model": model,
                    "prompt": history,
                    "max_tokens": output_len,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "return_token_ids": True,
                }
                record = await _one(client, url, body, headers)
                record.turn = t // 2
                records.append(record)
                if record.error is not None or t + 2 >= len(turns):
                    break
                # The answer as generated (the server returns its token ids), else the
                # recorded one, then the next user turn.
                history = history + (record.token_ids or turns[t + 1]) + turns[t + 2]
        return records

    limits = httpx.Limits(max_connections=max_concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for turns in conversations:
            tasks.append(asyncio.create_task(chat(client, turns)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        records = await asyncio.gather(*tasks)
        return [r for chat_records in records for r in chat_records], time.perf_counter() - start


def summarize(records: list[RequestRecord], duration: float) -> ServeReport:
    """Percentiles of the successful requests' latencies."""
    ok = [r for r in records if r.error is None]
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itls],
        "e2e": [r.e2e for r in ok],
    }
    last = max((r.turn for r in ok), default=0)
    if last:
        series["ttft_t1"] = [r.ttft for r in ok if r.turn == 0]
        series[f"ttft_t{last + 1}"] = [r.ttft for r in ok if r.turn == last]
    tokens = sum(r.output_tokens for r in ok)
    return ServeReport(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration,
        request_throughput=len(ok) / duration,
        output_tokens_per_s=tokens / duration,
        percentiles={name: _percentiles(values) for name, values in series.items()},
    )


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    return {
        "mean": sum(ordered) / len(ordered) * 1e3,
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
    }


def format_report(report: ServeReport) -> str:
    """The report as ``vllm bench serve`` lays it out, in milliseconds."""
    lines = [
        f"completed {report.completed}, failed {report.failed}, duration {report.duration_s:.1f} s",
        f"request throughput {report.request_throughput:.2f} req/s, "
        f"output {report.output_tokens_per_s:.1f} tok/s",
        f"{'ms':<9}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, p in report.percentiles.items():
        lines.append(
            f"{name:<9}{p['mean']:>10.1f}{p['p50']:>10.1f}{p['p90']:>10.1f}{p['p99']:>10.1f}"
        )
    return "\n".join(lines)
