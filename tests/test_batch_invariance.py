"""Batch invariance: a seeded sampled request gives the same tokens alone or inside a batch.

The engine's default in bfloat16 (``EngineConfig.batch_invariant``): every linear layer goes
through ``torch.ops.tierkv.invariant_linear``, whose per-row sums do not depend on the number
of rows, and prompts are cut at fixed positions (``Scheduler``'s ``chunk``).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest
import torch

from tierkv import LLM, SamplingParams
from tierkv.cli_args import add_engine_args, engine_kwargs
from tierkv.config import BATCH_INVARIANT_ENV, EngineConfig
from tierkv.engine.engine import prefill_chunk
from tierkv.extension import available as extension_available
from tierkv.model.layers import linear
from tierkv.model.source import ModelSource

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
SEEDS = 12

needs_kernels = pytest.mark.skipif(
    not extension_available(), reason="the native kernels could not be built here"
)


def _alone_and_batched(
    llm: LLM, vocab: int, max_tokens: int, max_prompt: int
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """12 seeded sampled requests, each run alone, then all of them inside one 16-request
    batch with 4 unseeded others, and again in reverse order with 4 different others."""
    rng = random.Random(0)
    prompts = [
        [rng.randrange(5, vocab) for _ in range(rng.randrange(3, max_prompt))] for _ in range(SEEDS)
    ]
    others = [
        [rng.randrange(5, vocab) for _ in range(rng.randrange(3, max_prompt))] for _ in range(8)
    ]
    seeded = [
        SamplingParams(
            temperature=1.0, top_p=0.95, seed=seed, max_tokens=max_tokens, ignore_eos=True
        )
        for seed in range(SEEDS)
    ]
    free = SamplingParams(temperature=1.0, max_tokens=max_tokens + 3, ignore_eos=True)
    alone = [
        llm.generate([p], s, use_tqdm=False)[0].token_ids
        for p, s in zip(prompts, seeded, strict=True)
    ]
    batch = llm.generate(prompts + others[:4], seeded + [free] * 4, use_tqdm=False)
    reverse = llm.generate(others[4:] + prompts[::-1], [free] * 4 + seeded[::-1], use_tqdm=False)
    return alone, [o.token_ids for o in batch[:SEEDS]], [o.token_ids for o in reverse[4:]][::-1]


@needs_kernels
def test_demo_model_seeds_hold_in_a_16_request_batch_in_bfloat16() -> None:
    # A token budget below the batch's prompts: prefill chunks share steps with decodes and
    # with other chunks, and the longer prompts take several.
    llm = LLM(str(DEMO), dtype="bfloat16", max_model_len=256, max_num_batched_tokens=96)
    assert llm.engine.batch_invariant  # the default in bfloat16
    alone, batch, reverse = _alone_and_batched(llm, 4000, max_tokens=16, max_prompt=120)
    assert sum(a == b for a, b in zip(alone, batch, strict=True)) == SEEDS
    assert sum(a == b for a, b in zip(alone, reverse, strict=True)) == SEEDS
    # The seeds matter: the test could fail.
    assert len({tuple(a) for a in alone}) == SEEDS


@needs_kernels
def test_smollm2_seeds_hold_in_a_16_request_batch_in_bfloat16(smollm2: ModelSource) -> None:
    llm = LLM(str(smollm2.folder), dtype="bfloat16", max_model_len=128, kv_cache_memory="256MiB")
    alone, batch, reverse = _alone_and_batched(llm, 40000, max_tokens=4, max_prompt=40)
    assert sum(a == b for a, b in zip(alone, batch, strict=True)) == SEEDS
    assert sum(a == b for a, b in zip(alone, reverse, strict=True)) == SEEDS


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("out", "inn"), [(37, 100), (130, 33), (257, 256), (9, 1), (300, 1536)])
def test_invariant_linear_gives_each_row_its_result_alone(
    dtype: torch.dtype, out: int, inn: int
) -> None:
    gen = torch.Generator().manual_seed(out * 1000 + inn)
    weight = torch.randn(out, inn, generator=gen).to(dtype)
    bias = torch.randn(out, generator=gen).to(dtype)
    x = torch.randn(140, inn, generator=gen).to(dtype)
    op = torch.ops.tierkv.invariant_linear
    alone = torch.cat([op(x[i : i + 1], weight, bias) for i in range(len(x))])
    for rows in (2, 3, 4, 5, 8, 17, 64, 65, 140):
        for start in (0, len(x) - rows):
            assert torch.equal(
                op(x[start : start + rows], weight, bias), alone[start : start + rows]
            )
    assert torch.equal(torch.ops.tierkv.small_batch_linear(x[:4], weight, bias), alone[:4])
    assert torch.equal(linear(x, weight, bias, invariant=True), alone)
    exact = x.double() @ weight.double().T + bias.double()
    rel = ((alone.double() - exact).abs() / (exact.abs() + 1)).max().item()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-4)
    assert op(x[:0], weight, bias).shape == (0, out)


def test_float16_falls_back_to_one_row_at_a_time() -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(24, 40, generator=gen).half()
    x = torch.randn(9, 40, generator=gen).half()
    alone = torch.cat([torch.nn.functional.linear(r, weight) for r in x.split(1)])
    assert torch.equal(linear(x, weight, invariant=True), alone)


def test_the_mode_defaults_to_the_environment_then_to_the_cheap_dtypes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(BATCH_INVARIANT_ENV, raising=False)
    unset = EngineConfig(model="m")
    assert unset.resolve_batch_invariant(cheap=True) is True
    assert unset.resolve_batch_invariant(cheap=False) is False
    assert EngineConfig(model="m", batch_invariant=False).resolve_batch_invariant(True) is False
    assert EngineConfig(model="m", batch_invariant=True).resolve_batch_invariant(False) is True
    monkeypatch.setenv(BATCH_INVARIANT_ENV, "1")
    assert unset.resolve_batch_invariant(cheap=False) is True
    monkeypatch.setenv(BATCH_INVARIANT_ENV, "0")
    assert unset.resolve_batch_invariant(cheap=True) is False
    assert EngineConfig(model="m", batch_invariant=True).resolve_batch_invariant(False) is True


def test_cli_flag_sets_the_engine_field() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_kwargs(parser.parse_args([]))["batch_invariant"] is None
    assert engine_kwargs(parser.parse_args(["--batch-invariant"]))["batch_invariant"] is True
    assert engine_kwargs(parser.parse_args(["--no-batch-invariant"]))["batch_invariant"] is False


def test_prefill_chunk_leaves_room_for_every_decode() -> None:
    assert prefill_chunk(EngineConfig(model="m")) == 2048 - 64 + 1
    assert prefill_chunk(EngineConfig(model="m", max_num_batched_tokens=48)) == 24
    assert prefill_chunk(EngineConfig(model="m", max_num_batched_tokens=1, max_num_seqs=1)) == 1


@needs_kernels
def test_prompts_are_cut_at_multiples_of_the_chunk_whatever_runs_beside_them() -> None:
    llm = LLM(
        str(DEMO), dtype="bfloat16", max_model_len=256, max_num_batched_tokens=40, max_num_seqs=8
    )
    engine = llm.engine
    assert engine.scheduler.chunk == 33
    # A quantized format's prompts are cut on whole pages of it (its cached blocks end there):
    # the default policy's high tier holds 28 tokens a page here.
    per_page = engine.store.tokens_per_page(engine.policy.high)
    chunk = 33 // per_page * per_page
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for i, n in enumerate((70, 5, 50, 90)):
        engine.add_request([7 + i] * n, params)
    assert {engine.scheduler.cut(r) for r in engine.scheduler.waiting} == {chunk}
    cuts: dict[str, list[int]] = {}
    execute = engine.runner.execute

    def spy(step):  # type: ignore[no-untyped-def]
        assert 0 < sum(step.num_new_tokens) <= 40
        for req, n in zip(step.requests, step.num_new_tokens, strict=True):
            end = req.num_computed_tokens + n
            if end <= len(req.prompt_token_ids):
                cuts.setdefault(req.request_id, []).append(end)
        return execute(step)

    engine.runner.execute = spy  # type: ignore[method-assign]
    while engine.has_unfinished():
        engine.step()
    assert sorted(len(ends) for ends in cuts.values()) == [1, 2, 3, 4]
    for ends in cuts.values():
        assert all(end % chunk == 0 for end in ends[:-1])
