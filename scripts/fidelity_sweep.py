"""Run the default fidelity sweep and publish it: a table in BENCHMARKS.md and a Pareto plot.

    python scripts/fidelity_sweep.py                  # dev split, every policy and peer
    python scripts/fidelity_sweep.py --split test     # the reported split

The table goes between ``<!-- fidelity:start -->`` and ``<!-- fidelity:end -->`` in
BENCHMARKS.md (created if absent, the section replaced if present) with the machine, commit
and command; the plot (compression ratio vs ppl ratio, and vs retrieval accuracy at the
longest context) goes to ``docs/fidelity_pareto.png``. Needs ``pip install 'tierkv[eval]'``
for the peers (each missing one is skipped and listed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tierkv.eval.fidelity import (  # noqa: E402
    FidelityConfig,
    FidelityReport,
    FidelityRow,
    format_table,
    run_fidelity,
    write_json,
)
from tierkv.eval.peers import default_peers  # noqa: E402

UNIFORM_POLICIES = ("k8v8", "k8v4", "k8v2", "k4v4", "k4v2", "k4v1", "k2v2")
# The differentiated rows: the engine default (tuned on the dev split), the same tiers with
# DiffKV's published thresholds and no pooling, the default in budget mode at 20% of fp16, and
# the most compressing setting of the dev sweep that kept ppl_ratio under 1.05.
TIERED_POLICIES = (
    "default",
    "k8v4/k4v2:ah=1,al=0.02,pk=1",
    "default@0.2",
    "k8v4/k4v2-g64:ah=4,al=1.2",
)
SIZE_FIELDS = (
    "ppl_windows",
    "ppl_window_len",
    "ppl_prefix",
    "greedy_prompts",
    "greedy_prompt_len",
    "greedy_tokens",
    "retrieval_examples",
)
START, END = "<!-- fidelity:start -->", "<!-- fidelity:end -->"


def sweep_policies() -> list[str]:
    """The uniform policies, then the differentiated ones."""
    return [*UNIFORM_POLICIES, *TIERED_POLICIES]


def _commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{sha}{' (with uncommitted changes)' if dirty else ''}" if sha else "unknown"


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def _family(row: FidelityRow) -> str:
    """Plot series: tierkv, each press kind, quanto, kivi, references."""
    if row.reference == "fp16" and row.policy not in ("hf:full",):
        return "tierkv"
    if "@" in row.policy:
        return row.policy.split("@")[0]
    return re.sub(r"-?\d+$", "", row.policy.replace("-int", "-"))


def plot(report: FidelityReport, path: Path) -> None:
    """Compression ratio vs ppl ratio and vs retrieval accuracy at the longest context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = str(max(report.config["contexts"]))
    series: dict[str, list[FidelityRow]] = {}
    for row in report.results:
        series.setdefault(_family(row), []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    markers = "os^vDP*Xph<>"
    for i, (family, rows) in enumerate(sorted(series.items())):
        rows = sorted(rows, key=lambda r: r.compression_ratio)
        x = [r.compression_ratio for r in rows]
        style = dict(marker=markers[i % len(markers)], label=family, linewidth=1)
        axes[0].plot(x, [r.ppl_ratio for r in rows], **style)
        axes[1].plot(x, [r.retrieval_acc[ctx] for r in rows], **style)
        if family == "tierkv":
            for r in rows:
                axes[0].annotate(r.policy, (r.compression_ratio, r.ppl_ratio), fontsize=7)
    axes[0].set(
        xlabel="compression ratio (fp16 bytes / bytes, metadata included)",
        ylabel="perplexity ratio (lower is better)",
        title="perplexity vs compression",
    )
    axes[1].set(
        xlabel="compression ratio",
        ylabel=f"retrieval accuracy at {ctx} tokens",
        title="retrieval vs compression",
        ylim=(-0.05, 1.05),
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(f"KV fidelity on {Path(report.model).name} ({report.split} split)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def section(report: FidelityReport, command: str, minutes: float, plot_path: str) -> str:
    """The Markdown between the markers."""
    cfg = report.config
    notes = "\n".join(f"- skipped: {s}" for s in report.skipped)
    return f"""{START}
## KV fidelity ({report.split} split)

- machine: {_machine()}
- commit: {_commit()}
- command: `{command}` ({minutes:.1f} min)
- model: `{Path(report.model).name}`; perplexity over {cfg["ppl_windows"]} windows of \
{cfg["ppl_window_len"]} tokens, the first {cfg["ppl_prefix"]} prefilled as the prompt and the \
rest teacher-forced through decode steps; greedy agreement over {cfg["greedy_prompts"]} prompts \
x {cfg["greedy_tokens"]} tokens; retrieval over {cfg["retrieval_examples"]} prompts per length.
- tierkv rows: bytes measured from the page pool (codes, scales, zeros, scores, positions, page
  tables) on a {max(cfg["contexts"])}-token prompt, compared with tierkv `fp16`. Peer rows:
  bytes analytic with the same accounting, compared with transformers' uncompressed cache
  (`hf:full`, itself compared with tierkv `fp16`). kvpress presses prune the prompt only.
  `kivi-*` is a simulated KIVI-style quantizer inside the harness, not a tierkv pool policy.
- `*`: kvpress's AdaKV masks pruned keys per head: its bytes are what a per-head store would
  need; kvpress itself frees no memory.
{notes}

{format_table(report, markdown=True)}

![fidelity Pareto plot]({plot_path})
{END}"""


def write_section(path: Path, text: str) -> None:
    """Replace the marked section of ``path`` (or append it; create the file if absent)."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# tierkv benchmarks\n"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: text, old)
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new, encoding="utf-8")


def main() -> int:
    defaults = FidelityConfig(model="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "assets" / "demo-model"))
    p.add_argument("--split", default="dev", choices=["dev", "test"])
    p.add_argument("--no-peers", action="store_true", help="tierkv policies only")
    p.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "fidelity_pareto.png"))
    p.add_argument("--json", default=None, help="also write the JSON results here")
    for name in SIZE_FIELDS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    p.add_argument(
        "--plot-only",
        metavar="JSON",
        default=None,
        help="redraw the plot from a results JSON (written by --json) and stop",
    )
    args = p.parse_args()
    if args.plot_only:
        doc = json.loads(Path(args.plot_only).read_text(encoding="utf-8"))
        rows = [FidelityRow(**r) for r in doc["results"]]
        plot(FidelityReport(doc["model"], doc["split"], doc["config"], rows), Path(args.plot))
        return 0
    sizes = {name: getattr(args, name) for name in SIZE_FIELDS}
    config = FidelityConfig(model=args.model, split=args.split, **sizes)
    peers, skipped = ([], []) if args.no_peers else default_peers()
    for message in skipped:
        print(f"note: {message}", file=sys.stderr)
    start = time.time()
    report = run_fidelity(config, ["fp16", *sweep_policies()], peers, skipped)
    minutes = (time.time() - start) / 60
    print(format_table(report))
    print(f"{minutes:.1f} min")
    plot_path = Path(args.plot)
    plot(report, plot_path)
    benchmarks = Path(args.benchmarks)
    rel_plot = os.path.relpath(plot_path, benchmarks.parent)
    command = "python scripts/fidelity_sweep.py " + shlex.join(sys.argv[1:])
    write_section(benchmarks, section(report, command.strip(), minutes, rel_plot))
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
