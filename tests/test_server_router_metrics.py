"""``/metrics`` carries the gauges routers read, under vLLM's names, from server start.

The Gateway API Inference Extension's endpoint picker (and llm-d, KServe, the vLLM production
stack) reads ``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and
``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` in older pickers).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from server_harness import MODEL_NAME, LiveServer, live_server

LABEL = f'{{model_name="{MODEL_NAME}"}}'
WAITING = f"vllm:num_requests_waiting{LABEL}"
RUNNING = f"vllm:num_requests_running{LABEL}"
USAGE = f"vllm:kv_cache_usage_perc{LABEL}"
GPU_USAGE = f"vllm:gpu_cache_usage_perc{LABEL}"
MAX_NUM_SEQS = 2
NUM_REQUESTS = 5


def test_router_gauges_before_during_and_after_requests(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with live_server(checkpoints["llama"], max_num_seqs=MAX_NUM_SEQS) as server:
        # Before any request: present, with the pool's real size behind them.
        idle = server.metrics()
        assert idle[WAITING] == idle[RUNNING] == 0
        assert idle[USAGE] == idle[GPU_USAGE] == 0.0
        assert idle["tierkv:kv_pages_total"] > 0

        busy = _under_load(server, monkeypatch)
        # Two run (max_num_seqs), the rest queue; usage is the pool's fraction of pages held
        # (a whole number of its pages; the engine thread may move on between two samples).
        assert busy[RUNNING] == MAX_NUM_SEQS
        assert busy[WAITING] == NUM_REQUESTS - MAX_NUM_SEQS
        total = busy["tierkv:kv_pages_total"]
        for name in (USAGE, GPU_USAGE):
            pages = busy[name] * total
            assert 1 <= pages <= total and pages == pytest.approx(round(pages)), busy

        deadline = time.monotonic() + 10
        after = server.metrics()
        while after[USAGE] or after[RUNNING]:
            assert time.monotonic() < deadline, after
            time.sleep(0.05)
            after = server.metrics()
        assert after[WAITING] == 0 and after[GPU_USAGE] == 0.0


def _under_load(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The metrics seen while ``NUM_REQUESTS`` requests are all queued or running."""
    step = server.engine.step

    def slow_step() -> object:
        time.sleep(0.05)  # holds every request in flight long enough to be seen
        return step()

    monkeypatch.setattr(server.engine, "step", slow_step)
    statuses: list[int] = []

    def request() -> None:
        with server.http() as http:
            body = {"prompt": "hello", "max_tokens": 12, "ignore_eos": True}
            statuses.append(http.post("/v1/completions", json=body).status_code)

    threads = [threading.Thread(target=request) for _ in range(NUM_REQUESTS)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        metrics = server.metrics()
        while metrics[RUNNING] + metrics[WAITING] < NUM_REQUESTS:
            assert time.monotonic() < deadline, metrics
            time.sleep(0.01)
            metrics = server.metrics()
        return metrics
    finally:
        for thread in threads:
            thread.join(30)
        assert statuses == [200] * NUM_REQUESTS
