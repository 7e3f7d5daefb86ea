"""The residual ring of tiered slots (``tierkv.kv.backends.tiered_ring``): each query's newest
``r`` positions at full precision, on every path (reference, fused torch, native kernel)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from kv_stores import LAYER, tiered_store
from test_kv_residual import _drive

from tierkv import LLM, SamplingParams
from tierkv.batch import AttentionBatch
from tierkv.kv.attention import tiered
from tierkv.kv.attention.paged import PagedAttention
from tierkv.kv.backends.cpu import ops as native
from tierkv.kv.backends.partial import flash_serves
from tierkv.kv.formats.quant import default_page_bytes
from tierkv.kv.policy.spec import KVPolicy
from tierkv.kv.store.kv_store import HIGH, LOW, RESIDUAL, KVStore
from tierkv.kv.store.pool import PagePool

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.unavailable_reason()}"
)


def test_tiered_ring_parameter_parses_and_is_bounded_by_the_recent_window() -> None:
    policy = KVPolicy.parse("default:r=32")
    assert policy.residual == 32 and policy.tiered
    assert KVPolicy.parse(policy.name) == policy
    assert KVPolicy.parse("k8v4/k4v2").residual == 0
    with pytest.raises(ValueError, match="r <= w"):
        KVPolicy.parse("k8v4/k4v2:w=16,r=32")


@needs_native
@pytest.mark.parametrize("window", [None, 23, 5])
@pytest.mark.parametrize("q_heads", [4, 6])
@pytest.mark.parametrize("formats", ["k8v4/k4v2-g32", "k8v8/k4v2-g64", "k4v2/k2v2-g32"])
def test_native_tiered_decode_reads_the_ring_as_the_torch_path_does(
    formats: str, q_heads: int, window: int | None
) -> None:
    """Tiers with demoted and pruned tokens, the newest 8 positions from the ring (a sliding
    window of 5 leaves the tiers nothing to add)."""
    store, slots, q, query_pos = tiered_store(
        f"{formats}:ah=10,al=4,w=8,sw=16,r=8", q_heads, window
    )
    counts = store.count[slots, LAYER, :, :RESIDUAL]
    assert (counts[..., LOW] > 0).any() and (counts.sum(-1) < (query_pos + 1)[:, None]).all()
    residual = store.read_residual(LAYER, slots)  # after the write: the query's own included
    want = tiered.attend(
        store, LAYER, q[:, None], slots, query_pos[:, None], window, None, residual
    )
    out, probs = native.tiered_decode(store, LAYER, q, slots, query_pos, window)
    # Values in the rotated basis are sqrt(64) = 8 times their size: so is the rounding.
    torch.testing.assert_close(out, want.out[:, 0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(probs, want.probs[:, :, :, 0], rtol=1e-5, atol=1e-6)
    # The ring changed the answer: the tiers' quantized copies of the newest tokens are unused.
    plain = tiered.attend(store, LAYER, q[:, None], slots, query_pos[:, None], window)
    assert not torch.allclose(plain.out[:, 0], out, atol=1e-3)
    # Every query head's probabilities still sum to one over the tier columns (the ring's are
    # folded onto their tokens).
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


@pytest.mark.parametrize("backend", ["reference", "fast", "fast-torch"])
@pytest.mark.parametrize("window", [None, 40, 10])
def test_tiered_ring_attention_equals_the_dense_oracle(backend: str, window: int | None) -> None:
    """Nothing demoted (ah=0, al=0): a query sees its newest r positions as given and older
    ones quantized in the high format, whatever the chunking and the batch."""
    requests = [
        ("k8v4/k4v2:ah=0,al=0,w=32,r=16", [50, 1, 1, 1, 30, 1, 1]),
        ("k4v2/k2v2:ah=0,al=0,w=64,r=24", [7, 60, 1, 1, 1]),
    ]
    got, want, _ = _drive(backend, requests, window, seed=2)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5)


def _generate(model: Path, policy: str, backend: str, prompts: list[list[int]]) -> list:
    llm = LLM(
        str(model),
        dtype="float32",
        max_model_len=256,
        kv_cache_memory="8MiB",
        kv_policy=policy,
        attention_backend=backend,
        max_num_batched_tokens=48,  # prompts span chunks: the ring crosses chunk boundaries
    )
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.kv_stats()
    assert stats["free_pages"] == stats["total_pages"]
    return [o.outputs[0] for o in outputs]


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_a_tiered_policy_keeping_everything_equals_its_uniform_high_format(
    backend: str, checkpoints: dict[str, Path]
) -> None:
    """With nothing demoted or pruned (ah=0, al=0), a tiered slot with a ring of r is the
    uniform high format with the same ring: prefill chunks and decodes, batched."""
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 380) for _ in range(n)] for n in (30, 75, 120)]
    model = checkpoints["llama"]
    uniform = _generate(model, "k8v4:r=16", backend, prompts)
    ringed = _generate(model, "k8v4/k4v2:ah=0,al=0,w=64,r=16", backend, prompts)
    ringless = _generate(model, "k8v4/k4v2:ah=0,al=0,w=64", backend, prompts)
    assert [o.token_ids for o in ringed] == [o.token_ids for o in uniform]
    # Both paths equal the dense oracle on their own inputs (``test_..._the_dense_oracle``);
    # between the two runs float32 sums differ in order, which a random model amplifies at a
    # few positions: the typical step agrees to float32 noise.
    for a, b in zip(ringed, uniform, strict=True):
        got = torch.tensor([next(iter(d.values())).logprob for d in a.logprobs])
        want = torch.tensor([next(iter(d.values())).logprob for d in b.logprobs])
        assert float((got - want).abs().median()) < 1e-4
    # Without the ring the same tiers give other log-probabilities: the ring is in use.
    diffs = [
        abs(next(iter(x.values())).logprob - next(iter(y.values())).logprob)
        for a, b in zip(ringless, uniform, strict=True)
        for x, y in zip(a.logprobs, b.logprobs, strict=False)
    ]
    assert max(diffs) > 1e-4


def test_tiered_ring_on_the_fast_backend_matches_the_reference_path(
    checkpoints: dict[str, Path],
) -> None:
    """Demotions and pruning with a ring: the native kernel and fused paths against the
    reference, on a family with a sliding window."""
    rng = random.Random(11)
    prompts = [[rng.randrange(1, 380) for _ in range(n)] for n in (90, 150, 210)]
    policy = "default:r=32"
    got = {b: _generate(checkpoints["mistral"], policy, b, prompts) for b in ("reference", "fast")}
    assert [o.token_ids for o in got["fast"]] == [o.token_ids for o in got["reference"]]


def test_the_tiered_ring_is_admitted_counted_and_returned(checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(checkpoints["llama"]), kv_cache_memory="8MiB", kv_policy="default:r=40")
    engine, store = llm.engine, llm.engine.store
    policy = engine.policy
    heads = engine.spec.num_layers * engine.spec.num_kv_heads
    ring = -(-40 // store.layouts[0].tokens_per_page)
    assert store.pages_to_admit(100, policy) == store.pages_for(100, policy.high) + heads * (
        1 + ring
    )
    assert store.residual_bytes(policy) > 0
    rid = engine.add_request(list(range(1, 101)), SamplingParams(max_tokens=3))
    engine.step()
    assert llm.kv_stats()["tiers"]["residual"]["pages"] == heads * ring
    engine.abort(rid)
    assert llm.kv_stats()["free_pages"] == llm.kv_stats()["total_pages"]


@pytest.mark.skipif(
    not flash_serves(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)),
    reason="the extension is not built with AVX512-BF16 here",
)
@pytest.mark.parametrize("chunks", [(90, 60), (10, 5, 30)])
@pytest.mark.parametrize("window", [None, 70])
@pytest.mark.parametrize("policy", ["k8v4/k4v2:r=16,sw=40,w=16", "k8v8/k4v2:sw=24,w=8,pk=1"])
def test_native_prefill_scores_equal_the_torch_scores(
    policy: str, window: int | None, chunks: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In bfloat16 a tiered prefill chunk's scores come from ``flash_scores`` (each token's
    probability summed over the scoring queries by the native kernel): the same scores as the
    float32 softmax of the torch path, chunk by chunk, with and without a ring, and for
    chunks shorter than the ring (whose queries see no quantized token)."""
    import tierkv.kv.attention.tiered_prefill as tiered_prefill

    def scores(native: bool) -> torch.Tensor:
        if not native:
            monkeypatch.setattr(tiered_prefill, "flash_serves", lambda q: False)
        pool = PagePool(400, default_page_bytes(64))
        store = KVStore(pool, 2, 3, 64, torch.bfloat16, 1, 512)
        slot = store.acquire_slot(KVPolicy.parse(policy), sum(chunks))
        attention = PagedAttention(store, [window, None], backend="fast")
        gen = torch.Generator().manual_seed(5)
        context = 0
        for n in chunks:  # later chunks see the earlier ones' tokens and ring
            batch = AttentionBatch.build([slot], [context], [n])
            store.reserve(torch.tensor([slot]), torch.tensor([context + n]))
            q = torch.randn(n, 9, 64, generator=gen).bfloat16()
            k = (torch.randn(n, 3, 64, generator=gen) * 2).bfloat16()
            v = torch.randn(n, 3, 64, generator=gen).bfloat16()
            for layer in range(2):
                attention(layer, q, k, v, batch)
            context += n
        monkeypatch.undo()
        return store.read_tier(None, torch.tensor([slot]), HIGH, ("score",)).fields["score"]

    native, torch_path = scores(True), scores(False)
    assert native.abs().sum() > 0
    torch.testing.assert_close(native, torch_path, rtol=1e-4, atol=1e-6)
