"""The ``triton`` backend's tiered decode (``triton.tiered.tiered_decode``) and quantizing write
(``triton.writes.store_tokens``) against the torch and C++ oracles. Without a GPU the kernels
run on CPU tensors in Triton's interpreter.

Tolerances of the decode (float32 throughout; the kernel sums logits and values in another
order than the oracles, and its logits are ``q . k * (1 / sqrt(D))`` where ``tiered.attend``
divides by ``sqrt(D)``): outputs ``rtol=1e-5, atol=1e-4`` (outputs are up to ~40 in the
rotated basis, values there being sqrt(D) times their size, so this is ~1e-6 relative),
probabilities ``rtol=1e-5, atol=2e-6``; bfloat16 queries give bfloat16 outputs, which may round
to neighbouring bfloat16 numbers: ``rtol=8e-3`` (one bfloat16 step), ``atol=1e-3``.
The write is compared byte for byte (fp16 scales and zeros, IEEE division and
round-half-to-even codes are reproduced exactly), with one exception: a group whose minimum is
a zero present as both -0.0 and +0.0 may store either as its fp16 zero point (0x8000 or
0x0000; the C++ writer differs from ``KVFormat.encode`` there too), which decodes to the same
values (``_unsigned_zero_points``).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
# CPU tensors need Triton's interpreter, which conftest.py turns on where there is no GPU.
on_cpu = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter"
)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kv_stores import LAYER, tiered_store  # noqa: E402

from tierkv import extension  # noqa: E402
from tierkv.kv.backends.tiered_attend import attend  # noqa: E402
from tierkv.kv.backends.triton.tiered import tiered_decode  # noqa: E402
from tierkv.kv.backends.triton.writes import store_tokens  # noqa: E402
from tierkv.kv.formats.layout import PageLayout  # noqa: E402
from tierkv.kv.formats.quant import FORMATS, FULL, KVFormat, default_page_bytes  # noqa: E402
from tierkv.kv.store.kv_store import HIGH, LOW, KVStore  # noqa: E402
from tierkv.kv.store.pool import PagePool  # noqa: E402

QUANTIZED = [f for f in FORMATS.values() if f.quantized]
HEADS = 2

# (tier formats, query heads (KV heads: 2), sliding window, head dim, ring, query dtype): a
# covering subset of the cross product, small enough for the interpreter.
DECODES = [
    ("k8v4/k4v2-g32", 2, None, 64, 0, torch.float32),
    ("k8v4/k4v2-g32", 6, 23, 128, 4, torch.float32),
    ("k8v8/k4v4-g64", 8, 23, 64, 0, torch.float32),
    ("k8v8/k4v4-g64", 16, None, 128, 4, torch.float32),
    ("k4v2/k2v2-g32", 8, None, 64, 8, torch.float32),
    ("k4v2/k2v2-g64", 6, 23, 64, 0, torch.float32),
    # The ring (8) covers a sliding window of 5: the tiers add nothing.
    ("k8v4/k4v2-g32", 4, 5, 64, 8, torch.float32),
    ("k8v4/k4v2-g32", 8, 23, 64, 4, torch.bfloat16),
]


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if what == "probs":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    elif got.dtype == torch.bfloat16:
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-3)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@on_cpu
@pytest.mark.parametrize(("formats", "q_heads", "window", "head_dim", "ring", "dtype"), DECODES)
def test_tiered_decode_equals_attend_and_the_native_kernel(
    formats: str, q_heads: int, window: int | None, head_dim: int, ring: int, dtype: torch.dtype
) -> None:
    """Tiers with demoted and pruned tokens over stale (NaN-pattern) bytes, both tiers in
    their own formats, with and without the ring's newest positions."""
    spec = f"{formats}:ah=10,al=4,w=8,sw=16" + (f",r={ring}" if ring else "")
    store, slots, q, query_pos = tiered_store(spec, q_heads, window, head_dim=head_dim)
    q = q.to(dtype)
    assert store.count[slots, LAYER, :, LOW].any()  # both tiers hold tokens
    residual = store.read_residual(LAYER, slots) if ring else None  # the query's own included
    want = attend(store, LAYER, q[:, None], slots, query_pos[:, None], window, None, residual)
    out, probs = tiered_decode(store, LAYER, q, slots, query_pos, window)
    assert out.dtype == dtype and probs.dtype == torch.float32
    assert out.isfinite().all() and probs.isfinite().all()
    _close(out, want.out[:, 0], "out")
    _close(probs, want.probs[:, :, :, 0], "probs")
    if extension.available():
        from tierkv.kv.backends.cpu.tiers import tiered_decode as native_decode

        native_out, native_probs = native_decode(store, LAYER, q, slots, query_pos, window)
        _close(out, native_out, "out")
        _close(probs, native_probs, "probs")


