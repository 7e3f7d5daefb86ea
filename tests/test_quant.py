"""Group-wise KV quantization and the format table: bounds, packing, layouts, pages."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tierkv.kv.formats import quant
from tierkv.kv.formats.quant import (
    DEFAULT_GROUP_SIZE,
    FORMATS,
    FULL,
    QUANT_BITS,
    KVFormat,
    default_page_bytes,
    dequantize,
    pack,
    packed_bytes,
    quantize,
    unpack,
)
from tierkv.kv.store.pool import PagePool

GROUP_SIZES = (32, 64, 128)
# Small head dims (one group) as in the test checkpoints, and the common real ones.
HEAD_DIMS = (16, 24, 32, 64, 128, 256)
QUANTIZED = [f for f in FORMATS.values() if f.quantized]
SETTINGS = settings(max_examples=60, deadline=None)


def _compatible(head_dim: int, group_size: int) -> bool:
    return head_dim % min(head_dim, group_size) == 0


@st.composite
def head_dim_and_group(draw: st.DrawFn) -> tuple[int, int]:
    group_size = draw(st.sampled_from(GROUP_SIZES))
    head_dim = draw(st.sampled_from([d for d in HEAD_DIMS if _compatible(d, group_size)]))
    return head_dim, group_size


@st.composite
def kv_tensor(draw: st.DrawFn, head_dim: int, max_tokens: int = 4) -> torch.Tensor:
    """[tokens, heads, head_dim] float32: adversarial values from hypothesis, or seeded noise."""
    shape = (draw(st.integers(1, max_tokens)), draw(st.integers(1, 3)), head_dim)
    if draw(st.booleans()):
        # Hypothesis fills most of the array with one value: constant and near-constant groups,
        # zeros, signed zeros and subnormals come up often.
        elements = st.floats(-1e4, 1e4, width=32)
        return torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=elements)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    spread = 10.0 ** draw(st.integers(-6, 3))
    offset = draw(st.floats(-100, 100))
    return torch.randn(shape, generator=gen) * spread + offset


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    width = min(group_size, t.shape[-1])
    return t.double().reshape(*t.shape[:-1], t.shape[-1] // width, width)


# -- quantize / dequantize ---------------------------------------------------------------------


@SETTINGS
@given(st.sampled_from(QUANT_BITS), head_dim_and_group(), st.data())
def test_round_trip_error_is_at_most_half_a_step(
    bits: int, dims: tuple[int, int], data: st.DataObject
) -> None:
    head_dim, group_size = dims
    x = data.draw(kv_tensor(head_dim))
    q = quantize(x, bits, group_size)
    out = dequantize(q)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()

    qmax = 2**bits - 1
    xg = _grouped(x, group_size)
    scale, zero = q.scale.double()[..., None], q.zero.double()[..., None]
    # The bound: half of the group's stored (fp16) step, plus float32 rounding in quantize and
    # dequantize, at most a few units of 2**-24 of the magnitudes involved.
    bound = scale / 2 + 2**-20 * (zero.abs() + qmax * scale)
    assert ((_grouped(out, group_size) - xg).abs() <= bound).all()


@SETTINGS
@given(st.sampled_from(QUANT_BITS), head_dim_and_group(), st.data())
def test_grid_covers_each_group_with_the_min_max_step(
    bits: int, dims: tuple[int, int], data: st.DataObject
) -> None:
    # Without this the half-step bound would be hollow: a huge step is always "within bound".
    head_dim, group_size = dims
    x = data.draw(kv_tensor(head_dim))
    q = quantize(x, bits, group_size)
    qmax = 2**bits - 1
    xg = _grouped(x, group_size)
    low, high = xg.amin(-1), xg.amax(-1)
    zero, scale = q.zero.double(), q.scale.double()
    assert (zero <= low).all(), "zero rounds down: no element below the grid"
    assert (zero >= low - (low.abs() * 2**-10 + 2**-24)).all(), "zero within one fp16 ulp"
    ideal = (high - zero) / qmax
    assert (scale >= ideal * (1 - 2**-22)).all(), "scale rounds up: the grid reaches the max"
    assert (scale <= ideal * (1 + 2**-9) + 2**-24).all(), "scale within one fp16 ulp"


@SETTINGS
@given(st.sampled_from(QUANT_BITS), head_dim_and_group(), st.data())
def test_constant_groups_reconstruct_exactly(
    bits: int, dims: tuple[int, int], data: st.DataObject
) -> None:
    head_dim, group_size = dims
    width = min(group_size, head_dim)
    shape = (data.draw(st.integers(1, 4)), head_dim // width)
    values = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-6e4, 6e4, width=32)))
    values = torch.from_numpy(values)
    x = values[..., None].expand(*shape, width).reshape(shape[0], head_dim)
    out = dequantize(quantize(x, bits, group_size))
    assert torch.isfinite(out).all()
    # Up to fp16 rounding of the value: half an fp16 ulp (2**-11 relative, 2**-25 absolute in
    # the subnormal range), plus float32 arithmetic.
    assert ((out - x).abs() <= x.abs() * (2**-11 + 2**-20) + 2**-24).all()
    # A value fp16 holds exactly comes back bit for bit.
    exact = values.half().float()
    x = exact[..., None].expand(*shape, width).reshape(shape[0], head_dim)
    assert torch.equal(dequantize(quantize(x, bits, group_size)), x)


def test_all_zero_and_bf16_inputs() -> None:
    zeros = torch.zeros(3, 2, 64)
    for bits in QUANT_BITS:
        q = quantize(zeros, bits, 32)
        assert torch.equal(dequantize(q), zeros)
        assert (q.scale == 0).all()
    x = torch.randn(5, 2, 64).bfloat16()
    out = dequantize(quantize(x, 8, 32), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert (out.float() - x.float()).abs().max() < 0.05


def test_quantize_rejects_bad_bits_and_group_sizes() -> None:
    x = torch.randn(2, 96)
    with pytest.raises(ValueError, match="bits"):
        quantize(x, 3, 32)
    with pytest.raises(ValueError, match="does not divide"):
        quantize(x, 4, 64)
    # A group larger than the head is one group per row.
    assert quantize(x, 4, 128).group_size == 96


# -- packing -----------------------------------------------------------------------------------


@SETTINGS
@given(
    st.sampled_from(QUANT_BITS),
    st.lists(st.integers(1, 3), max_size=2),
    st.integers(1, 300),
    st.integers(0, 2**32 - 1),
)
def test_unpack_inverts_pack(bits: int, lead: list[int], n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, n), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packed_bytes(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)
    # Strided views (as indexed out of a page) pack the same.
    assert torch.equal(pack(codes.transpose(0, -1).transpose(0, -1), bits), packed)


def test_pack_bit_order_and_padding() -> None:
    # Code i sits at bit (i % codes_per_byte) * bits, the tail of the last byte is zero.
    codes = torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [0b00_11_10_01, 0b00_00_00_11]
    assert pack(torch.tensor([1, 0, 1], dtype=torch.uint8), 1).tolist() == [0b101]
    with pytest.raises(ValueError, match="pack into"):
        unpack(torch.zeros(3, dtype=torch.uint8), 2, 5)


# -- the format table --------------------------------------------------------------------------


def test_format_table() -> None:
    assert {"full", "k8v8", "k8v4", "k4v4", "k4v2"} <= set(FORMATS)
    assert FORMATS["full"] is FULL and not FULL.quantized
    for name, fmt in FORMATS.items():
        assert fmt.name == name
        if fmt.quantized:
            assert name == f"k{fmt.key_bits}v{fmt.value_bits}"
            assert fmt.key_bits >= fmt.value_bits, "keys never get fewer bits than values"
            assert fmt.group_size == DEFAULT_GROUP_SIZE
    k8v4 = FORMATS["k8v4"].with_group_size(128)
    assert (k8v4.name, k8v4.group_size, k8v4.key_bits) == ("k8v4", 128, 8)
    with pytest.raises(ValueError):
        KVFormat("k3v3", 3, 3)
    with pytest.raises(ValueError):
        KVFormat("k8v4", 8, 4, group_size=0)


def test_full_layout_is_unchanged() -> None:
    for head_dim in HEAD_DIMS:
        for dtype, tokens in ((torch.bfloat16, 16), (torch.float16, 16), (torch.float32, 8)):
            layout = FULL.layout(head_dim, dtype, default_page_bytes(head_dim))
            assert [(f.name, f.dtype, f.numel) for f in layout.fields] == [
                ("k", dtype, head_dim),
                ("v", dtype, head_dim),
            ]
            assert layout.tokens_per_page == tokens and layout.waste_bytes == 0


@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantized_layouts(fmt: KVFormat, group_size: int) -> None:
    fmt = fmt.with_group_size(group_size)
    for head_dim in HEAD_DIMS:
        if not _compatible(head_dim, group_size):
            with pytest.raises(ValueError, match="does not divide"):
                fmt.layout(head_dim, torch.bfloat16, default_page_bytes(head_dim))
            continue
        layout = fmt.layout(head_dim, torch.bfloat16, default_page_bytes(head_dim))
        groups = head_dim // min(head_dim, group_size)
        expected = {
            "k_codes": (torch.uint8, head_dim * fmt.key_bits // 8),
            "k_scale": (torch.float16, groups),
            "k_zero": (torch.float16, groups),
            "v_codes": (torch.uint8, head_dim * fmt.value_bits // 8),
            "v_scale": (torch.float16, groups),
            "v_zero": (torch.float16, groups),
            "score": (torch.float32, 1),
            "pos": (torch.int32, 1),
        }
        assert {f.name: (f.dtype, f.numel) for f in layout.fields} == expected
        tokens = layout.tokens_per_page
        assert tokens > 0
        end = 0
        for f in layout.fields:
            start = layout.offsets()[f.name]
            assert start % 16 == 0 and start >= end, "fields aligned and disjoint"
            end = start + tokens * f.token_bytes
        assert end <= layout.page_bytes, "the page holds every field"
        assert layout.waste_bytes < layout.token_bytes + 16 * len(layout.fields)


def test_codes_must_fill_whole_bytes() -> None:
    with pytest.raises(ValueError, match="whole bytes"):
        FORMATS["k4v1"].layout(20, torch.float16, default_page_bytes(20))


def test_documented_bytes_per_token_table() -> None:
    row = re.compile(r"^\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+\.\d)$", re.MULTILINE)
    documented = set(row.findall(quant.__doc__ or ""))
    computed = set()
    for name, fmt in FORMATS.items():
        for head_dim in (64, 128):
            layout = fmt.layout(head_dim, torch.float16, default_page_bytes(head_dim))
            tokens = layout.tokens_per_page
            assert layout.waste_bytes / layout.page_bytes < 0.036, "as the docstring claims"
            computed.add(
                (
                    name,
                    str(head_dim),
                    str(layout.token_bytes),
                    str(tokens),
                    str(layout.waste_bytes),
                    f"{layout.page_bytes / tokens:.1f}",
                )
            )
    assert documented == computed


# -- encode / decode through a page pool -------------------------------------------------------


def _scatter(
    views: dict[str, torch.Tensor], table: torch.Tensor, fields: dict[str, torch.Tensor]
) -> None:
    """Write fields [N, heads, numel] of tokens 0..N-1 of each head into its pages table[head]."""
    tokens = views[next(iter(views))].shape[1]
    index = torch.arange(next(iter(fields.values())).shape[0])
    pages = table[:, index // tokens].T  # [N, heads]
    for name, value in fields.items():
        views[name][pages, (index % tokens)[:, None]] = value


def _gather(views: dict[str, torch.Tensor], table: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """Fields of the first n tokens of each head: [heads, n, numel], as an attention gather."""
    out = {}
    for name, view in views.items():
        pages = view[table]  # [heads, pages, tokens_per_page, numel]
        out[name] = pages.reshape(table.shape[0], -1, pages.shape[-1])[:, :n]
    return out


def _random_kv(
    fmt: KVFormat, n: int, heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    k = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
    positions = torch.randperm(4 * n, generator=gen)[:n].sort().values  # pruning leaves gaps
    scores = torch.rand(n, heads, generator=gen)
    fields = fmt.encode(k, v, positions=positions, scores=scores, dtype=dtype)
    return fields, positions, scores


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(list(FORMATS.values())),
    st.sampled_from(list(FORMATS.values())),
    head_dim_and_group(),
    st.integers(1, 150),
    st.integers(1, 3),
    st.sampled_from((torch.float32, torch.bfloat16, torch.float16)),
    st.integers(0, 2**32 - 1),
)
def test_encode_decode_round_trip_through_pool_pages(
    fmt: KVFormat,
    other: KVFormat,
    dims: tuple[int, int],
    n: int,
    heads: int,
    dtype: torch.dtype,
    seed: int,
) -> None:
    head_dim, group_size = dims
    fmt, other = fmt.with_group_size(group_size), other.with_group_size(group_size)
    gen = torch.Generator().manual_seed(seed)
    page_bytes = default_page_bytes(head_dim)
    layouts = {f: f.layout(head_dim, dtype, page_bytes) for f in (fmt, other)}
    per_head = {f: -(-n // lay.tokens_per_page) for f, lay in layouts.items()}
    pool = PagePool(sum(per_head.values()) * heads, page_bytes)
    pool.arena.random_(0, 256, generator=gen)  # nothing may rely on zeroed pages

    # Two formats share the arena, as every precision does; writing one must not touch the other.
    written = {}
    for f, layout in layouts.items():
        table = pool.alloc(per_head[f] * heads).reshape(heads, per_head[f])
        views = pool.fields(layout)
        fields, positions, scores = _random_kv(f, n, heads, head_dim, dtype, gen)
        assert {name: (t.shape, t.dtype) for name, t in fields.items()} == {
            p.name: ((n, heads, p.numel), p.dtype) for p in layout.fields
        }
        _scatter(views, table, fields)
        written[f] = (views, table, fields, positions, scores)

    for f, (views, table, fields, positions, scores) in written.items():
        gathered = _gather(views, table, n)
        k, v = f.decode(gathered, dtype)
        direct_k, direct_v = f.decode(fields, dtype)
        assert k.shape == (heads, n, head_dim) and k.dtype == dtype
        assert torch.equal(k, direct_k.transpose(0, 1))
        assert torch.equal(v, direct_v.transpose(0, 1))
        if f.quantized:
            assert torch.equal(gathered["pos"][..., 0], positions.int().expand(heads, n))
            assert torch.equal(gathered["score"][..., 0], scores.T)


def test_decode_matches_dequantize_and_keeps_leading_dims() -> None:
    fmt = FORMATS["k4v2"]
    k, v = torch.randn(6, 2, 64), torch.randn(6, 2, 64)
    fields = fmt.encode(k, v, positions=torch.arange(6))
    dk, dv = fmt.decode(fields, torch.float32)
    assert torch.equal(dk, dequantize(quantize(k, 4, 32)))
    assert torch.equal(dv, dequantize(quantize(v, 2, 32)))
    assert torch.equal(fields["score"], torch.zeros(6, 2, 1)), "scores default to 0"
    # Gathered pages carry [batch, heads, pages, tokens, numel]; only the last dim changes.
    paged = {name: t.reshape(1, 2, 3, 2, -1) for name, t in fields.items()}
    pk, _ = fmt.decode(paged, torch.float32)
    assert torch.equal(pk, dk.reshape(1, 2, 3, 2, 64))
    with pytest.raises(ValueError, match="positions"):
        fmt.encode(k, v)
    full = FULL.encode(k, v, dtype=torch.bfloat16)
    assert full["k"].dtype == torch.bfloat16 and set(full) == {"k", "v"}


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_a_group_of_float32_subnormals_keeps_a_positive_step(bits: int) -> None:
    # Found by hypothesis: the span 1.4e-45 divided by 2**bits - 1 underflows to 0 in float32.
    x = torch.full((1, 1, 16), 1.4013e-45)
    q = quantize(x, bits, 32)
    assert float(q.scale) > 0 and float(q.zero) <= 1.4013e-45
    assert (dequantize(q) - x).abs().max() <= float(q.scale) / 2
