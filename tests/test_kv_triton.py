"""The ``triton`` backend against ``reference``: every quantized format, GQA groups 1-8, head
dims 64, 96 and 128, sliding windows and residual rings, and the engine's greedy output on the
demo model. Without a GPU the kernels run on CPU tensors in Triton's interpreter; tolerances
are float32 rounding (the kernel sums in another order than SDPA): 2e-5 absolute on outputs
of unit scale (3e-2 in bfloat16)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
# The tests over CPU tensors need Triton's interpreter, which conftest.py turns on (before
# transformers imports triton) where there is no GPU; on a GPU the CUDA test runs instead.
on_cpu = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter"
)

from kv_stores import CONTEXT, KV_HEADS, LAYER, uniform_store  # noqa: E402

from tierkv import LLM, SamplingParams  # noqa: E402
from tierkv.kv.backends import REGISTRY, DecodeGroup, DecodeStep  # noqa: E402
from tierkv.kv.formats.quant import FORMATS, KVFormat  # noqa: E402
from tierkv.kv.policy.spec import KVPolicy  # noqa: E402
from tierkv.kv.store.kv_store import KVStore  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
QUANTIZED = [f for f in FORMATS.values() if f.quantized]


def _store(spec: str, head_dim: int) -> tuple[KVStore, torch.Tensor, torch.Tensor, int]:
    return uniform_store(KVPolicy.parse(spec), head_dim)


@on_cpu
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
def test_decode_equals_the_reference(fmt: KVFormat, head_dim: int) -> None:
    store, slots, lens, f = _store(f"{fmt.name}:r=0", head_dim)
    group = DecodeGroup(f, None, slots, lens, int(lens.max()))
    triton, reference = REGISTRY["triton"], REGISTRY["reference"]
    gen = torch.Generator().manual_seed(1)
    # GQA groups 1-8, with and without a sliding window, and in bfloat16 once.
    for heads_per_kv, window, dtype in [(g, None, torch.float32) for g in range(1, 9)] + [
        (3, 9, torch.float32),
        (4, None, torch.bfloat16),
    ]:
        q = torch.randn(len(CONTEXT), KV_HEADS * heads_per_kv, head_dim, generator=gen).to(dtype)
        assert triton.serves(store.formats[f], head_dim, dtype, store.pool.arena.device)
        want = reference.decode(DecodeStep(store), LAYER, q, group, window, None)
        got = triton.decode(DecodeStep(store), LAYER, q, group, window, None)
        assert got.dtype == dtype
        # bfloat16: the reference attends over keys and values rounded to bfloat16, the kernel
        # in float32 from the codes; a few bfloat16 steps apart on outputs of unit scale.
        tol = 2e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@on_cpu
@pytest.mark.parametrize("splits", [2, 3, 40])
def test_context_splits_merge_into_the_whole(splits: int) -> None:
    from tierkv.kv.backends.triton.backend import decode_pages

    # Request 1 sees no position in most splits, request 0 in all but the first; 40 splits
    # of 2-3 pages leave some empty for every request.
    store, slots, lens, f = _store("k4v2:r=0", 64)
    per_page = store.layouts[f].tokens_per_page
    table = store.tables[slots, LAYER, :, 0, : -(-int(lens.max()) // per_page)]
    table = torch.where(table < store.pool.num_pages, table, 0).contiguous()
    starts = torch.tensor([60, 0, 100, 0])
    q = torch.randn(len(CONTEXT), KV_HEADS * 2, 64)
    args = (store.pool.arena, table, starts, lens, store.formats[f], store.layouts[f], KV_HEADS)
    whole, whole_lse = decode_pages(q, *args, splits=1)
    out, lse = decode_pages(q, *args, splits=splits)
    torch.testing.assert_close(out, whole, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, whole_lse, rtol=2e-5, atol=2e-5)


@on_cpu
def test_residual_rings_merge_with_the_pages() -> None:
    # k8v4 with a ring of 32: the newest 32 positions come from the ring, uncompressed.
    store, slots, lens, f = _store("k8v4:r=32", 64)
    residual = store.read_residual(LAYER, slots)
    # Read after the write, the ring holds each query's own position: its entries are a decode's.
    group = DecodeGroup(f, None, slots, lens, int(lens.max()))
    q = torch.randn(len(CONTEXT), KV_HEADS * 3, 64)
    want = REGISTRY["reference"].decode(DecodeStep(store), LAYER, q, group, 17, residual)
    got = REGISTRY["triton"].decode(DecodeStep(store), LAYER, q, group, 17, residual)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_refuses_what_it_cannot_serve_by_name() -> None:
    triton = REGISTRY["triton"]
    cpu = torch.device("cpu")
    assert "full" in (triton.refusal(FORMATS["full"], 64, torch.float32, cpu) or "")
    assert "meta" in (triton.refusal(FORMATS["k8v8"], 64, torch.float32, torch.device("meta")))


@on_cpu
@pytest.mark.parametrize("policy", ["k8v4", "default"])
def test_the_engine_on_the_triton_chain_gives_the_reference_greedy_output(policy: str) -> None:
    # ``default`` is tiered: its decodes, writes and scores go through the triton kernels too.
    prompts = [[5 + i * 7 % 3000 for i in range(n)] for n in (40, 9)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = {}
    for backend in ("triton", "reference"):
        llm = LLM(
            str(DEMO),
            dtype="float32",
            kv_policy=policy,
            attention_backend=backend,
            max_model_len=128,
            kv_cache_memory="16MiB",
        )
        outputs[backend] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.kv_stats()["used_pages"] == 0
    assert outputs["triton"] == outputs["reference"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
def test_on_cuda_the_kernel_equals_the_reference_on_cpu(fmt: KVFormat) -> None:
    from tierkv.kv.backends.triton.backend import decode_pages

    store, slots, lens, f = _store(f"{fmt.name}:r=0", 128)
    q = torch.randn(len(CONTEXT), KV_HEADS * 4, 128)
    group = DecodeGroup(f, None, slots, lens, int(lens.max()))
    want = REGISTRY["reference"].decode(DecodeStep(store), LAYER, q, group, None, None)
    per_page = store.layouts[f].tokens_per_page
    table = store.tables[slots, LAYER, :, 0, : -(-int(lens.max()) // per_page)]
    table = torch.where(table < store.pool.num_pages, table, 0)
    cuda = torch.device("cuda")
    out, _ = decode_pages(
        q.to(cuda),
        store.pool.arena.to(cuda),
        table.contiguous().to(cuda),
        torch.zeros_like(lens).to(cuda),
        lens.to(cuda),
        store.formats[f],
        store.layouts[f],
        KV_HEADS,
    )
    torch.testing.assert_close(out.cpu(), want, rtol=2e-5, atol=2e-5)
