"""The ``tierkv`` command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tierkv import LLM, SamplingParams, __version__
from tierkv.config import ALLOW_LONG_ENV, EngineConfig


def _tierkv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierkv.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_prints_the_same_completion_as_the_library(checkpoints: dict[str, Path]) -> None:
    path = str(checkpoints["llama"])
    run = _tierkv(
        "generate",
        "--model",
        path,
        "--dtype",
        "float32",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--kv-cache-memory",
        "16MiB",
        "def add(a, b):",
    )
    assert run.returncode == 0, run.stderr
    llm = LLM(path, dtype="float32", kv_cache_memory="16MiB")
    expected = llm.generate(
        "def add(a, b):", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    assert run.stdout == "def add(a, b):" + expected[0].text + "\n"


def test_bad_flag_values_give_a_clear_error_and_exit_code(checkpoints: dict[str, Path]) -> None:
    run = _tierkv("generate", "--model", str(checkpoints["llama"]), "--top-p", "2", "x")
    assert run.returncode == 2
    assert "top_p must be in (0, 1], got 2.0" in run.stderr
    run = _tierkv("generate", "--model", "/nonexistent/model", "x")
    assert run.returncode == 2 and "no config.json" in run.stderr


def test_bench_throughput_writes_json(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = _tierkv(
        "bench",
        "throughput",
        "--model",
        str(checkpoints["qwen2"]),
        "--dtype",
        "float32",
        "--num-prompts",
        "4",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--kv-cache-memory",
        "8MiB",
        "--json",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["results"]
    # The engine's default policy when none is named, as `tierkv serve` would run.
    assert [r["policy"] for r in rows] == [EngineConfig.kv_policy]
    assert rows[0]["output_tokens_per_s"] > 0 and rows[0]["max_running"] == 4


def test_help_lists_the_subcommands() -> None:
    run = _tierkv("--help")
    assert run.returncode == 0
    assert "generate" in run.stdout and "bench" in run.stdout


def test_version() -> None:
    run = _tierkv("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"tierkv {__version__}"


def test_max_model_len_beyond_the_model_needs_an_override(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _tierkv(
        "generate", "--model", str(checkpoints["llama"]), "--max-model-len", "100000", "x"
    )
    assert run.returncode == 2
    assert "longer than the model's 2048 positions" in run.stderr and ALLOW_LONG_ENV in run.stderr
    monkeypatch.delenv(ALLOW_LONG_ENV, raising=False)
    config = EngineConfig(model="m", max_model_len=4096)
    assert EngineConfig(model="m").resolve_max_model_len(2048) == 2048
    assert EngineConfig(model="m", max_model_len=1024).resolve_max_model_len(2048) == 1024
    with pytest.raises(ValueError, match=ALLOW_LONG_ENV):
        config.resolve_max_model_len(2048)
    allowed = EngineConfig(model="m", max_model_len=4096, allow_long_max_model_len=True)
    assert allowed.resolve_max_model_len(2048) == 4096
    monkeypatch.setenv(ALLOW_LONG_ENV, "1")
    assert config.resolve_max_model_len(2048) == 4096
