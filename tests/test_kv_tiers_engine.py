"""Differentiated policies in the engine: budgets, preemption, batching, admission capacity."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tierkv import LLM, KVPolicy, SamplingParams
from tierkv.eval import corpus

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo-model"


def test_tiered_policy_strings_parse() -> None:
    policy = KVPolicy.parse("k8v4/k4v2:ah=2,al=0.05,w=32,sw=16")
    assert policy.tiered and policy.low is not None and policy.low.name == "k4v2"
    assert (policy.alpha_high, policy.alpha_low, policy.recent, policy.score_window) == (
        2.0,
        0.05,
        32,
        16,
    )
    assert KVPolicy.parse(policy.name) == policy
    default = KVPolicy.parse("default")
    assert default.name == "k8v8/k4v2-g64:ah=1,al=0.8,w=128,pk=15,r=32" and default.budget is None
    assert default.high.group_size == default.low.group_size == 64  # type: ignore[union-attr]
    params = (default.alpha_high, default.alpha_low, default.recent, default.pool)
    assert params == (1, 0.8, 128, 15)
    budget = KVPolicy.parse("default@0.2")
    name = "k8v8/k4v2-g64@0.2:ah=1,al=0.8,w=128,pk=15,r=32"
    assert budget.name == name and budget == default.with_budget(0.2)
    # The name's own parameters override the default's.
    got = KVPolicy.parse("default-g32:pk=1,w=32").name
    assert got == "k8v8/k4v2-g32:ah=1,al=0.8,w=32,pk=1,r=32"
    assert KVPolicy.parse("default:w=16").residual == 16  # the ring never exceeds the window
    assert KVPolicy.parse("k8v4/k4v2-g64").low.group_size == 64  # type: ignore[union-attr]


def test_decisions_come_every_interval_steps(checkpoints: dict[str, Path]) -> None:
    """Between decisions each head only gains the new token; at a decision tokens are pruned."""
    llm = LLM(str(checkpoints["llama"]), dtype="float32", max_model_len=512, kv_cache_memory="8MiB")
    engine = llm.engine
    prompt = _prompts(3, seed=11, longest=300)[1]
    policy = "k4v4/k2v2:al=0.8,w=4,di=5"
    engine.add_request(prompt, SamplingParams(max_tokens=30, ignore_eos=True, kv_policy=policy))
    engine.step()  # the prompt, then its first decision
    slot = engine.scheduler.running[0].slot
    before = engine.store.num_tokens[slot].clone()
    pruned_at = []
    for step in range(1, 21):
        engine.step()
        held = engine.store.num_tokens[slot].clone()
        if step % 5:
            assert (held == before + 1).all()
        elif (held < before + 1).any():
            pruned_at.append(step)
        before = held
    assert pruned_at  # the decisions did prune
    assert KVPolicy.parse("default").interval == 8


@pytest.mark.parametrize(
    "bad",
    [
        "k4v2/k8v4",
        "k4v4/k4v4",
        "k8v4/k4v2@1.5",
        "k8v4/k4v2:x=1",
        "k8v4/k4v2:al=2,ah=1",
        "k8v4/k4v2:di=0",
    ],
)
def test_bad_tiered_policies_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="KV policy"):
        KVPolicy.parse(bad)


def _prompts(count: int, seed: int, longest: int = 400) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, longest, 2] + [rng.randint(1, longest) for _ in range(count - 3)]
    return [[rng.randrange(1, 380) for _ in range(n)] for n in lengths]


def test_tiered_requests_batched_equal_each_request_alone(checkpoints: dict[str, Path]) -> None:
    """Decisions are per request: batching tiered and uniform requests changes no output."""
    llm = LLM(str(checkpoints["llama"]), dtype="float32", max_model_len=512, kv_cache_memory="8MiB")
    names = ["default", "fp16", "k8v8/k4v4:w=8", "default@0.5", "k4v4/k2v2:al=0.5,w=4", "k8v4"]
    prompts = _prompts(len(names), seed=7)
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, kv_policy=n) for n in names
    ]
    alone = [
        llm.generate([p], sp, use_tqdm=False)[0].token_ids
        for p, sp in zip(prompts, params, strict=True)
    ]
    batched = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in batched] == alone
    stats = llm.kv_stats()
    assert stats["free_pages"] == stats["total_pages"]


def test_preemption_under_a_tiered_policy_finishes_and_returns_every_page(
    checkpoints: dict[str, Path],
) -> None:
    """Recompute rescored with the prefill rule: outputs may change, but all finish in full."""
    path = str(checkpoints["llama"])
    kwargs = dict(dtype="float32", max_model_len=512, kv_policy="k8v4/k4v2:w=16")
    probe = LLM(path, kv_cache_memory="4MiB", **kwargs)
    one = probe.engine.store.pages_to_admit(512, KVPolicy.parse(kwargs["kv_policy"]))
    llm = LLM(path, kv_cache_memory=int(one * 1.3) * probe.engine.store.pool.page_bytes, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outputs = llm.generate(_prompts(10, seed=8, longest=450), params, use_tqdm=False)
    stats = llm.kv_stats()
    assert stats["preemptions"] > 0 and stats["max_running"] > 1
    assert all(len(o.token_ids) == 48 and o.finish_reason == "length" for o in outputs)
    assert stats["free_pages"] == stats["total_pages"] and stats["running"] == 0


@pytest.mark.parametrize("fraction", [0.15, 0.3])
def test_budget_mode_meets_the_byte_budget(checkpoints: dict[str, Path], fraction: float) -> None:
    llm = LLM(
        str(checkpoints["llama"]),
        dtype="bfloat16",
        max_model_len=1024,
        kv_cache_memory="8MiB",
        kv_policy=f"default@{fraction}",
    )
    engine = llm.engine
    store = engine.store
    fp16_token = store.num_layers * store.num_kv_heads * (store.pool.page_bytes + 8)
    fp16_token /= store.fp16_tokens_per_page
    rid = engine.add_request(
        _prompts(4, seed=9, longest=900)[1], SamplingParams(max_tokens=40, ignore_eos=True)
    )
    for _ in range(30):
        engine.step()
        req = engine.scheduler.running[0]
        used = store.bytes_in_use()
        assert used <= fraction * req.num_computed_tokens * fp16_token
        # A budget is filled, not merely respected: within a few pages per head of it.
        slack = 3 * store.num_layers * store.num_kv_heads * (store.pool.page_bytes + 8)
        assert used >= fraction * req.num_computed_tokens * fp16_token - slack
    engine.abort(rid)
    assert store.pool.num_free == store.pool.num_pages


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="demo model not built")
def test_default_policy_admits_two_and_a_half_times_the_long_requests_of_fp16() -> None:
    """Same KV memory, 1,500-token prompts of real text: count requests held running at once.

    3x before the default took its residual ring (``r=32``): 32 uncompressed tokens per head
    are a fixed cost of about a tenth of a compressed request this long, the price of the
    answers it keeps on SmolLM2 (docs/fidelity.md)."""
    prompt_len, max_tokens, fp16_capacity = 1500, 48, 3
    probe = LLM(str(DEMO), dtype="bfloat16", max_model_len=2048, kv_cache_memory="64MiB")
    store = probe.engine.store
    memory = fp16_capacity * store.pages_for(prompt_len + max_tokens) * store.pool.page_bytes
    ids = probe.engine.tokenizer.encode("\n".join(corpus.read_text(corpus.held_out_files("test"))))
    prompts = [ids[i * 1700 : i * 1700 + prompt_len] for i in range(4 * fp16_capacity)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    running = {}
    for policy in ("fp16", "default"):
        llm = LLM(
            str(DEMO),
            dtype="bfloat16",
            max_model_len=2048,
            kv_cache_memory=memory,
            kv_policy=policy,
        )
        llm.generate(prompts, params, use_tqdm=False)
        stats = llm.kv_stats()
        assert stats["free_pages"] == stats["total_pages"]
        running[policy] = stats["max_running"]
    assert running["fp16"] == fp16_capacity
    assert running["default"] >= 2.5 * running["fp16"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_default_policy_on_the_fast_backend_matches_the_reference_path(
    family: str, checkpoints: dict[str, Path]
) -> None:
    """The fused tiered path, on every family's shapes (head dims, GQA, sliding windows)."""
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 380) for _ in range(n)] for n in (90, 150, 210)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = {}
    for backend in ("reference", "fast"):
        llm = LLM(
            str(checkpoints[family]),
            dtype="float32",
            max_model_len=256,
            kv_cache_memory="8MiB",
            attention_backend=backend,
        )
        outputs[backend] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm.kv_stats()
        assert stats["policy"] == KVPolicy.parse("default").name
        assert stats["free_pages"] == stats["total_pages"]
    assert outputs["fast"] == outputs["reference"]
