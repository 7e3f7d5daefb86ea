"""Benchmark tools produce well-formed, internally consistent reports (not timed assertions)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from server_harness import MODEL_NAME, live_server

from tierkv.bench.serve import run_load, summarize
from tierkv.bench.throughput import Workload
from tierkv.cli_args import DEMO_MODEL
from tierkv.eval import corpus
from tierkv.tokenizer import Tokenizer


def test_bench_throughput_rows_for_policies_and_hf_caches(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "throughput.json"
    args = ["--model", str(checkpoints["llama"]), "--dtype", "float32", "--num-prompts", "6"]
    args += ["--input-len", "48", "--output-len", "5", "--kv-policy", "fp16"]
    args += ["--kv-policy", "k4v2", "--kv-cache-memory", "1MiB", "--max-num-seqs", "4"]
    run = subprocess.run(
        [sys.executable, "-m", "tierkv.cli", "bench", "throughput", *args, "--compare-hf"]
        + ["--hf-batch-size", "3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["results"]
    names = [r["policy"] for r in rows]
    assert names == ["fp16", "k4v2", "hf-dynamic", "hf-quanto-4", "hf-quanto-2"]
    assert all(r["output_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    # max_num_seqs caps the engine's batch; HF runs its batches of 3.
    assert [r["max_running"] for r in rows] == [4, 4, 3, 3, 3]
    assert rows[0]["preemptions"] == rows[1]["preemptions"] == 0
    # Our rows split their time into prompt and decode steps; 6 requests decode at most 4
    # tokens each after the step that samples their first, at most 4 at a time.
    for r in rows[:2]:
        assert r["prefill_s"] > 0 and r["decode_s"] > 0
        assert r["prefill_s"] + r["decode_s"] <= r["elapsed_s"]
        assert round(r["decode_steps"] * r["mean_decode_batch"]) <= 6 * 4
        assert 1 <= r["mean_decode_batch"] <= 4
    assert all(r["decode_s"] is None for r in rows[2:])
    assert "hf-quanto-2" in run.stdout


def test_bench_decode_reports_kv_bytes_and_bandwidth(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "decode.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tierkv.cli",
            "bench",
            "decode",
            "--model",
            str(checkpoints["llama"]),
            "--dtype",
            "float32",
            "--contexts",
            "64,256",
            "--steps",
            "4",
            "--repeats",
            "3",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    payload = json.loads(out.read_text())
    assert all(payload["bandwidth"][k] > 0 for k in ("copy_gb_s", "read_gb_s", "matvec_gb_s"))
    short, long = payload["results"]
    assert (short["context"], long["context"]) == (64, 256)
    # Each row is the median of its three rounds.
    for row in (short, long):
        assert len(row["runs_ms"]) == 3 and sorted(row["runs_ms"])[1] == row["ms_per_step"]
    # The request's cache is alive while it is measured, and grows with the context.
    assert 0 < short["kv_bytes"] < long["kv_bytes"]
    assert short["weight_bytes"] == long["weight_bytes"] > 0
    # Every float32 weight, but of the untied input embedding only the step's row.
    config = json.loads((checkpoints["llama"] / "config.json").read_text())
    assert not config["tie_word_embeddings"]
    weights = load_file(checkpoints["llama"] / "model.safetensors")
    total = sum(w.numel() for w in weights.values())
    unread = (config["vocab_size"] - 1) * config["hidden_size"]
    assert short["weight_bytes"] == 4 * (total - unread)


def test_bench_serve_against_the_real_server(checkpoints: dict[str, Path]) -> None:
    prompts = [[[5, 6, 7, 8] * (i + 1)] for i in range(12)]
    with live_server(checkpoints["llama"]) as server:
        records, duration = asyncio.run(
            run_load(server.base_url, MODEL_NAME, prompts, 6, 50.0, 4, 0, None, 60.0)
        )
        stats = server.engine.kv_stats()
    report = summarize(records, duration)
    assert report.completed == 12 and report.failed == 0
    assert report.output_tokens_per_s == 12 * 6 / duration
    for name in ("ttft", "tpot", "itl", "e2e"):
        p = report.percentiles[name]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"]
    assert report.percentiles["ttft"]["p50"] <= report.percentiles["e2e"]["p50"]
    assert stats["free_pages"] == stats["total_pages"]


def test_bench_serve_multi_turn_resends_the_history(checkpoints: dict[str, Path]) -> None:
    """Three conversations of three turns against an fp16 server: nine requests, each later
    turn's prompt extends the one before, and the server's prefix cache serves the history."""
    work = Workload(str(checkpoints["llama"]), num_prompts=3 * 5, input_len=40, prefix_len=30)
    windows = work.windows([30] + [40] * 15)
    assert work.prompts()[0][:30] == work.prompts()[1][:30] == windows[0]
    conversations = [
        [windows[0] + windows[1 + 5 * c]] + windows[2 + 5 * c : 6 + 5 * c] for c in range(3)
    ]
    with live_server(checkpoints["llama"], kv_policy="fp16") as server:
        records, duration = asyncio.run(
            run_load(server.base_url, MODEL_NAME, conversations, 4, float("inf"), 2, 0, None, 60.0)
        )
        stats = server.engine.kv_stats()
    report = summarize(records, duration)
    assert report.completed == 9 and report.failed == 0
    assert sorted(r.turn for r in records) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # The server returned each answer's ids, which the next turn resent (and hit on).
    assert all(len(r.token_ids) == 4 for r in records)
    assert {"ttft_t1", "ttft_t3"} <= set(report.percentiles)
    assert stats["prefix_cache_hits"] > 0 and stats["used_pages"] == 0


def test_bench_serve_counts_failures() -> None:
    records, duration = asyncio.run(
        run_load("http://127.0.0.1:9", "none", [[[1, 2]]], 4, float("inf"), 1, 0, None, 5.0)
    )
    report = summarize(records, duration)
    assert report.completed == 0 and report.failed == 1


def test_stdlib_prompts_are_windows_of_the_held_out_text() -> None:
    work = Workload(str(DEMO_MODEL), num_prompts=4, input_len=64, dataset="stdlib")
    prompts = work.prompts()
    assert [len(p) for p in prompts] == [64] * 4
    assert prompts == work.prompts()  # fixed by the seed
    assert prompts != Workload(str(DEMO_MODEL), 4, 64, seed=1, dataset="stdlib").prompts()
    text = "\n\n".join(corpus.read_text(corpus.held_out_files("test")))
    tokenizer = Tokenizer(DEMO_MODEL)
    assert all(tokenizer.decode(p) in text for p in prompts)
    with pytest.raises(ValueError, match="too short"):
        Workload(str(DEMO_MODEL), 1, 10**7, dataset="stdlib").prompts()
    with pytest.raises(ValueError, match="dataset must be one of"):
        Workload(str(DEMO_MODEL), dataset="sharegpt").prompts()
