"""Plot the current figures of BENCHMARKS.md from their JSON files in docs/.

    python scripts/plot_benchmarks.py      # -> docs/bench_throughput.png, docs/bench_decode.png

Needs matplotlib (``pip install 'tierkv[eval]'``). Reads only what the benchmark commands
wrote; measures nothing itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

DOCS = Path(__file__).resolve().parent.parent / "docs"

# Throughput panels: (JSON file, title); each bar is a row's output tokens/s over the first row's.
THROUGHPUT = (
    ("bench_throughput_longctx_packed.json", "32 x 1536 in / 256 out, 24 MiB KV"),
    ("bench_throughput_longctx_stdlib_packed.json", "the same on text (--dataset-name stdlib)"),
    ("bench_throughput_reasoning_packed.json", "32 x 128 in / 1024 out, 16 MiB KV"),
    ("bench_throughput_hf_longctx_packed.json", "32 x 1536 in / 256 out (vs transformers)"),
    ("bench_throughput_qwen05shape_packed.json", "0.36B Llama, 16 x 512 in / 512 out, 48 MiB KV"),
)
# Decode panels: (JSON file, title).
DECODE = (
    ("bench_decode_default.json", "demo model (4.2M, bfloat16)"),
    ("bench_decode_56m_float32.json", "56M Llama, float32"),
    ("bench_decode_56m_bfloat16.json", "56M Llama, bfloat16"),
)


def plot_throughput(out: Path) -> None:
    """Bars of output tokens/s relative to each workload's first row (tierkv ``fp16``)."""
    fig, axes = plt.subplots(1, len(THROUGHPUT), figsize=(5 * len(THROUGHPUT), 4))
    for ax, (name, title) in zip(axes, THROUGHPUT, strict=True):
        rows = json.loads((DOCS / name).read_text())["results"]
        base = rows[0]["output_tokens_per_s"]
        ratios = [r["output_tokens_per_s"] / base for r in rows]
        ax.bar([r["policy"] for r in rows], ratios, color="tab:blue")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(f"output tok/s vs {rows[0]['policy']}")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_decode(out: Path) -> None:
    """Milliseconds per single-request decode step against context, one line per policy."""
    fig, axes = plt.subplots(1, len(DECODE), figsize=(5 * len(DECODE), 4))
    for ax, (name, title) in zip(axes, DECODE, strict=True):
        rows = json.loads((DOCS / name).read_text())["results"]
        for policy in dict.fromkeys(r["policy"] for r in rows):
            mine = [r for r in rows if r["policy"] == policy]
            ax.plot(
                [r["context"] for r in mine], [r["ms_per_step"] for r in mine], "o-", label=policy
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel("ms per decode step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    plot_throughput(DOCS / "bench_throughput.png")
    plot_decode(DOCS / "bench_decode.png")
    print(f"wrote {DOCS / 'bench_throughput.png'} and {DOCS / 'bench_decode.png'}")


if __name__ == "__main__":
    main()
