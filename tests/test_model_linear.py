"""The native small-batch linear kernel and oneDNN over packed weights against a float64 matrix
product, and the layer's dispatch between them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tierkv import extension
from tierkv.model.layers import NATIVE_LINEAR_ROWS, RELEASE_BYTES, Linear, linear, pack_weight

pytestmark = pytest.mark.skipif(
    not extension.available(), reason=f"no native kernels: {extension.unavailable_reason()}"
)

# Relative to the output's largest magnitude: float32 sums in another order; bfloat16 output
# rounding (8 bits of mantissa) on top.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> None:
    """``out`` (default: the native kernel's) against a float64 product."""
    if out is None:
        out = torch.ops.tierkv.small_batch_linear(x, weight, bias)
    ref = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.dtype == x.dtype and out.shape == ref.shape
    err = (out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)
    assert err <= TOLERANCE[x.dtype], f"relative error {float(err):.2e}"


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, NATIVE_LINEAR_ROWS),
    # Input sizes around the kernel's 16- and 32-channel steps and output sizes around its
    # 4- and 8-row blocks, so every tail runs.
    in_features=st.integers(1, 130),
    out_features=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_a_float64_product(
    rows: int,
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    with_bias: bool,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    bias = torch.randn(out_features, generator=gen).to(dtype) if with_bias else None
    _check(x, weight, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_sized_weights_split_over_threads(dtype: torch.dtype) -> None:
    """Shapes of a small model's projections, large enough for several threads' tasks."""
    gen = torch.Generator().manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for out_features, in_features in ((1280, 768), (4096, 768), (768, 2048), (4099, 776)):
            for rows in (1, NATIVE_LINEAR_ROWS):
                x = torch.randn(rows, in_features, generator=gen).to(dtype)
                weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
                _check(x, weight, torch.randn(out_features, generator=gen).to(dtype))
    finally:
        torch.set_num_threads(previous)


def test_non_contiguous_inputs_are_read_as_their_values() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, generator=gen).t()
    weight = torch.randn(40, 24, generator=gen).t()
    _check(x, weight, None)


def test_refuses_what_it_does_not_compute() -> None:
    op = torch.ops.tierkv.small_batch_linear
    weight = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        op(torch.randn(NATIVE_LINEAR_ROWS + 1, 16), weight, None)
    with pytest.raises(RuntimeError, match="input features"):
        op(torch.randn(1, 15), weight, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(torch.randn(1, 16).half(), weight.half(), None)
    with pytest.raises(RuntimeError, match="bias"):
        op(torch.randn(1, 16), weight, torch.randn(7))


@pytest.mark.parametrize("rows", [0, 1, NATIVE_LINEAR_ROWS, NATIVE_LINEAR_ROWS + 1, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_takes_the_kernel_for_small_batches_only(rows: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    layer = Linear(48, 20, bias=True, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(20, 48, generator=gen))
        layer.bias.copy_(torch.randn(20, generator=gen))
    x = torch.randn(rows, 48, generator=gen).to(dtype)
    out = layer(x)
    torch_out = F.linear(x, layer.weight, layer.bias)
    native = 0 < rows <= NATIVE_LINEAR_ROWS and dtype != torch.float16
    if native:
        assert torch.equal(out, torch.ops.tierkv.small_batch_linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(out, torch_out, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * 8)
    else:
        assert torch.equal(out, torch_out)
    assert torch.equal(linear(x, layer.weight, layer.bias), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("large", [False, True])
def test_prepacked_layer_matches_a_float64_product(dtype: torch.dtype, large: bool) -> None:
    """After ``prepack``: oneDNN over the packed weight beyond the kernel's rows, the kernel up
    to them while the weight is held; a weight of ``RELEASE_BYTES`` keeps only the packed copy
    and serves every row count from it."""
    if pack_weight(torch.zeros(1, 1, dtype=dtype)) is None:
        pytest.skip(f"no oneDNN linear for {dtype} here")
    gen = torch.Generator().manual_seed(3)
    in_features = 96
    row_bytes = in_features * torch.finfo(dtype).bits // 8
    out_features = -(-RELEASE_BYTES // row_bytes) if large else 40
    layer = Linear(in_features, out_features, bias=True, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        layer.bias.copy_(torch.randn(out_features, generator=gen))
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.prepack()
    assert layer.packed is not None
    assert layer.weight.numel() == (0 if large else weight.numel())
    assert layer.weight_nbytes == weight.numel() * weight.element_size()
    for rows in (0, 1, NATIVE_LINEAR_ROWS, NATIVE_LINEAR_ROWS + 1, 33, 300):
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        out = layer(x)
        assert out.shape == (rows, out_features) and out.dtype == dtype
        if rows:
            _check(x, weight, bias, out)
        if 0 < rows <= NATIVE_LINEAR_ROWS and not large:
            assert torch.equal(out, torch.ops.tierkv.small_batch_linear(x, weight, bias))


def test_prepack_leaves_other_dtypes_to_torch() -> None:
    layer = Linear(16, 8, bias=False, dtype=torch.float16)
    layer.prepack()
    assert layer.packed is None and layer.weight.numel() == 16 * 8
    x = torch.randn(5, 16).half()
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_a_refused_pack_leaves_the_layer_on_its_row_major_weight(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where oneDNN refuses the reorder (a CPU or build without it), the layer keeps its weight
    and computes as before packing existed, with one warning."""

    def refuse(*args: object) -> torch.Tensor:
        raise RuntimeError("reorder refused on this CPU")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    gen = torch.Generator().manual_seed(4)
    layer = Linear(96, 2 * RELEASE_BYTES // (96 * 4), bias=False, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
    with caplog.at_level("WARNING", logger="tierkv.model.layers"):
        layer.prepack()
    assert layer.packed is None and layer.weight.numel() == 96 * layer.out_features
    assert "reorder refused on this CPU" in caplog.text
    x = torch.randn(7, 96, generator=gen)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
