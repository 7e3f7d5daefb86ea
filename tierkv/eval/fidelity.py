"""Fidelity harness: compressed vs full KV cache on the same model and text.

Each method (a tierkv KV policy or a peer) is compared with its uncompressed reference on the
same held-out text (``tierkv.eval.corpus``):

- ``ppl_ratio``: perplexity / reference perplexity over teacher-forced windows. A window's first
  ``ppl_prefix`` tokens are the prompt: prefilled (tierkv policies compress it as it is written,
  presses prune it at the end of prefill) and not scored. Every later token is scored from a
  decode step that reads the method's cache, then fed as the true next token.
- ``kl``: mean KL(reference || method) of the full next-token distributions at those positions.
- ``greedy_agreement``: greedy continuations of ``greedy_tokens`` tokens from real prompts; the
  fraction of positions before the first divergence from the reference's, averaged over prompts
  (``first_divergence`` is the mean index of that first divergence; no divergence counts as
  the continuation's length).
- ``retrieval_acc``: exact-match accuracy of greedy answers on ``tierkv.eval.retrieval``
  prompts at each context length.
- ``kv_bytes_per_token`` on a prompt of the longest context: measured from the pool for tierkv
  (all metadata included), analytic for peers (``tierkv.eval.peers``); ``compression_ratio`` is
  the tierkv ``fp16`` bytes over the row's bytes.

tierkv policies are compared with tierkv ``fp16``; peers with transformers' uncompressed cache
(``hf:full``), whose own row compares it with tierkv ``fp16``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tierkv.config import EngineConfig
from tierkv.engine.engine import Engine, resolve_dtype
from tierkv.eval import corpus
from tierkv.eval.backends import Backend, EngineBackend, HFBackend, load_hf_model
from tierkv.eval.peers import Peer, reference_peer
from tierkv.eval.retrieval import make_retrieval_example

REFERENCE_POLICY = "fp16"
# Room left after a retrieval prompt for its answer (as in the demo model's own evaluation).
ANSWER_ROOM = 16
RETRIEVAL_KEYS = 8


@dataclass(frozen=True)
class FidelityConfig:
    """What to evaluate and how much of it; the sizes trade precision for time.

    SnapKV-based peers score the prompt with its last 64 queries, so their prompts
    (``ppl_prefix``, ``greedy_prompt_len``) must be longer than 64 tokens.
    """

    model: str
    split: corpus.Split = "dev"
    contexts: tuple[int, ...] = (512, 1024, 2048)
    ppl_windows: int = 6
    ppl_window_len: int = 512
    ppl_prefix: int = 256
    greedy_prompts: int = 3
    greedy_prompt_len: int = 256
    greedy_tokens: int = 256
    retrieval_examples: int = 10
    dtype: str = "auto"
    kv_cache_memory: str = "1GiB"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.ppl_prefix < self.ppl_window_len:
            raise ValueError(
                f"ppl_prefix must be in (0, ppl_window_len={self.ppl_window_len}), "
                f"got {self.ppl_prefix}"
            )
        counts = ("ppl_windows", "greedy_prompts", "greedy_tokens", "retrieval_examples")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.contexts or min(self.contexts) <= ANSWER_ROOM:
            raise ValueError(f"retrieval contexts must be longer than {ANSWER_ROOM} tokens")


@dataclass
class FidelityRow:
    """One method's fidelity against its reference (the JSON ``results`` entries)."""

    policy: str
    kv_bytes_per_token: float
    compression_ratio: float
    ppl_ratio: float
    kl: float
    greedy_agreement: float
    retrieval_acc: dict[str, float]
    first_divergence: float
    ppl: float
    reference: str
    memory_freed: bool = True
    note: str = ""


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


@dataclass
class RetrievalItem:
    """One retrieval prompt (token ids) and its expected answer text."""

    ids: list[int]
    answer: str
    max_new: int


@dataclass
class FidelityData:
    """The token ids every method sees, built once per run."""

    windows: list[list[int]]
    greedy_prompts: list[list[int]]
    retrieval: dict[int, list[RetrievalItem]]
    measure_ids: list[int]


@dataclass
class RawOutputs:
    """What one method produced on ``FidelityData``."""

    logprobs: torch.Tensor
    greedy: list[list[int]]
    retrieval_text: dict[int, list[str]]
    kv_bytes_per_token: float


# -- metrics ---------------------------------------------------------------------------------


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per position of two log-prob tensors [..., V] (float64 sums)."""
    ref = ref_logprobs.double()
    return (ref.exp() * (ref - logprobs.double())).sum(-1).clamp(min=0)


def target_nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood [...] of ``targets`` under ``logprobs`` [..., V]."""
    return -logprobs.double().gather(-1, targets[..., None]).squeeze(-1)


