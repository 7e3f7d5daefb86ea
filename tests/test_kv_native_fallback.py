"""Without a working compiler the native kernels are reported missing and the engine still
serves on its torch paths (checked in a subprocess with a fresh build cache)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
from tierkv import LLM, SamplingParams
from tierkv.kv.backends.cpu import ops as native

assert not native.available()
llm = LLM({model!r}, kv_policy="k4v2", kv_cache_memory="8MiB")
assert llm.engine.runner.attention.backend == "fast"
out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
print("tokens", len(out[0].token_ids))
print("reason", native.unavailable_reason())
"""


def test_engine_runs_on_torch_paths_when_the_kernels_cannot_build(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    env = {**os.environ, "CXX": "/bin/false", "XDG_CACHE_HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(model=str(checkpoints["llama"]))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "tokens 4" in run.stdout
    assert "the native kernel did not build" in run.stdout
    assert "the engine runs on its slower torch paths" in run.stderr