@on_cpu
def test_an_empty_low_tier_and_the_cache_shared_by_layers() -> None:
    """Nothing demoted (ah=0, al=0): the low tier holds no page. The first call leaves its
    layer-invariant arguments in ``cache`` for the next layer's call."""
    store, slots, q, query_pos = tiered_store("k8v4/k4v2-g32:ah=0,al=0,w=8,r=4", 6, None)
    assert not store.count[slots, :, :, LOW].any()
    formats = (int(store.slot_format[slots[0], HIGH]), int(store.slot_format[slots[0], LOW]))
    cache: dict = {}
    for layer in (LAYER, 0):
        residual = store.read_residual(layer, slots)
        want = attend(store, layer, q[:, None], slots, query_pos[:, None], None, None, residual)
        out, probs = tiered_decode(
            store, layer, q, slots, query_pos, None, formats=formats, cache=cache
        )
        assert cache
        _close(out, want.out[:, 0], "out")
        _close(probs, want.probs[:, :, :, 0], "probs")
    with pytest.raises(ValueError, match="window"):
        tiered_decode(store, LAYER, q, slots, query_pos, 0)


def _store(fmt: KVFormat, head_dim: int) -> KVStore:
    pool = PagePool(6, default_page_bytes(head_dim))
    pool.arena.fill_(0xAB)  # stale bytes: only what the write sets may differ from them
    store = KVStore(pool, 1, HEADS, head_dim, torch.float32, 1, 64)
    store.register(fmt)
    return store


