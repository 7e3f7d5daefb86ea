"""Fidelity metrics on tensors and token lists: KL, perplexity, divergence, agreement."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch


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


def top1_agreement(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Fraction of positions whose most likely token is the same under both [..., V]."""
    return float((ref_logprobs.argmax(-1) == logprobs.argmax(-1)).double().mean())


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


def cut_at_eos(ids: Sequence[int], eos_ids: Collection[int]) -> list[int]:
    """``ids`` up to and including the first end-of-sequence token."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return list(ids[: i + 1])
    return list(ids)


def answer_match(
    reference: Sequence[int], other: Sequence[int], eos_ids: Collection[int], length: int
) -> tuple[bool, int]:
    """(identical answers?, first differing index) of two greedy answers of ``length`` tokens.

    Answers are compared up to their first EOS: two answers that end at the same EOS after the
    same tokens are identical whatever either would have produced afterwards. An identical pair
    counts as diverging at ``length`` (never), so that the mean first divergence of a perfect
    method is the full answer length and not the (shorter) length of its answers.
    """
    a, b = cut_at_eos(reference[:length], eos_ids), cut_at_eos(other[:length], eos_ids)
    if a == b:
        return True, length
    return False, first_divergence(a, b)


def retrieval_accuracy(texts: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of generated texts that start with their expected answer."""
    hits = sum(t.startswith(a) for t, a in zip(texts, answers, strict=True))
    return hits / max(1, len(answers))