def perplexity(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean NLL) of the targets."""
    return math.exp(float(target_nll(logprobs, targets).mean()))


def first_divergence(reference: Sequence[int], other: Sequence[int]) -> int:
    """Index of the first position where the sequences differ (the shorter length if none)."""
    for i, (a, b) in enumerate(zip(reference, other, strict=False)):
        if a != b:
            return i
    return min(len(reference), len(other))


def greedy_agreement(
    references: Sequence[Sequence[int]], others: Sequence[Sequence[int]]
) -> tuple[float, float]:
    """(mean fraction of positions before the first divergence, mean first-divergence index)."""
    firsts = [first_divergence(r, o) for r, o in zip(references, others, strict=True)]
    fractions = [f / max(1, len(r)) for f, r in zip(firsts, references, strict=True)]
    return sum(fractions) / len(fractions), sum(firsts) / len(firsts)


def retrieval_accuracy(texts: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of generated texts that start with their expected answer."""
    hits = sum(t.startswith(a) for t, a in zip(texts, answers, strict=True))
    return hits / max(1, len(answers))


# -- data ------------------------------------------------------------------------------------


def _bos(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text (its BOS token, or nothing)."""
    return list(tokenizer("").input_ids)


def _cut(docs: list[list[int]], length: int) -> list[list[int]]:
    """Non-overlapping windows of ``length`` tokens from each document, in order."""
    return [d[i : i + length] for d in docs for i in range(0, len(d) - length + 1, length)]


def _spread(items: list[list[int]], n: int, what: str) -> list[list[int]]:
    """``n`` items evenly spread over ``items`` (so every file of the split is sampled)."""
    if len(items) < n:
        raise ValueError(f"the split has only {len(items)} {what}, {n} asked")
    return [items[i * len(items) // n] for i in range(n)]


def build_data(config: FidelityConfig, tokenizer: Any, max_model_len: int) -> FidelityData:
    """Windows, greedy prompts and retrieval prompts from the held-out ``config.split``."""
    texts = corpus.read_text(corpus.held_out_files(config.split))
    bos = _bos(tokenizer)
    # Whole files are longer than the model's context: they are cut into windows below.
    docs = [tokenizer(t, add_special_tokens=False, verbose=False).input_ids for t in texts]
    windows = _spread(
        [bos + w for w in _cut(docs, config.ppl_window_len - len(bos))],
        config.ppl_windows,
        f"windows of {config.ppl_window_len} tokens",
    )
    # Greedy prompts start half a window later than the scored windows: other text.
    shifted = [d[config.ppl_window_len // 2 :] for d in docs]
    greedy = _spread(
        [bos + w for w in _cut(shifted, config.greedy_prompt_len - len(bos))],
        config.greedy_prompts,
        f"prompts of {config.greedy_prompt_len} tokens",
    )
    longest = max(config.contexts)
    # Room for the 3 tokens of the measuring request (see EngineBackend.kv_bytes_per_token).
    measure = bos + [t for d in docs for t in d][: min(longest, max_model_len) - 4 - len(bos)]
    filler = "\n".join(texts)
    retrieval: dict[int, list[RetrievalItem]] = {}
    for ctx in config.contexts:
        rng = random.Random(config.seed * 100_003 + ctx)
        items = []
        for _ in range(config.retrieval_examples):
            ex = make_retrieval_example(
                rng, tokenizer, ctx - ANSWER_ROOM, filler, n_keys=RETRIEVAL_KEYS
            )
            n_new = len(tokenizer(ex.answer, add_special_tokens=False).input_ids) + 1
            items.append(RetrievalItem(tokenizer(ex.prompt).input_ids, ex.answer, n_new))
        retrieval[ctx] = items
    return FidelityData(windows, greedy, retrieval, measure)


# -- running ---------------------------------------------------------------------------------


def run_backend(
    backend: Backend, data: FidelityData, config: FidelityConfig, decode: Callable[[list[int]], str]
) -> RawOutputs:
    """Everything the metrics need from one method."""
    logprobs = backend.teacher_forced(data.windows, config.ppl_prefix)
    greedy = backend.greedy(data.greedy_prompts, config.greedy_tokens)
    texts: dict[int, list[str]] = {}
    for ctx, items in data.retrieval.items():
        # One call per answer length keeps exact-length greedy runs (lengths rarely differ).
        texts[ctx] = [""] * len(items)
        by_new: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            by_new.setdefault(it.max_new, []).append(i)
        for n_new, rows in by_new.items():
            outs = backend.greedy([items[i].ids for i in rows], n_new)
            for i, out in zip(rows, outs, strict=True):
                texts[ctx][i] = decode(out)
    return RawOutputs(logprobs, greedy, texts, backend.kv_bytes_per_token())


def compare(
    name: str,
    raw: RawOutputs,
    ref: RawOutputs,
    data: FidelityData,
    config: FidelityConfig,
    fp16_bytes: float,
    reference: str,
) -> FidelityRow:
    """The metrics of ``raw`` against the reference's outputs on the same data."""
    targets = torch.tensor([w[config.ppl_prefix :] for w in data.windows], dtype=torch.int64)
    ppl = perplexity(raw.logprobs, targets)
    agreement, first = greedy_agreement(ref.greedy, raw.greedy)
    retrieval = {
        str(ctx): retrieval_accuracy(raw.retrieval_text[ctx], [it.answer for it in items])
        for ctx, items in data.retrieval.items()
    }
    return FidelityRow(
        policy=name,
        kv_bytes_per_token=raw.kv_bytes_per_token,
        compression_ratio=fp16_bytes / raw.kv_bytes_per_token,
        ppl_ratio=ppl / perplexity(ref.logprobs, targets),
        kl=float(kl_divergence(ref.logprobs, raw.logprobs).mean()),
        greedy_agreement=agreement,
        retrieval_acc=retrieval,
        first_divergence=first,
        ppl=ppl,
        reference=reference,
    )


def run_fidelity(
    config: FidelityConfig,
    policies: Sequence[str],
    peers: Sequence[Peer] = (),
    skipped: Sequence[str] = (),
    progress: bool = True,
) -> FidelityReport:
    """Evaluate tierkv ``policies`` and ``peers``; the ``fp16`` reference is always the first row.

    Peers need transformers' model of the checkpoint; ``hf:full`` is added as their reference
    when any peer runs.
    """
    engine = Engine(
        EngineConfig.from_kwargs(
            config.model,
            dtype=config.dtype,
            kv_cache_memory=config.kv_cache_memory,
            seed=config.seed,
        )
    )
    # Load both models up front: a checkpoint being rewritten (a training run) must not give
    # the engine and the peers different weights.
    model = load_hf_model(config.model, resolve_dtype(config.dtype)) if peers else None
    tokenizer = engine.tokenizer.hf
    data = build_data(config, tokenizer, engine.max_model_len)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    names = [REFERENCE_POLICY] + [p for p in policies if p != REFERENCE_POLICY]
    others = [p for p in peers if p.name != "hf:full"]
    total = len(names) + (1 + len(others) if model is not None else 0)
    bar = tqdm(total=total, desc="fidelity", unit="method", disable=not progress)

    def run(backend: Backend) -> RawOutputs:
        bar.set_postfix_str(backend.name)
        raw = run_backend(backend, data, config, decode)
        bar.update()
        return raw

    ref = run(EngineBackend(engine, REFERENCE_POLICY, data.measure_ids))
    fp16_bytes = ref.kv_bytes_per_token
    rows = [compare(REFERENCE_POLICY, ref, ref, data, config, fp16_bytes, "fp16")]
    for name in names[1:]:
        raw = run(EngineBackend(engine, name, data.measure_ids))
        rows.append(compare(name, raw, ref, data, config, fp16_bytes, "fp16"))
    if model is not None:
        measure_len = len(data.measure_ids)
        hf_ref = run(HFBackend(model, reference_peer(), measure_len))
        rows.append(compare("hf:full", hf_ref, ref, data, config, fp16_bytes, "fp16"))
        for peer in others:
            raw = run(HFBackend(model, peer, measure_len))
            row = compare(peer.name, raw, hf_ref, data, config, fp16_bytes, "hf:full")
            row.memory_freed, row.note = peer.memory_freed, peer.note
            rows.append(row)
    bar.close()
    return FidelityReport(config.model, config.split, asdict(config), rows, list(skipped))


# -- output ----------------------------------------------------------------------------------


def format_table(report: FidelityReport, markdown: bool = False) -> str:
    """The rows as an aligned text table (or a Markdown table)."""
    contexts = list(report.results[0].retrieval_acc) if report.results else []
    head = ["method", "bytes/tok", "ratio", "ppl_ratio", "KL", "greedy", "1st div"]
    head += [f"ret@{c}" for c in contexts] + ["vs"]
    lines = []
    for r in report.results:
        name = r.policy if r.memory_freed else f"{r.policy}*"
        cells = [
            name,
            f"{r.kv_bytes_per_token:.1f}",
            f"{r.compression_ratio:.2f}x",
            f"{r.ppl_ratio:.4f}",
            f"{r.kl:.5f}",
            f"{r.greedy_agreement:.3f}",
            f"{r.first_divergence:.0f}",
        ]
        cells += [f"{r.retrieval_acc[c]:.2f}" for c in contexts] + [r.reference]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in [head, *lines])


def write_json(path: str | Path, report: FidelityReport) -> None:
    """Write the report as JSON (``{"model", "split", "results": [...]}`` plus config)."""
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
