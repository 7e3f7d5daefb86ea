"""KV policies: parsing, bytes per token (analytic vs measured), per-request policies."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tierkv import LLM, KVPolicy, SamplingParams
from tierkv.kv.formats.quant import FORMATS, FULL
from tierkv.kv.policy.spec import SUPPORTED_POLICIES


def test_every_format_parses_to_a_uniform_policy() -> None:
    assert KVPolicy.parse("fp16").high == FULL
    assert KVPolicy.parse("full") == KVPolicy.parse(" FP16 ")
    for name, fmt in FORMATS.items():
        if fmt.quantized:
            policy = KVPolicy.parse(name)
            assert (policy.name, policy.high) == (name, fmt)
    policy = KVPolicy.parse("k4v2-g64")
    assert policy.name == "k4v2-g64" and policy.high == FORMATS["k4v2"].with_group_size(64)
    assert KVPolicy.parse(policy) is policy


@pytest.mark.parametrize("bad", ["k3v9", "k4v2-g", "k4v2-g0", "k4v2g64", "fp8", ""])
def test_unknown_policies_list_the_supported_ones(bad: str) -> None:
    with pytest.raises(ValueError, match=r"KV policy .*(supported: fp16|group size)"):
        KVPolicy.parse(bad)


@pytest.fixture(scope="module")
def llm(checkpoints: dict[str, Path]) -> LLM:
    return LLM(
        str(checkpoints["llama"]),
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory="8MiB",
        max_num_batched_tokens=1024,
        kv_policy="fp16",
    )


@pytest.mark.parametrize("name", [*SUPPORTED_POLICIES, "k4v2-g8", "k8v4-g12"])
def test_analytic_bytes_per_token_matches_measured_pool_use(llm: LLM, name: str) -> None:
    engine = llm.engine
    policy = KVPolicy.parse(name)
    rid = engine.add_request(
        [1 + i % 380 for i in range(900)],
        SamplingParams(max_tokens=4, kv_policy=name, ignore_eos=True),
    )
    engine.step()  # the whole prompt in one chunk
    stats = llm.kv_stats()
    engine.abort(rid)
    per_token = engine.store.bytes_per_token(policy.high)
    # The residual ring of a uniform quantized policy is a constant per request.
    analytic = per_token + engine.store.residual_bytes(policy) / 900
    assert stats["kv_bytes_per_token_measured"] == pytest.approx(analytic, rel=0.05)
    if name == "fp16":
        assert per_token == stats["kv_bytes_per_token"]
        assert engine.store.residual_bytes(policy) == 0
    else:
        assert per_token < engine.store.bytes_per_token(FULL)
        assert engine.store.residual_bytes(policy) > 0
    assert llm.kv_stats()["free_pages"] == llm.kv_stats()["total_pages"]


def test_a_policy_that_does_not_suit_the_model_is_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="does not divide head dim 24"):
        llm.generate([[1, 2, 3]], SamplingParams(kv_policy="k4v2-g16"), use_tqdm=False)
    assert not llm.engine.has_unfinished()


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 400, 2] + [rng.randint(1, 400) for _ in range(count - 3)]
    return [[rng.randrange(1, 380) for _ in range(n)] for n in lengths]


def test_mixed_policies_batched_equal_each_request_alone(llm: LLM) -> None:
    """Decisions are per request: a batch mixing policies changes no request's output."""
    prompts = _prompts(8, seed=3)
    names = ["k4v2", "fp16", "k8v4", "k2v2", "k4v4-g8", "k8v8", "k4v1", "k4v2"]
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, kv_policy=n) for n in names
    ]
    alone = [
        llm.generate([p], sp, use_tqdm=False)[0].token_ids
        for p, sp in zip(prompts, params, strict=True)
    ]
    engine = llm.engine
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    assert [done[i] for i in ids] == alone


def test_compressed_policy_with_preemption_equals_one_at_a_time(
    checkpoints: dict[str, Path],
) -> None:
    """Uniform formats encode each token alone, so recompute after preemption changes nothing."""
    path = str(checkpoints["llama"])
    prompts = _prompts(12, seed=4)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    kwargs = dict(dtype="float32", max_model_len=512, kv_policy="k4v2", max_num_batched_tokens=128)
    alone = LLM(path, kv_cache_memory="4MiB", **kwargs)
    expected = [alone.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]
    store = alone.engine.store
    one_request = store.pages_to_admit(512, KVPolicy.parse("k4v2")) * store.pool.page_bytes
    batched = LLM(path, kv_cache_memory=int(one_request * 1.3), **kwargs)
    outputs = batched.generate(prompts, params, use_tqdm=False)
    stats = batched.kv_stats()
    assert stats["preemptions"] > 0 and stats["max_running"] > 1
    assert [o.token_ids for o in outputs] == expected
    assert stats["free_pages"] == stats["total_pages"]


def test_kv_stats_report_tiers_and_tokens_per_head(llm: LLM) -> None:
    engine = llm.engine
    rid = engine.add_request([1 + i % 300 for i in range(100)], SamplingParams(max_tokens=3))
    engine.step()
    stats = llm.kv_stats()
    engine.abort(rid)
    assert stats["kv_bytes_per_token_by_tier"] == {"high": stats["kv_bytes_per_token"]}
    heads = engine.spec.num_layers * engine.spec.num_kv_heads
    histogram = stats["tokens_per_head"]
    assert sum(histogram["counts"]) == heads and histogram["edges"][-1] == 100
    assert histogram["counts"][-1] == heads  # every head holds the whole prompt
    assert stats["used_pages"] == engine.store.pages_for(100)


def _max_running(path: str, policy: str, memory: int) -> int:
    llm = LLM(path, dtype="bfloat16", max_model_len=512, kv_cache_memory=memory, kv_policy=policy)
    prompts = _prompts(24, seed=5)
    long = [p * (400 // len(p) + 1) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([p[:400] for p in long], params, use_tqdm=False)
    stats = llm.kv_stats()
    assert stats["free_pages"] == stats["total_pages"]
    return stats["max_running"]


def test_compressed_policy_admits_more_requests_in_the_same_memory(
    checkpoints: dict[str, Path],
) -> None:
    """Pages freed by compression become concurrency: every prompt that fits is admitted."""
    path = str(checkpoints["llama"])
    probe = LLM(path, dtype="bfloat16", max_model_len=512, kv_cache_memory="4MiB")
    store = probe.engine.store
    pages = 4 * store.pages_for(512)  # four fp16 requests of max_model_len
    memory = pages * store.pool.page_bytes
    full, compressed = _max_running(path, "fp16", memory), _max_running(path, "k4v2", memory)
    assert full == pages // store.pages_for(400)
    assert compressed == pages // store.pages_to_admit(400, KVPolicy.parse("k4v2"))
    assert compressed >= 2 * full  # k4v2 with its 32-token uncompressed residual ring
