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

Real-model tasks (``tierkv eval fidelity --suite real``; each skipped when its count is 0):

- ``answer_agreement``/``answer_first_divergence``/``answer_by_category``: greedy answers to
  the shipped held-out chat prompts (``tierkv.eval.answers``).
- ``needle_acc`` beside ``needle_reference_acc`` per context length, and ``needle_kept`` (of
  the needles the reference found, the share the method found): ``tierkv.eval.needle``.
- ``kv_bytes_per_token_at``/``compression_ratio_at``: bytes measured from the pool on the
  needle prompts of each length (the row's ``kv_bytes_per_token`` is the longest length's).
- ``long_gen_kl``/``long_gen_top1`` along the reference's long greedy paths, and
  ``top1_agreement`` on the perplexity windows (``tierkv.eval.longgen``), whose prefix
  (``ppl_prefix``) is 2k tokens in the real suite.

tierkv policies are compared with tierkv ``fp16``; peers with transformers' uncompressed cache
(``hf:full``), whose own row compares it with tierkv ``fp16``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from tierkv.engine.engine import resolve_dtype
from tierkv.eval.answers import run_answers, score_answers
from tierkv.eval.backends import Backend, EngineBackend, HFBackend, load_hf_model
from tierkv.eval.engines import engine_for
from tierkv.eval.inputs import (  # noqa: F401 (re-exported)
    ANSWER_ROOM,
    FidelityConfig,
    FidelityData,
    RetrievalItem,
    build_data,
)
from tierkv.eval.longgen import score_paths
from tierkv.eval.metrics import (  # noqa: F401 (re-exported: the harness's public names)
    first_divergence,
    greedy_agreement,
    kl_divergence,
    perplexity,
    retrieval_accuracy,
    target_nll,
    top1_agreement,
)
from tierkv.eval.needle import ANSWER_TOKENS as NEEDLE_TOKENS
from tierkv.eval.needle import needle_found
from tierkv.eval.peers import Peer, reference_peer
from tierkv.eval.report import FidelityReport, FidelityRow, format_table, write_json  # noqa: F401

REFERENCE_POLICY = "fp16"


@dataclass
class RawOutputs:
    """What one method produced on ``FidelityData``."""

    logprobs: torch.Tensor
    greedy: list[list[int]]
    retrieval_text: dict[int, list[str]]
    kv_bytes_per_token: float
    answers: list[list[int]] = field(default_factory=list)
    needle_hits: dict[int, list[bool]] = field(default_factory=dict)
    bytes_at: dict[int, float] = field(default_factory=dict)
    long_gen: list[torch.Tensor] = field(default_factory=list)


# -- running ---------------------------------------------------------------------------------


def run_backend(
    backend: Backend, data: FidelityData, config: FidelityConfig, decode: Callable[[list[int]], str]
) -> RawOutputs:
    """Everything the metrics need from one method."""
    logprobs = backend.teacher_forced(data.windows, config.ppl_prefix)
    greedy = (
        backend.greedy(data.greedy_prompts, config.greedy_tokens) if data.greedy_prompts else []
    )
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
    raw = RawOutputs(logprobs, greedy, texts, 0.0)
    if data.answer_ids:
        raw.answers = run_answers(backend, data.answer_ids, config.answer_tokens)
    for ctx, examples in data.needles.items():
        # One prompt at a time: the pool's bytes per token are read with it alone.
        runs = [backend.measured_greedy(ex.ids, NEEDLE_TOKENS) for ex in examples]
        raw.needle_hits[ctx] = [
            needle_found(decode(out), ex.answer)
            for (out, _), ex in zip(runs, examples, strict=True)
        ]
        raw.bytes_at[ctx] = sum(b for _, b in runs) / len(runs)
    if data.long_gen_paths:
        raw.long_gen = backend.forced_paths(data.long_gen_prompts, data.long_gen_paths)
    # The needle prompts of the longest length already measured the pool at that length.
    measured = raw.bytes_at.get(max(config.contexts))
    raw.kv_bytes_per_token = measured if measured is not None else backend.kv_bytes_per_token()
    return raw


