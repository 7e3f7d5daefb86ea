"""Long contexts for the fidelity harness: perplexity after long prefixes, long generation.

- Long-prefix windows (``text_windows``): windows of held-out corpus text whose first
  ``prefix`` tokens (2k-8k for real models) are prefilled into the method's cache and not
  scored; every later token is scored from a decode step that reads that cache. The harness's
  ``ppl_ratio``/``kl`` come from these windows (``FidelityConfig.ppl_prefix``), and
  ``long_prefix_fidelity`` runs them alone.
- Long generation (DiffKV's reasoning workloads): the reference cache generates ``n_tokens``
  (>= 512) greedy tokens from a few long-answer prompts (category ``long_form``); each method
  is then teacher-forced along that same path, so every position is compared on the same
  prefix, and scored by mean KL(reference || method) and top-1 agreement. End of sequence is
  ignored so that every path is ``n_tokens`` long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tierkv.eval import corpus
from tierkv.eval.backends import Backend, EngineBackend
from tierkv.eval.engines import engine_for
from tierkv.eval.metrics import kl_divergence, perplexity, top1_agreement
from tierkv.eval.prompts import load_prompts, render, spread

LONG_GEN_TOKENS = 512
LONG_GEN_CATEGORY = "long_form"


@dataclass
class PathScore:
    """A method along fixed token paths: mean KL(reference || method) and top-1 agreement."""

    kl: float
    top1: float


@dataclass
class PrefixScore:
    """A method on long-prefix windows: perplexity, its ratio, KL and top-1 agreement."""

    ppl: float
    ppl_ratio: float
    kl: float
    top1: float


def bos_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text (its BOS token, or nothing)."""
    return list(tokenizer("").input_ids)


def cut(docs: list[list[int]], length: int) -> list[list[int]]:
    """Non-overlapping windows of ``length`` tokens from each document, in order."""
    return [d[i : i + length] for d in docs for i in range(0, len(d) - length + 1, length)]


def spread_windows(items: list[list[int]], n: int, what: str) -> list[list[int]]:
    """``n`` items evenly spread over ``items`` (so every file of the split is sampled)."""
    if len(items) < n:
        raise ValueError(f"the split has only {len(items)} {what}, {n} asked")
    return [items[i * len(items) // n] for i in range(n)]


def text_windows(tokenizer: Any, split: corpus.Split, n: int, length: int) -> list[list[int]]:
    """``n`` windows of ``length`` tokens (BOS included) of the held-out corpus text."""
    texts = corpus.read_text(corpus.held_out_files(split))
    docs = [tokenizer(t, add_special_tokens=False, verbose=False).input_ids for t in texts]
    bos = bos_ids(tokenizer)
    windows = [bos + w for w in cut(docs, length - len(bos))]
    return spread_windows(windows, n, f"windows of {length} tokens")


def long_gen_prompt_ids(tokenizer: Any, split: corpus.Split, n: int) -> list[list[int]]:
    """``n`` long-answer prompts of the split, rendered for the assistant's reply."""
    prompts = [p for p in load_prompts(split) if p.category == LONG_GEN_CATEGORY]
    return [render(tokenizer, p.messages) for p in spread(prompts, n)]


def score_paths(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> PathScore:
    """KL and top-1 agreement over every position of every path."""
    ref, got = torch.cat(list(reference)), torch.cat(list(other))
    return PathScore(float(kl_divergence(ref, got).mean()), top1_agreement(ref, got))


def run_long_generation(
    reference: Backend, methods: Sequence[Backend], prompts: list[list[int]], n_tokens: int
) -> dict[str, PathScore]:
    """Greedy paths of ``reference``, then every backend teacher-forced along them."""
    paths = reference.greedy(prompts, n_tokens)
    ref = reference.forced_paths(prompts, paths)
    out = {reference.name: score_paths(ref, ref)}
    for m in methods:
        out[m.name] = score_paths(ref, m.forced_paths(prompts, paths))
    return out


def long_generation(
    model: Any,
    policies: Sequence[str],
    *,
    split: corpus.Split = "dev",
    prompts: int = 2,
    n_tokens: int = LONG_GEN_TOKENS,
    reference: str = "fp16",
    **engine_kwargs: Any,
) -> dict[str, PathScore]:
    """Long-generation KL and top-1 agreement of each tierkv policy along the reference's path.

    ``model`` is a path or a loaded ``Engine``; ``engine_kwargs`` configure a new engine.
    """
    engine = engine_for(model, **engine_kwargs)
    ids = long_gen_prompt_ids(engine.tokenizer.hf, split, prompts)
    methods = [EngineBackend(engine, p, []) for p in policies if p != reference]
    return run_long_generation(EngineBackend(engine, reference, []), methods, ids, n_tokens)


def long_prefix_fidelity(
    model: Any,
    policies: Sequence[str],
    *,
    split: corpus.Split = "dev",
    windows: int = 4,
    prefix: int = 2048,
    scored: int = 128,
    reference: str = "fp16",
    **engine_kwargs: Any,
) -> dict[str, PrefixScore]:
    """Perplexity ratio, KL and top-1 agreement of each policy after ``prefix`` tokens of text.

    ``windows`` windows of ``prefix + scored`` tokens; ``model`` is a path or an ``Engine``.
    """
    engine = engine_for(model, **engine_kwargs)
    wins = text_windows(engine.tokenizer.hf, split, windows, prefix + scored)
    targets = torch.tensor([w[prefix:] for w in wins], dtype=torch.int64)
    ref = EngineBackend(engine, reference, []).teacher_forced(wins, prefix)
    ref_ppl = perplexity(ref, targets)
    out = {}
    for name in [reference, *[p for p in policies if p != reference]]:
        got = (
            ref
            if name == reference
            else EngineBackend(engine, name, []).teacher_forced(wins, prefix)
        )
        ppl = perplexity(got, targets)
        kl = float(kl_divergence(ref, got).mean())
        out[name] = PrefixScore(ppl, ppl / ref_ppl, kl, top1_agreement(ref, got))
    return out
