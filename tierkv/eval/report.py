"""The fidelity report: one row per method, its JSON form and its text table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class FidelityRow:
    """One method's fidelity against its reference (the JSON ``results`` entries).

    The first fields are the demo-model harness's; the rest come from the real-model tasks
    (``tierkv.eval.answers``, ``tierkv.eval.needle``, ``tierkv.eval.longgen``). A task that did
    not run leaves ``None`` (a number) or ``{}`` (a table), so every row has every key.
    """

    policy: str
    kv_bytes_per_token: float
    compression_ratio: float
    ppl_ratio: float
    kl: float
    greedy_agreement: float | None
    retrieval_acc: dict[str, float]
    first_divergence: float | None
    ppl: float
    reference: str
    memory_freed: bool = True
    note: str = ""
    # Top-1 agreement of the next-token distributions on the perplexity windows.
    top1_agreement: float | None = None
    # Tokens of prompt before the scored part of each perplexity window.
    ppl_prefix: int | None = None
    answer_agreement: float | None = None
    answer_first_divergence: float | None = None
    answer_by_category: dict[str, dict[str, float]] = field(default_factory=dict)
    needle_acc: dict[str, float] = field(default_factory=dict)
    needle_reference_acc: dict[str, float] = field(default_factory=dict)
    # Of the needles the reference found, the fraction this method found too.
    needle_kept: dict[str, float] = field(default_factory=dict)
    kv_bytes_per_token_at: dict[str, float] = field(default_factory=dict)
    compression_ratio_at: dict[str, float] = field(default_factory=dict)
    long_gen_kl: float | None = None
    long_gen_top1: float | None = None


@dataclass
class FidelityReport:
    """All rows of one run, with what was skipped and why."""

    model: str
    split: str
    config: dict[str, Any]
    results: list[FidelityRow]
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "split": self.split,
            "config": self.config,
            "results": [asdict(r) for r in self.results],
            "skipped": self.skipped,
        }


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _columns(report: FidelityReport) -> list[tuple[str, Any]]:
    """(header, cell function) of every column that some row has a value for."""
    rows = report.results
    cols: list[tuple[str, Any]] = [
        ("bytes/tok", lambda r: f"{r.kv_bytes_per_token:.1f}"),
        ("ratio", lambda r: f"{r.compression_ratio:.2f}x"),
        ("ppl_ratio", lambda r: f"{r.ppl_ratio:.4f}"),
        ("KL", lambda r: f"{r.kl:.5f}"),
    ]
    if any(r.greedy_agreement is not None for r in rows):
        cols.append(("greedy", lambda r: _num(r.greedy_agreement, ".3f")))
        cols.append(("1st div", lambda r: _num(r.first_divergence, ".0f")))
    for c in rows[0].retrieval_acc if rows else []:
        cols.append((f"ret@{c}", lambda r, c=c: _num(r.retrieval_acc.get(c), ".2f")))
    if any(r.answer_agreement is not None for r in rows):
        cols.append(("answers", lambda r: _num(r.answer_agreement, ".3f")))
        cols.append(("ans div", lambda r: _num(r.answer_first_divergence, ".1f")))
    for c in rows[0].needle_acc if rows else []:
        cols.append(
            (f"needle@{c}", lambda r, c=c: f"{r.needle_acc[c]:.2f}/{r.needle_reference_acc[c]:.2f}")
        )
    for c in rows[0].compression_ratio_at if rows else []:
        cols.append((f"ratio@{c}", lambda r, c=c: f"{r.compression_ratio_at[c]:.2f}x"))
    if any(r.long_gen_kl is not None for r in rows):
        cols.append(("gen KL", lambda r: _num(r.long_gen_kl, ".5f")))
        cols.append(("gen top1", lambda r: _num(r.long_gen_top1, ".3f")))
    return cols


def format_table(report: FidelityReport, markdown: bool = False) -> str:
    """The rows as an aligned text table (or a Markdown table).

    Needle cells read ``method/reference``: the method's accuracy means nothing unless the
    uncompressed cache finds the needle, so both are shown side by side.
    """
    cols = _columns(report)
    head = ["method"] + [h for h, _ in cols] + ["vs"]
    lines = []
    for r in report.results:
        name = r.policy if r.memory_freed else f"{r.policy}*"
        lines.append([name] + [cell(r) for _, cell in cols] + [r.reference])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in [head, *lines])


def format_categories(report: FidelityReport) -> str:
    """Answer agreement per prompt category, one line per method (empty when none ran)."""
    rows = [r for r in report.results if r.answer_by_category]
    if not rows:
        return ""
    cats = list(rows[0].answer_by_category)
    head = "answers by category: " + ", ".join(
        f"{c} ({int(rows[0].answer_by_category[c]['n'])})" for c in cats
    )
    lines = [head]
    for r in rows:
        cells = [f"{r.answer_by_category[c]['agreement']:.2f}" for c in cats]
        lines.append(f"  {r.policy}: " + " ".join(cells))
    return "\n".join(lines)


def write_json(path: str | Path, report: FidelityReport) -> None:
    """Write the report as JSON (``{"model", "split", "results": [...]}`` plus config)."""
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