def compare(
    name: str,
    raw: RawOutputs,
    ref: RawOutputs,
    data: FidelityData,
    config: FidelityConfig,
    fp16_bytes: float,
    reference: str,
    fp16_at: dict[int, float] | None = None,
) -> FidelityRow:
    """The metrics of ``raw`` against the reference's outputs on the same data.

    ``fp16_at``: tierkv ``fp16``'s bytes per token at each needle length (the denominators of
    ``compression_ratio_at``'s ratios are taken at the same length).
    """
    targets = torch.tensor([w[config.ppl_prefix :] for w in data.windows], dtype=torch.int64)
    ppl = perplexity(raw.logprobs, targets)
    agreement, first = greedy_agreement(ref.greedy, raw.greedy) if raw.greedy else (None, None)
    retrieval = {
        str(ctx): retrieval_accuracy(raw.retrieval_text[ctx], [it.answer for it in items])
        for ctx, items in data.retrieval.items()
    }
    row = FidelityRow(
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
        top1_agreement=top1_agreement(ref.logprobs, raw.logprobs),
        ppl_prefix=config.ppl_prefix,
    )
    if raw.answers:
        score = score_answers(
            ref.answers, raw.answers, data.answer_categories, data.eos_ids, config.answer_tokens
        )
        row.answer_agreement = score.agreement
        row.answer_first_divergence = score.first_divergence
        row.answer_by_category = score.by_category
    for ctx, hits in raw.needle_hits.items():
        ref_hits = ref.needle_hits[ctx]
        kept = [h for h, r in zip(hits, ref_hits, strict=True) if r]
        row.needle_acc[str(ctx)] = sum(hits) / len(hits)
        row.needle_reference_acc[str(ctx)] = sum(ref_hits) / len(ref_hits)
        row.needle_kept[str(ctx)] = sum(kept) / len(kept) if kept else float("nan")
        row.kv_bytes_per_token_at[str(ctx)] = raw.bytes_at[ctx]
        base = (fp16_at or ref.bytes_at)[ctx]
        row.compression_ratio_at[str(ctx)] = base / raw.bytes_at[ctx]
    if raw.long_gen:
        path = score_paths(ref.long_gen, raw.long_gen)
        row.long_gen_kl, row.long_gen_top1 = path.kl, path.top1
    return row


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
    engine = engine_for(
        config.model, dtype=config.dtype, kv_cache_memory=config.kv_cache_memory, seed=config.seed
    )
    # Load both models up front: a checkpoint being rewritten (a training run) must not give
    # the engine and the peers different weights.
    model = load_hf_model(config.model, resolve_dtype(config.dtype)) if peers else None
    tokenizer = engine.tokenizer.hf
    data = build_data(
        config, tokenizer, engine.max_model_len, frozenset(engine.tokenizer.eos_token_ids)
    )

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

    ref_backend = EngineBackend(engine, REFERENCE_POLICY, data.measure_ids)
    if data.long_gen_prompts:
        # Every method, peers included, is teacher-forced along tierkv fp16's own path.
        data.long_gen_paths = ref_backend.greedy(data.long_gen_prompts, config.long_gen_tokens)
    ref = run(ref_backend)
    fp16_bytes = ref.kv_bytes_per_token
    rows = [compare(REFERENCE_POLICY, ref, ref, data, config, fp16_bytes, "fp16")]
    for name in names[1:]:
        raw = run(EngineBackend(engine, name, data.measure_ids))
        rows.append(compare(name, raw, ref, data, config, fp16_bytes, "fp16"))
    if model is not None:
        measure_len = len(data.measure_ids)
        eos = frozenset(engine.tokenizer.eos_token_ids)
        hf_ref = run(HFBackend(model, reference_peer(), measure_len, eos))
        rows.append(compare("hf:full", hf_ref, ref, data, config, fp16_bytes, "fp16"))
        for peer in others:
            raw = run(HFBackend(model, peer, measure_len, eos))
            row = compare(peer.name, raw, hf_ref, data, config, fp16_bytes, "hf:full", ref.bytes_at)
            row.memory_freed, row.note = peer.memory_freed, peer.note
            rows.append(row)
    bar.close()
    return FidelityReport(config.model, config.split, asdict(config), rows, [*skipped, *data.notes])