def _targets(store: KVStore, f: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random (page, row) pairs [n, HEADS] of format index ``f``."""
    per_page = store.layouts[f].tokens_per_page
    gen = torch.Generator().manual_seed(seed)
    at = torch.randperm(store.pool.num_pages * per_page, generator=gen)[: n * HEADS]
    return (at // per_page).view(n, HEADS), (at % per_page).view(n, HEADS)


def _assert_same_bytes(fmt: KVFormat, k: torch.Tensor, v: torch.Tensor, seed: int = 0) -> None:
    """Write ``k``/``v`` [N, HEADS, D] to random rows by the ``KVFormat.encode`` path, the
    triton kernel and (where built) the C++ one: the arenas must be equal, byte for byte, but
    for the sign of zero points that are zeros (see ``_unsigned_zero_points``)."""
    store = _store(fmt, k.shape[-1])
    f = store.register(fmt)
    layout = store.layouts[f]
    n = k.shape[0]
    pages, rows = _targets(store, f, n, seed)
    positions = torch.arange(n) * 3 + 11
    stale = store.pool.arena.clone()
    views = store.pool.fields(layout)
    for name, value in store.formats[f].encode(k, v, positions=positions).items():
        views[name][pages, rows] = value
    want = store.pool.arena.clone()
    assert not torch.equal(want, stale)
    writers = {"triton": store_tokens}
    if extension.available():
        from tierkv.kv.backends.cpu.writes import store_tokens as native_store

        writers["native"] = native_store
    for name, write in writers.items():
        store.pool.arena.copy_(stale)
        write(store, f, pages, rows, k, v, positions)
        got = store.pool.arena
        if not torch.equal(got, want):
            got, want = _unsigned_zero_points(got, layout), _unsigned_zero_points(want, layout)
        assert torch.equal(got, want), name


def _unsigned_zero_points(arena: torch.Tensor, layout: PageLayout) -> torch.Tensor:
    """A copy of ``arena`` with every fp16 zero point of -0.0 (0x8000) as +0.0 (0x0000).

    The one bit-equality exception: a group whose minimum is a zero holding both -0.0 and
    +0.0 gets either as its zero point, whichever the min reduction meets (``torch.aminmax``
    and ``tl.min`` reduce in different orders). Codes, scale and every decoded value are the
    same either way (``code * scale + zero`` with ``code * scale >= +0``).
    """
    arena = arena.clone()
    offsets, tokens = layout.offsets(), layout.tokens_per_page
    for field in layout.fields:
        if field.name in ("k_zero", "v_zero"):
            start = offsets[field.name]
            bits = arena[:, start : start + tokens * field.token_bytes].view(torch.int16)
            bits[bits == -32768] = 0
    return arena


@on_cpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
def test_store_tokens_writes_the_encode_bytes(fmt: KVFormat, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    k = torch.randn(4, HEADS, head_dim, generator=gen) * 3
    v = torch.randn(4, HEADS, head_dim, generator=gen)
    for group in (32, 64):
        _assert_same_bytes(fmt.with_group_size(group), k, v)


def test_store_tokens_copies_uncompressed_rows() -> None:
    _assert_same_bytes(FULL, torch.randn(3, HEADS, 64), torch.randn(3, HEADS, 64))


@on_cpu
def test_signed_zero_groups_differ_at_most_in_the_zero_points_sign() -> None:
    k = torch.randn(3, HEADS, 64)
    k[:, :, :32] = 0.0
    k[:, :, 1:32:3] = -0.0  # groups whose minimum is a zero of either sign
    _assert_same_bytes(FORMATS["k4v2"], k, k.flip(-1))


def _values(draw: st.DrawFn, shape: tuple[int, ...]) -> torch.Tensor:
    """Rows at one random scale and offset, some groups constant, some spans subnormal."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = 10.0 ** draw(st.integers(-42, 4))
    offset = draw(st.floats(-100, 100, width=32))
    x = torch.randn(shape, generator=gen) * scale + offset
    if draw(st.booleans()):
        x[..., :32] = offset  # a constant group (whole, at group sizes 16 and 32)
    return x


@st.composite
def _case(draw: st.DrawFn) -> tuple[KVFormat, torch.Tensor, torch.Tensor, int]:
    fmt = draw(st.sampled_from(QUANTIZED)).with_group_size(draw(st.sampled_from([16, 32, 64])))
    head_dim = draw(st.sampled_from([64, 128]))
    shape = (draw(st.integers(1, 3)), HEADS, head_dim)
    return fmt, _values(draw, shape), _values(draw, shape), draw(st.integers(0, 99))


@on_cpu
@settings(max_examples=25, deadline=None)
@given(case=_case(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_store_tokens_matches_encode_at_any_scale(
    case: tuple[KVFormat, torch.Tensor, torch.Tensor, int], dtype: torch.dtype
) -> None:
    fmt, k, v, seed = case
    k, v = k.to(dtype), v.to(dtype)
    if not (k.isfinite().all() and v.isfinite().all()):
        return  # fp16 overflow: the engine never stores infinities
    _assert_same_bytes(fmt, k, v, seed)


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (scripts/gpu_check.sh)"
)


@needs_cuda
@pytest.mark.parametrize(("formats", "q_heads", "window", "head_dim"), [d[:4] for d in DECODES])
def test_on_cuda_the_tiered_decode_equals_attend_on_cpu(
    formats: str, q_heads: int, window: int | None, head_dim: int
) -> None:
    """The store built on CPU, its arena copied to the GPU: the kernel reads the pages there
    (tables and counts travel with the call). Without a ring, which is read through the
    store's CPU views."""
    spec = f"{formats}:ah=10,al=4,w=8,sw=16"
    store, slots, q, query_pos = tiered_store(spec, q_heads, window, head_dim=head_dim)
    want = attend(store, LAYER, q[:, None], slots, query_pos[:, None], window)
    cpu_arena = store.pool.arena
    store.pool.arena = cpu_arena.cuda()
    try:
        out, probs = tiered_decode(store, LAYER, q.cuda(), slots, query_pos, window)
    finally:
        store.pool.arena = cpu_arena
    _close(out.cpu(), want.out[:, 0], "out")
    _close(probs.cpu(), want.probs[:, :, :, 0], "probs")


@needs_cuda
@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
def test_on_cuda_store_tokens_writes_the_encode_bytes(fmt: KVFormat) -> None:
    store = _store(fmt, 128)
    f = store.register(fmt)
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(5, HEADS, 128, generator=gen) * 3
    v = torch.randn(5, HEADS, 128, generator=gen)
    pages, rows = _targets(store, f, 5, 7)
    positions = torch.arange(5) + 100
    views = store.pool.fields(store.layouts[f])
    for name, value in store.formats[f].encode(k, v, positions=positions).items():
        views[name][pages, rows] = value
    want = _unsigned_zero_points(store.pool.arena, store.layouts[f])
    cpu_arena = store.pool.arena
    store.pool.arena = cpu_arena.clone().fill_(0xAB).cuda()
    try:
        store_tokens(store, f, pages.cuda(), rows.cuda(), k.cuda(), v.cuda(), positions.cuda())
        got = store.pool.arena.cpu()
    finally:
        store.pool.arena = cpu_arena
    assert torch.equal(_unsigned_zero_points(got, store.layouts[f]), want)
