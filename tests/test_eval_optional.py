"""The evaluation peers' optional dependencies degrade to a one-line reason, never a traceback.

kvpress and optimum-quanto are installed here (the eval extra), so their absence or a
transformers outside kvpress's pin is simulated.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from tierkv.bench.throughput import hf_caches
from tierkv.eval import optional
from tierkv.eval.optional import PeerUnavailable
from tierkv.eval.peers import default_peers, quanto_peer

needs_kvpress = pytest.mark.skipif(
    not optional.installed("kvpress"), reason="kvpress is not installed: pip install 'tierkv[eval]'"
)


@pytest.fixture
def no_optimum(monkeypatch: pytest.MonkeyPatch) -> None:
    """``optimum`` not installed: a None entry makes every import of it fail."""
    for name in [n for n in sys.modules if n == "optimum" or n.startswith("optimum.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "optimum", None)


def test_find_spec_of_a_submodule_raises_when_its_parent_is_missing(no_optimum: None) -> None:
    # The bug: find_spec("optimum.quanto") raised instead of returning None.
    with pytest.raises(ModuleNotFoundError):
        importlib.util.find_spec("optimum.quanto")
    assert not optional.installed("optimum.quanto")


def test_missing_quanto_names_the_pip_command(no_optimum: None) -> None:
    with pytest.raises(PeerUnavailable, match="pip install optimum-quanto"):
        quanto_peer(4)
    caches, skipped = hf_caches(compare_hf=True)
    assert caches == [None]  # the uncompressed HF row still runs
    assert skipped is not None and "QuantizedCache rows skipped" in skipped
    assert "\n" not in skipped
    _, messages = default_peers()
    assert any("pip install optimum-quanto" in m for m in messages)


@needs_kvpress
def test_kvpress_outside_its_transformers_pin_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        return "99.0.0" if name == "transformers" else real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(
        importlib.metadata, "requires", lambda name: ["transformers<5.3,>=4.56.0", "torch"]
    )
    reason = optional.transformers_conflict("kvpress")
    assert reason is not None and "transformers 99.0.0 is installed" in reason
    with pytest.raises(PeerUnavailable, match=r"pip install 'tierkv\[eval\]'"):
        optional.require("kvpress")
    peers, messages = default_peers()
    assert not any("@" in p.name for p in peers)  # no press rows
    assert any(m.startswith("kvpress presses skipped") for m in messages)


@needs_kvpress
def test_kvpress_within_its_pin_is_usable() -> None:
    if not Version(importlib.metadata.version("transformers")) < Version("5.3"):
        pytest.skip("this transformers is outside kvpress 0.5's pin: the eval extra's env is not")
    assert optional.transformers_conflict("kvpress") is None
    optional.require("kvpress")


def test_compare_hf_without_quanto_skips_its_rows_and_exits_0(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "throughput.json"
    args = ["--model", str(checkpoints["llama"]), "--dtype", "float32", "--num-prompts", "2"]
    args += ["--input-len", "16", "--output-len", "2", "--compare-hf", "--json", str(out)]
    # The command line in a process where optimum cannot be imported.
    script = (
        "import sys; sys.modules['optimum'] = None; from tierkv.cli import main; "
        f"sys.exit(main(['bench', 'throughput', *{args!r}]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "QuantizedCache rows skipped" in run.stderr
    assert "pip install optimum-quanto" in run.stderr
    rows = json.loads(out.read_text())["results"]
    # The engine's row, then the uncompressed HF row; no quantized HF row.
    assert [r["policy"] for r in rows][1:] == ["hf-dynamic"]
