"""Prefix caching: outputs with the cache equal outputs without it, and pages are never lost.

The oracle is the same engine with ``enable_prefix_caching=False``: a request that reuses cached
pages must compute what it computes alone. The accounting test drives admissions, hits,
evictions, preemptions and aborts at random and checks every page's reference count against
the page tables and the cache after every step.
"""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
import torch
from server_harness import MODEL_NAME, live_server

from tierkv import LLM, SamplingParams
from tierkv.engine.engine import Engine
from tierkv.kv.store.tables import HIGH
from tierkv.model.source import ModelSource

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _shared_prompts(seed: int, count: int, system: int, vocab: int) -> list[list[int]]:
    """``count`` prompts that share a ``system``-token prefix, then differ (random lengths)."""
    rng = random.Random(seed)
    head = [rng.randrange(1, vocab) for _ in range(system)]
    return [
        head + [rng.randrange(1, vocab) for _ in range(rng.randint(1, 90))] for _ in range(count)
    ]


def _run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """One prompt at a time (each can hit what the previous ones cached), then all at once."""
    alone = [llm.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]
    return alone + [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def check_accounting(engine: Engine) -> None:
    """Every page's reference count is the number of page tables and cache blocks holding it,
    the free stack holds exactly the pages nobody references, and used + free == total."""
    store, pool = engine.store, engine.store.pool
    cache = engine.scheduler.prefix_cache
    expected = torch.zeros(pool.num_pages, dtype=torch.int32)
    columns = torch.arange(store.tables.shape[-1])
    held = store.tables[columns < store.held[..., None]]
    expected.index_add_(0, held, torch.ones_like(held, dtype=torch.int32))
    if cache is not None:
        for block in cache._blocks.values():
            for pages in (block.pages, block.ring):
                if pages is not None:
                    expected.index_add_(0, pages, torch.ones_like(pages, dtype=torch.int32))
        assert cache.num_pages == sum(b.num_pages for b in cache._blocks.values())
        assert cache.reclaimable_pages == sum(
            b.num_pages for b in cache._blocks.values() if b.users == 0
        )
    assert torch.equal(pool.refs, expected)
    free = pool._free[: pool.num_free]
    assert free.unique().numel() == pool.num_free
    assert bool((expected[free] == 0).all()) and int((expected == 0).sum()) == pool.num_free
    counters = engine.pool_counters()
    assert counters["used_pages"] + counters["free_pages"] == counters["total_pages"]


@pytest.mark.parametrize("dtype", ["float32"])
def test_shared_system_prompt_outputs_equal_without_cache(
    checkpoints: dict[str, Path], dtype: str
) -> None:
    path = str(checkpoints["llama"])
    prompts = _shared_prompts(0, 6, system=300, vocab=380)
    kwargs = dict(dtype=dtype, max_model_len=1024, kv_cache_memory="8MiB", kv_policy="fp16")
    expected = _run(LLM(path, enable_prefix_caching=False, **kwargs), prompts, GREEDY)
    cached = LLM(path, **kwargs)
    assert _run(cached, prompts, GREEDY) == expected
    stats = cached.kv_stats()
    # Each later prompt alone reuses at least the shared head's whole pages.
    per_page = cached.engine.store.tokens_per_page(cached.engine.policy.high)
    assert stats["prefix_cache_hits"] >= 5 * (300 // per_page) * per_page
    assert stats["used_pages"] == 0 and stats["prefix_cache_pages"] > 0
    check_accounting(cached.engine)


def test_multi_turn_chat_reuses_history_and_matches(smollm2: ModelSource) -> None:
    """A chat resending its history each turn, on SmolLM2 (bf16, the default dtype)."""
    params = SamplingParams(temperature=0, max_tokens=16)
    turns = ["What is the capital of France?", "And of Italy?", "Which of the two is larger?"]
    kwargs = dict(kv_policy="fp16", max_model_len=2048, kv_cache_memory="256MiB")
    results = []
    for on in (False, True):
        llm = LLM(smollm2.folder, enable_prefix_caching=on, **kwargs)
        history: list[dict[str, str]] = [{"role": "system", "content": "Answer briefly."}]
        answers = []
        for question in turns:
            history.append({"role": "user", "content": question})
            out = llm.chat([history], params, use_tqdm=False)[0]
            answers.append(out.token_ids)
            history.append({"role": "assistant", "content": out.text})
        results.append(answers)
        stats = llm.kv_stats()
        assert (stats["prefix_cache_hits"] > 0) == on
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "policy", ["k8v4", "k4v2:r=0", "k8v8:r=48", "default", "k8v4/k4v2:al=0.3,r=0"]
)
def test_quantized_policies_share_on_fixed_cuts(checkpoints: dict[str, Path], policy: str) -> None:
    """In batch-invariant mode prompts are cut at fixed positions, so a quantized request can
    start from cached pages at a cut (with the residual ring copied there; a tiered request
    from copies, before its scoring queries): bit for bit what it computes alone."""
    path = str(checkpoints["llama"])
    prompts = _shared_prompts(1, 4, system=400, vocab=380)
    kwargs = dict(
        dtype="bfloat16",
        batch_invariant=True,
        max_model_len=1024,
        max_num_batched_tokens=160,
        kv_cache_memory="8MiB",
        kv_policy=policy,
    )
    expected = _run(LLM(path, enable_prefix_caching=False, **kwargs), prompts, GREEDY)
    cached = LLM(path, **kwargs)
    assert _run(cached, prompts, GREEDY) == expected
    engine = cached.engine
    per_page = engine.store.tokens_per_page(engine.policy.high)
    grid = engine.scheduler.chunk // per_page * per_page
    stats = cached.kv_stats()
    assert stats["prefix_cache_hits"] > 0
    assert stats["prefix_cache_hits"] % grid == 0
    check_accounting(cached.engine)


@pytest.mark.parametrize("policy", ["fp16", "k8v4", "default"])
def test_smollm2_shares_a_system_prompt_without_changing_answers(
    smollm2: ModelSource, policy: str
) -> None:
    """SmolLM2 in bfloat16 (batch-invariant, the default), chat questions behind one long
    system prompt: the greedy answers with the cache are those without it."""
    system = " ".join(f"Rule {i}: answer briefly, truthfully and politely." for i in range(40))
    questions = ["What is the capital of France?", "What is 12 times 7?", "Name a primary color."]
    chats = [
        [{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions
    ]
    params = SamplingParams(temperature=0, max_tokens=12)
    kwargs = dict(kv_policy=policy, max_model_len=2048, max_num_batched_tokens=256)
    answers = []
    for on in (False, True):
        llm = LLM(smollm2.folder, enable_prefix_caching=on, kv_cache_memory="256MiB", **kwargs)
        answers.append([llm.chat([c], params, use_tqdm=False)[0].token_ids for c in chats])
        assert (llm.kv_stats()["prefix_cache_hits"] > 0) == on
        assert llm.kv_stats()["used_pages"] == 0
    assert answers[0] == answers[1]


@pytest.mark.parametrize("policy", ["k8v4", "default"])
def test_unshared_policies_compute_their_prompts_in_full(
    checkpoints: dict[str, Path], policy: str
) -> None:
    """Quantized policies without fixed cuts (float32: no batch-invariant mode) and tiered
    policies do not share (docs/prefix_caching.md): nothing is looked up or cached for them,
    and their outputs are those without the cache."""
    path = str(checkpoints["llama"])
    prompts = _shared_prompts(1, 3, system=200, vocab=380)
    kwargs = dict(dtype="float32", max_model_len=1024, kv_cache_memory="8MiB", kv_policy=policy)
    expected = _run(LLM(path, enable_prefix_caching=False, **kwargs), prompts, GREEDY)
    cached = LLM(path, **kwargs)
    assert _run(cached, prompts, GREEDY) == expected
    stats = cached.kv_stats()
    assert stats["prefix_cache_queries"] == stats["prefix_cache_pages"] == 0


def test_opt_out_and_salt_keep_requests_apart(checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(checkpoints["llama"]), dtype="float32", kv_policy="fp16", max_model_len=1024)
    prompt = _shared_prompts(2, 1, system=200, vocab=380)[0]
    off = SamplingParams(temperature=0, max_tokens=4, prefix_caching=False)
    llm.generate([prompt], off, use_tqdm=False)
    assert llm.kv_stats()["prefix_cache_pages"] == 0  # an opted-out request adds nothing
    salted = SamplingParams(temperature=0, max_tokens=4, cache_salt="tenant-a")
    llm.generate([prompt], salted, use_tqdm=False)
    pages = llm.kv_stats()["prefix_cache_pages"]
    assert pages > 0 and llm.kv_stats()["prefix_cache_hits"] == 0
    other = SamplingParams(temperature=0, max_tokens=4, cache_salt="tenant-b")
    llm.generate([prompt], other, use_tqdm=False)
    assert llm.kv_stats()["prefix_cache_hits"] == 0  # another salt sees nothing
    llm.generate([prompt], salted, use_tqdm=False)
    assert llm.kv_stats()["prefix_cache_hits"] > 0
    llm.generate([prompt], off, use_tqdm=False)
    assert llm.kv_stats()["prefix_cache_queries"] == 3 * len(prompt)  # opted out: no query
    assert llm.engine.reset_prefix_cache() and llm.kv_stats()["prefix_cache_pages"] == 0
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")


@pytest.mark.parametrize(
    ("seed", "policy"), [(0, "fp16"), (1, "fp16"), (2, "fp16"), (3, "k8v4"), (4, "default")]
)
def test_random_admissions_hits_evictions_preemptions_and_aborts_leak_nothing(
    checkpoints: dict[str, Path], seed: int, policy: str
) -> None:
    """A pool a little larger than one long request, prompts drawn from a few shared heads,
    random aborts: the reference counts hold after every step, and (fp16, where a preemption's
    recompute changes nothing) the outputs of requests that were not aborted equal those
    computed alone without the cache. The compressed policies share on fixed cuts, in
    bfloat16's batch-invariant mode, with ring snapshots and (tiered) copies."""
    rng = random.Random(seed)
    path = str(checkpoints["llama"])
    kwargs = dict(max_model_len=512, kv_policy=policy, max_num_batched_tokens=128)
    if policy == "fp16":
        kwargs["dtype"] = "float32"
    else:
        kwargs.update(dtype="bfloat16", batch_invariant=True)
    probe = LLM(path, kv_cache_memory="4MiB", **kwargs)
    page = probe.engine.store.pool.page_bytes
    memory = int(probe.engine.store.pages_for(512) * page * 1.3)
    heads = [[rng.randrange(1, 380) for _ in range(rng.randint(20, 250))] for _ in range(3)]
    prompts = [
        rng.choice(heads) + [rng.randrange(1, 380) for _ in range(rng.randint(1, 120))]
        for _ in range(14)
    ]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    alone = LLM(path, kv_cache_memory=memory, enable_prefix_caching=False, **kwargs)
    expected = [alone.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]

    engine = LLM(path, kv_cache_memory=memory, **kwargs).engine
    pending = list(enumerate(prompts))
    done: dict[str, list[int]] = {}
    aborted: set[str] = set()
    steps = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 3])):
            if pending:
                i, prompt = pending.pop(0)
                engine.add_request(prompt, params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        if rng.random() < 0.08 and engine.running_request_ids():
            victim = rng.choice(sorted(engine.running_request_ids()))
            engine.abort(victim)
            aborted.add(victim)
        check_accounting(engine)
        steps += 1
        assert steps < 2000
    stats = engine.pool_counters()
    assert stats["used_pages"] == 0 and stats["prefix_cache_hits"] > 0
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.prefix_cache.evictions > 0
    for rid, tokens in done.items():
        if rid not in aborted and policy == "fp16":
            assert tokens == expected[int(rid)], rid
    engine.reset_prefix_cache()
    assert engine.store.pool.num_free == engine.store.pool.num_pages


def test_shared_pages_are_never_written(checkpoints: dict[str, Path]) -> None:
    """The bytes of every cached page are the same before and after a run of requests that
    reuse it."""
    llm = LLM(str(checkpoints["llama"]), dtype="float32", kv_policy="fp16", max_model_len=1024)
    prompts = _shared_prompts(3, 4, system=256, vocab=380)
    llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    cache = llm.engine.scheduler.prefix_cache
    pages = torch.cat([b.pages for b in cache._blocks.values()])
    before = llm.engine.store.pool.arena[pages].clone()
    llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert llm.kv_stats()["prefix_cache_hits"] > 0
    assert torch.equal(llm.engine.store.pool.arena[pages], before)
    assert int(llm.engine.store.held[..., HIGH].sum()) == 0


def test_openai_client_salt_opt_out_and_metrics(checkpoints: dict[str, Path]) -> None:
    """Through the official client: ``cache_salt`` and ``prefix_caching`` ride in the request
    body, hits show in ``/metrics``, and a bad salt is a 400 with a JSON error."""
    import openai

    prompt = _shared_prompts(4, 1, system=200, vocab=380)[0]
    with live_server(checkpoints["llama"], kv_policy="fp16") as server:
        client = server.client()

        def complete(**extra: object) -> str:
            out = client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0, extra_body=extra
            )
            return out.choices[0].text

        first = complete(cache_salt="a")
        assert complete(cache_salt="b") == first
        before = server.metrics()["tierkv:prefix_cache_hits_total"]
        assert before == 0  # another salt: no hit
        assert complete(cache_salt="a") == first
        hits = server.metrics()["tierkv:prefix_cache_hits_total"]
        assert hits > 0
        assert complete(cache_salt="a", prefix_caching=False) == first
        metrics = server.metrics()
        assert metrics["tierkv:prefix_cache_hits_total"] == hits
        assert metrics["tierkv:prefix_cache_queries_total"] == 3 * len(prompt)
        assert metrics["tierkv:prefix_cache_pages"] > 0
        with pytest.raises(openai.BadRequestError):
            complete(cache_salt="")
        reset = httpx.post(f"{server.base_url}/reset_prefix_cache", timeout=30)
        assert reset.status_code == 200
        assert server.metrics()["tierkv:prefix_cache_pages"] == 0
        assert complete(cache_salt="a") == first
        assert server.metrics()["tierkv:prefix_cache_hits_total"] == hits  # nothing left
