"""Answer agreement: does a compressed cache keep a chat model's answers?

Each held-out prompt (``tierkv.eval.prompts``) is answered greedily with ``max_new`` tokens
under the reference cache and under the method; an answer counts as kept when its tokens are
identical, or identical up to an end-of-sequence token both reached. All prompts of a method
run as one engine batch (continuous batching), stopping at EOS.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from tierkv.eval.backends import Backend, EngineBackend
from tierkv.eval.engines import engine_for
from tierkv.eval.metrics import answer_match
from tierkv.eval.prompts import ChatPrompt, load_prompts, render, spread

ANSWER_TOKENS = 64


@dataclass
class AnswerScore:
    """Agreement of one method's answers with the reference's.

    ``agreement``: fraction of prompts answered identically; ``first_divergence``: mean index
    of the first differing token (``max_new`` for an identical answer); ``by_category``:
    ``{category: {"agreement", "first_divergence", "n"}}``.
    """

    agreement: float
    first_divergence: float
    by_category: dict[str, dict[str, float]] = field(default_factory=dict)


def score_answers(
    reference: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    categories: Sequence[str],
    eos_ids: Collection[int],
    max_new: int,
) -> AnswerScore:
    """Compare answers prompt by prompt, overall and per category."""
    matches = [
        answer_match(r, a, eos_ids, max_new) for r, a in zip(reference, answers, strict=True)
    ]

    def summary(rows: list[tuple[bool, int]]) -> tuple[float, float]:
        return sum(m for m, _ in rows) / len(rows), sum(f for _, f in rows) / len(rows)

    by_cat: dict[str, dict[str, float]] = {}
    for cat in dict.fromkeys(categories):
        rows = [m for m, c in zip(matches, categories, strict=True) if c == cat]
        agree, first = summary(rows)
        by_cat[cat] = {"agreement": agree, "first_divergence": first, "n": float(len(rows))}
    agree, first = summary(matches)
    return AnswerScore(agree, first, by_cat)


def answer_prompt_ids(tokenizer: Any, prompts: Sequence[ChatPrompt]) -> list[list[int]]:
    """Token ids of each prompt, rendered for the assistant's reply."""
    return [render(tokenizer, p.messages) for p in prompts]


def run_answers(backend: Backend, ids: list[list[int]], max_new: int) -> list[list[int]]:
    """One method's greedy answers to every prompt, in one batch."""
    return backend.greedy(ids, max_new, stop_at_eos=True)


def answer_agreement(
    model: Any,
    policies: Sequence[str],
    prompts: Sequence[ChatPrompt] | None = None,
    *,
    split: str = "dev",
    limit: int | None = None,
    max_new: int = ANSWER_TOKENS,
    reference: str = "fp16",
    **engine_kwargs: Any,
) -> dict[str, AnswerScore]:
    """Answer agreement of each tierkv policy with ``reference`` (a tuning script's entry point).

    Args:
        model: a model path or an ``Engine`` already loaded (reused across calls).
        policies: tierkv KV policies to score (the reference is added as its own row).
        prompts: the prompts; default: ``limit`` prompts spread over ``split``.
        max_new: greedy tokens per answer.
        engine_kwargs: ``EngineConfig`` arguments when ``model`` is a path.
    """
    engine = engine_for(model, **engine_kwargs)
    chosen = list(prompts) if prompts is not None else spread(load_prompts(split), limit)
    ids = answer_prompt_ids(engine.tokenizer.hf, chosen)
    cats = [p.category for p in chosen]
    eos = engine.tokenizer.eos_token_ids
    ref = run_answers(EngineBackend(engine, reference, []), ids, max_new)
    out = {}
    for name in [reference, *[p for p in policies if p != reference]]:
        got = (
            ref if name == reference else run_answers(EngineBackend(engine, name, []), ids, max_new)
        )
        out[name] = score_answers(ref, got, cats, eos, max_new)
    return out
