"""Sampling: seeds, filters and penalties against transformers' logits processors, stops, n."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tierkv import LLM, SamplingParams
from tierkv.sampling import SampleRow, _apply_penalties, _filtered_probs, sample


@pytest.fixture(scope="module")
def llm(checkpoints: dict[str, Path]) -> LLM:
    return LLM(
        str(checkpoints["llama"]), dtype="float32", max_model_len=512, kv_cache_memory="16MiB"
    )


def test_seeded_request_is_the_same_alone_and_in_a_batch(llm: LLM) -> None:
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([[7, 8, 9, 10]], target, use_tqdm=False)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 5
    prompts = [[1, 2, 3], [7, 8, 9, 10], list(range(40, 90)), [5], [100, 101], [9] * 20]
    batch = llm.generate(prompts, [others[0], target, *others[1:]], use_tqdm=False)
    assert batch[1].token_ids == alone
    # A different seed really samples something else (the test could fail).
    other_seed = SamplingParams(
        temperature=0.9, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True
    )
    assert llm.generate([[7, 8, 9, 10]], other_seed, use_tqdm=False)[0].token_ids != alone


def test_top_k_one_is_greedy(llm: LLM) -> None:
    greedy = llm.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    top1 = llm.generate(
        [[4, 5, 6]], SamplingParams(temperature=1.5, top_k=1, max_tokens=16), use_tqdm=False
    )
    assert greedy[0].token_ids == top1[0].token_ids


def test_n_completions_and_logprobs(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, logprobs=2, ignore_eos=True)
    out = llm.generate("def add(a, b):", params, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == len(o.token_ids) == 8
        for token, step in zip(o.token_ids, o.logprobs, strict=True):
            assert token in step and 2 <= len(step) <= 3
            assert all(lp.logprob <= 0 for lp in step.values())
            assert {1, 2} <= {lp.rank for lp in step.values()}


def test_stop_string_is_excluded_and_ends_generation(llm: LLM) -> None:
    free = llm.generate(
        "x", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )
    text = free[0].text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate(
        "x",
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]),
        use_tqdm=False,
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]


def test_stop_token_ids_and_max_tokens_finish_reasons(llm: LLM) -> None:
    free = llm.generate(
        [[11, 12]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False
    )[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    stop_id = free.token_ids[4]
    out = llm.generate(
        [[11, 12]],
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]


def _row(params: SamplingParams, prompt: list[int], output: list[int]) -> SampleRow:
    return SampleRow(params, torch.Generator().manual_seed(0), prompt, output)


@settings(max_examples=30, deadline=None)
@given(
    penalty=st.floats(0.5, 2.0),
    prompt=st.lists(st.integers(0, 49), min_size=1, max_size=10),
    output=st.lists(st.integers(0, 49), max_size=10),
    seed=st.integers(0, 1000),
)
def test_repetition_penalty_matches_transformers(
    penalty: float, prompt: list[int], output: list[int], seed: int
) -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(seed))
    ours = logits.clone()
    _apply_penalties(ours, _row(SamplingParams(repetition_penalty=penalty), prompt, output))
    ref = RepetitionPenaltyLogitsProcessor(penalty)(
        torch.tensor([prompt + output]), logits[None].clone()
    )
    torch.testing.assert_close(ours, ref[0])


def test_presence_and_frequency_penalties_follow_openai_formula() -> None:
    logits = torch.zeros(10)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    _apply_penalties(logits, _row(params, [9, 9], [1, 1, 1, 2]))
    expected = torch.zeros(10)
    expected[1] = -(0.25 * 3 + 0.5)
    expected[2] = -(0.25 * 1 + 0.5)
    torch.testing.assert_close(logits, expected)  # prompt tokens (9) are not penalised


@settings(max_examples=30, deadline=None)
@given(
    top_k=st.integers(1, 60),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.5),
    seed=st.integers(0, 1000),
)
def test_filters_keep_the_same_tokens_as_transformers(
    top_k: int, top_p: float, min_p: float, seed: int
) -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(seed)) * 3
    ours = _filtered_probs(logits, [SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)])
    ref = logits.clone()
    for warper in (TopKLogitsWarper(top_k), TopPLogitsWarper(top_p), MinPLogitsWarper(min_p)):
        ref = warper(None, ref)
    ref_kept = torch.isfinite(ref)
    assert torch.equal(ours > 0, ref_kept)
    torch.testing.assert_close(ours, ref.softmax(-1))


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    gen = torch.Generator().manual_seed(0)
    row = SampleRow(SamplingParams(temperature=1.0), gen, [0], [])
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(logits, [row]).tokens[0]] += 1
    torch.testing.assert_close(counts / 3000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_tokens=-1), "max_tokens must be at least 1, got -1"),
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k must be"),
        (dict(min_p=2.0), "min_p must be in"),
        (dict(n=0), "n must be >= 1"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(presence_penalty=3.0), r"presence_penalty must be in \[-2, 2\]"),
        (dict(logprobs=-1), "logprobs must be >= 0"),
        (dict(stop=[""]), "stop strings must not be empty"),
    ],
)
def test_invalid_sampling_values_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
