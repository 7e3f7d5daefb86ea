"""Batching oracle: many requests together (chunked prefill, preemption) == one at a time."""

from __future__ import annotations

import random
from pathlib import Path

from tierkv import LLM, SamplingParams
from tierkv.engine.engine import Engine


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 1000, 2, 999] + [rng.randint(1, 1000) for _ in range(count - 4)]
    return [[rng.randrange(1, 380) for _ in range(n)] for n in lengths]


def test_batched_with_preemption_equals_one_at_a_time(checkpoints: dict[str, Path]) -> None:
    path = str(checkpoints["llama"])
    prompts = _prompts(32)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    alone = LLM(path, dtype="float32", max_model_len=1024, kv_cache_memory="4MiB", kv_policy="fp16")
    expected = [alone.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]

    # A pool a little larger than one max-length request: requests must wait and be preempted.
    engine_kwargs = dict(
        dtype="float32", max_model_len=1024, max_num_batched_tokens=256, kv_policy="fp16"
    )
    probe = LLM(path, kv_cache_memory="4MiB", **engine_kwargs)
    one_request = probe.engine.store.pages_for(1024) * probe.engine.store.pool.page_bytes
    batched = LLM(path, kv_cache_memory=int(one_request * 1.25), **engine_kwargs)
    outputs = batched.generate(prompts, params, use_tqdm=False)

    stats = batched.kv_stats()
    assert stats["preemptions"] > 0
    assert stats["max_running"] > 1
    assert [o.token_ids for o in outputs] == expected
    assert stats["free_pages"] == stats["total_pages"]
    assert stats["running"] == stats["waiting"] == 0


def test_chunked_prefill_mixes_with_decodes(checkpoints: dict[str, Path]) -> None:
    """A long prompt arriving while others decode is split into chunks within the budget."""
    llm = LLM(
        str(checkpoints["qwen2"]),
        dtype="float32",
        max_model_len=512,
        kv_cache_memory="16MiB",
        max_num_batched_tokens=64,
    )
    engine: Engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request([3, 4, 5], params)
    engine.step()  # first request prefilled, now decoding
    engine.add_request(list(range(1, 300)), params)
    mixed = engine.scheduler.schedule()
    assert mixed.num_new_tokens == [1, 63]  # one decode, then a 63-token prefill chunk
    engine.runner.execute(mixed)
    for group_id in engine.running_request_ids():
        engine.abort(group_id)
    stats = llm.kv_stats()
    assert stats["free_pages"] == stats["total_pages"]


def test_abort_frees_pages_at_once(checkpoints: dict[str, Path]) -> None:
    llm = LLM(
        str(checkpoints["mistral"]), dtype="float32", max_model_len=256, kv_cache_memory="8MiB"
    )
    engine = llm.engine
    rid = engine.add_request(list(range(1, 100)), SamplingParams(max_tokens=50))
    engine.step()
    assert llm.kv_stats()["used_pages"] > 0
    engine.abort(rid)
    stats = llm.kv_stats()
    assert stats["free_pages"] == stats["total_pages"]
    assert not engine.has_unfinished()
