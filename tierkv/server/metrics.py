"""Prometheus metrics of the server: ``tierkv:*``, and the ``vllm:*`` gauges routers read.

tierkv's own metrics are named ``tierkv:*`` as vLLM names its own ``vllm:*``. Routers that pick a
replica by load (the Gateway API Inference Extension's endpoint picker, llm-d, KServe, the vLLM
production-stack router) scrape vLLM's names, per the extension's model server protocol:

- ``vllm:num_requests_waiting`` (TotalQueuedRequests): requests queued, not yet admitted;
- ``vllm:num_requests_running`` (TotalRunningRequests): requests being served;
- ``vllm:kv_cache_usage_perc`` (KVCacheUtilization; vLLM's current name) and
  ``vllm:gpu_cache_usage_perc`` (its older name, which older pickers read): the fraction
  (0 to 1, despite "perc") of the KV pool's pages in use.

Each carries vLLM's ``model_name`` label (the served model name). Pages are fixed-size blocks
of bytes and a compressed policy packs more tokens in a page, so the fraction of pages in use
is the fraction of the pool's bytes the running requests actually hold: a compressed or pruned
cache reads lower than an uncompressed one at the same token count, as its headroom is larger.
The gauges hold the pool's values from server start (``Metrics.record_engine`` is called before
the first request), so a router sees an idle replica as idle, not as absent.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tierkv.engine.async_protocol import RequestStats

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


def _router_gauges(registry: CollectorRegistry, model_name: str) -> dict[str, Any]:
    """vLLM's load gauges, labelled as vLLM labels them, each bound to ``model_name``."""
    usage_doc = (
        "Fraction (0-1) of the KV pool's pages in use: of its bytes held, compressed or not."
    )
    return {
        key: Gauge(name, doc, ["model_name"], registry=registry).labels(model_name=model_name)
        for key, name, doc in (
            ("waiting", "vllm:num_requests_waiting", "Requests waiting to be processed."),
            ("running", "vllm:num_requests_running", "Requests currently running."),
            ("kv_usage", "vllm:kv_cache_usage_perc", usage_doc),
            ("gpu_usage", "vllm:gpu_cache_usage_perc", usage_doc + " vLLM's older name."),
        )
    }


class Metrics:
    """The server's metrics in a registry of its own, so several servers fit in one process.

    Implements ``StatsSink``: the engine loop thread reports every ended request and, after
    each loop iteration, the KV pool and scheduler counters.
    """

    def __init__(self, model_name: str = "tierkv") -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self._router = _router_gauges(reg, model_name)
        self.requests = Counter(
            "tierkv:requests_finished",
            "Completions ended, by finish reason (stop, length, abort, error).",
            ["finish_reason"],
            registry=reg,
        )
        self.prompt_tokens = Counter(
            "tierkv:prompt_tokens", "Prompt tokens processed.", registry=reg
        )
        self.generation_tokens = Counter(
            "tierkv:generation_tokens", "Tokens generated.", registry=reg
        )
        self.ttft = Histogram(
            "tierkv:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=reg,
        )
        self.tpot = Histogram(
            "tierkv:time_per_output_token_seconds",
            "Mean time per generated token after the first, per request.",
            buckets=_TPOT_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "tierkv:e2e_request_latency_seconds",
            "Time from arrival to the end of a request.",
            buckets=_E2E_BUCKETS,
            registry=reg,
        )
        self.preemptions = Counter(
            "tierkv:num_preemptions", "Requests preempted to free KV pages.", registry=reg
        )
        self._preemptions_seen = 0
        # Tokens, as vLLM's counters: prompt tokens looked up, and those found cached.
        self._totals = {
            key: (Counter(name, doc, registry=reg), [0])
            for key, name, doc in (
                (
                    "prefix_cache_queries",
                    "tierkv:prefix_cache_queries",
                    "Prompt tokens looked up in the prefix cache.",
                ),
                (
                    "prefix_cache_hits",
                    "tierkv:prefix_cache_hits",
                    "Prompt tokens found in the prefix cache.",
                ),
            )
        }
        self._gauges = {
            key: Gauge(name, doc, registry=reg)
            for key, name, doc in (
                ("running", "tierkv:num_requests_running", "Requests running in the engine."),
                ("waiting", "tierkv:num_requests_waiting", "Requests waiting for admission."),
                ("total_pages", "tierkv:kv_pages_total", "KV pages in the pool."),
                ("free_pages", "tierkv:kv_pages_free", "KV pages free."),
                ("used_pages", "tierkv:kv_pages_used", "KV pages in use."),
                (
                    "prefix_cache_pages",
                    "tierkv:prefix_cache_pages",
                    "KV pages the prefix cache holds (shared with requests or evictable).",
                ),
                (
                    "kv_bytes_per_token",
                    "tierkv:kv_bytes_per_token",
                    "KV bytes one token costs under the policy, metadata included.",
                ),
                ("kv_bytes_in_use", "tierkv:kv_bytes_in_use", "KV bytes held by requests."),
            )
        }

    def record_request(self, stats: RequestStats) -> None:
        for reason in stats.finish_reasons:
            self.requests.labels(finish_reason=reason).inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.generation_tokens)
        if stats.ttft is not None:
            self.ttft.observe(stats.ttft)
        if stats.tpot is not None:
            self.tpot.observe(stats.tpot)
        self.e2e.observe(stats.e2e)

    def record_engine(self, kv_stats: dict[str, Any]) -> None:
        """Set the gauges from ``Engine.pool_counters()`` (also called once at server start)."""
        for key, gauge in self._gauges.items():
            gauge.set(kv_stats[key])
        total = kv_stats["total_pages"]
        usage = kv_stats["used_pages"] / total if total else 0.0
        for key, value in (
            ("waiting", kv_stats["waiting"]),
            ("running", kv_stats["running"]),
            ("kv_usage", usage),
            ("gpu_usage", usage),
        ):
            self._router[key].set(value)
        preemptions = int(kv_stats["preemptions"])
        self.preemptions.inc(preemptions - self._preemptions_seen)
        self._preemptions_seen = preemptions
        for key, (counter, seen) in self._totals.items():
            value = int(kv_stats[key])
            counter.inc(value - seen[0])
            seen[0] = value

    def render(self) -> bytes:
        """The exposition text served at ``/metrics``."""
        return generate_latest(self.registry)
