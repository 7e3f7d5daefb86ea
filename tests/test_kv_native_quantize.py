"""The native write (``native.store_tokens``: quantizing, or copying uncompressed rows, residual
rings included) stores the bytes the torch path does."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierkv.kv.backends.cpu import ops as native
from tierkv.kv.formats.quant import FORMATS, FULL, KVFormat, default_page_bytes
from tierkv.kv.policy.spec import KVPolicy
from tierkv.kv.store.kv_store import KVStore
from tierkv.kv.store.pool import PagePool

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.unavailable_reason()}"
)

LAYERS, HEADS = 2, 2
QUANTIZED = [f for f in FORMATS.values() if f.quantized]


def _arena_after(
    fmt: KVFormat | KVPolicy, k: torch.Tensor, v: torch.Tensor, start: int, writer: bool
) -> torch.Tensor:
    """The arena after writing ``k``/``v`` [N, H, D] at positions ``start..`` of one slot,
    through the native writer or the torch path."""
    head_dim = k.shape[-1]
    pool = PagePool(64, default_page_bytes(head_dim))
    pool.arena.fill_(0xAB)  # stale bytes: only what the write sets may differ from them
    store = KVStore(pool, LAYERS, HEADS, head_dim, k.dtype, 2, 256)
    store.writer_for = (lambda f: native.store_tokens) if writer else None
    slot = store.acquire_slot(fmt)
    n = k.shape[0]
    store.reserve(torch.tensor([slot]), torch.tensor([start + n]))
    if start:
        zeros = torch.zeros(start, HEADS, head_dim, dtype=k.dtype)
        store.write(1, torch.full((start,), slot), torch.arange(start), zeros, zeros)
    store.write(1, torch.full((n,), slot), torch.arange(start, start + n), k, v)
    return pool.arena


def _values(draw: st.DrawFn, shape: tuple[int, ...]) -> torch.Tensor:
    """Rows mixing ordinary values, constant groups, huge and tiny spans and subnormals."""
    kind = draw(st.sampled_from(["normal", "constant", "huge", "tiny", "mixed"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(shape, generator=gen)
    if kind == "constant":
        x = torch.full(shape, draw(st.floats(-70000, 70000, allow_subnormal=False, width=32)))
    elif kind == "huge":
        x = x * 3e4
    elif kind == "tiny":
        x = x * 1e-40 + draw(st.floats(-1, 1, width=32))
    elif kind == "mixed":
        x[..., ::3] = 0.0
        x[..., 1::5] *= 1e-6
    return x


@st.composite
def _case(draw: st.DrawFn) -> tuple[KVFormat, torch.Tensor, torch.Tensor, int]:
    fmt = draw(st.sampled_from([*QUANTIZED, FULL]))
    head_dim = draw(st.sampled_from([32, 64, 128]))
    group = draw(st.sampled_from([32, 64, 128]))
    n = draw(st.integers(1, 40))
    shape = (n, HEADS, head_dim)
    return (
        fmt.with_group_size(group),
        _values(draw, shape),
        _values(draw, shape),
        draw(st.integers(0, 20)),
    )


@settings(max_examples=60, deadline=None)
@given(case=_case(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_the_native_write_stores_the_same_bytes(
    case: tuple[KVFormat, torch.Tensor, torch.Tensor, int], dtype: torch.dtype
) -> None:
    fmt, k, v, start = case
    k, v = k.to(dtype), v.to(dtype)
    if not (k.isfinite().all() and v.isfinite().all()):
        return  # fp16 overflow: the engine never stores infinities
    want = _arena_after(fmt, k, v, start, writer=False)
    got = _arena_after(fmt, k, v, start, writer=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("spec", ["k8v4:r=8", "k4v2-g32:r=20"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("start", "n"), [(0, 1), (0, 30), (13, 1), (13, 25)])
def test_ring_writes_store_the_same_bytes(
    spec: str, dtype: torch.dtype, start: int, n: int
) -> None:
    """A slot with a residual window also copies its newest tokens into its ring."""
    gen = torch.Generator().manual_seed(start * 100 + n)
    k, v = torch.randn(2, n, HEADS, 64, generator=gen).to(dtype)
    policy = KVPolicy.parse(spec)
    want = _arena_after(policy, k, v, start, writer=False)
    assert torch.equal(_arena_after(policy, k, v, start, writer=True), want)


def test_the_native_write_refuses_pages_outside_the_arena() -> None:
    pool = PagePool(4, default_page_bytes(32))
    store = KVStore(pool, 1, 1, 32, torch.float32, 1, 64)
    f = store.register(FORMATS["k8v4"])
    k = torch.randn(1, 1, 32)
    with pytest.raises(RuntimeError, match="outside the arena"):
        native.store_tokens(
            store, f, torch.tensor([[9]]), torch.tensor([[0]]), k, k, torch.tensor([0])
        )
