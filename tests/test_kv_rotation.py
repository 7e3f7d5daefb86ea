"""The rotated basis quantized policies store keys and values in (kv/formats/rotation.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierkv import extension
from tierkv.kv.formats.rotation import rotate, rotate_qkv, rotation
from tierkv.kv.policy.spec import KVPolicy


@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256])
def test_the_matrix_is_orthogonal_up_to_its_power_of_two_block(head_dim: int) -> None:
    matrix, block = rotation(head_dim)
    assert block & (block - 1) == 0 and head_dim % block == 0
    assert set(matrix.unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(matrix @ matrix.t(), block * torch.eye(head_dim), rtol=0, atol=0)
    # Every channel of a block is spread over the whole block: no channel maps to itself alone.
    assert int((matrix != 0).sum(1).min()) == block


@settings(max_examples=30, deadline=None)
@given(
    head_dim=st.sampled_from([64, 96, 128]),
    rows=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    outlier=st.floats(1.0, 100.0),
)
def test_logits_and_values_survive_the_round_trip(
    head_dim: int, rows: int, seed: int, outlier: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, 3, head_dim, generator=gen)
    k = torch.randn(rows, 3, head_dim, generator=gen)
    k[..., 5] *= outlier  # an outlier channel, as real keys have
    logits = torch.einsum("nhd,mhd->nmh", q, k)
    rotated = torch.einsum("nhd,mhd->nmh", rotate(q, "query"), rotate(k, "in"))
    torch.testing.assert_close(rotated, logits, rtol=1e-4, atol=1e-3 * outlier)
    torch.testing.assert_close(rotate(rotate(k, "in"), "out"), k, rtol=1e-5, atol=1e-5 * outlier)


def test_an_outlier_channel_no_longer_sets_the_scale_of_its_group() -> None:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(256, 64, generator=gen)
    k[:, 7] *= 50.0
    # The largest channel's share of each row's magnitude, before and after.
    share = (k.abs().amax(-1) / k.abs().mean(-1)).mean()
    rotated = rotate(k, "in")
    assert (rotated.abs().amax(-1) / rotated.abs().mean(-1)).mean() < share / 4


def test_rotation_is_on_for_quantized_policies_unless_h_0() -> None:
    assert KVPolicy.parse("k4v2").rotate and KVPolicy.parse("default").rotate
    assert not KVPolicy.parse("fp16").rotate
    off = KVPolicy.parse("default:h=0")
    assert not off.rotate and KVPolicy.parse(off.name) == off and "h=0" in off.name
    assert KVPolicy.parse("k8v4:r=16,h=0").name == "k8v4:r=16,h=0"
    with pytest.raises(ValueError, match="h is 1"):
        KVPolicy.parse("k4v4:h=2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("some", [False, True])
def test_rotate_qkv_rotates_the_rows_asked_into_contiguous_tensors(
    dtype: torch.dtype, head_dim: int, some: bool
) -> None:
    """``rotate_qkv`` against one ``rotate`` each, for every row or only some (the others left
    as they were), from views of one fused projection as the decoder passes them."""
    gen = torch.Generator().manual_seed(head_dim)
    fused = torch.randn(7, 15, head_dim, generator=gen).to(dtype)
    q, k, v = fused.split((9, 3, 3), 1)
    rows = torch.tensor([0, 3, 5]) if some else slice(None)
    got = rotate_qkv(q, k, v, rows)
    for x, kind, y in zip((q, k, v), ("query", "in", "in"), got, strict=True):
        want = x.clone()
        want[rows] = rotate(x[rows], kind)
        assert torch.equal(y, want) and y.is_contiguous()


@pytest.mark.skipif(not extension.available(), reason="no native kernels")
@pytest.mark.parametrize("head_dim", [8, 24, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("kind", ["in", "query", "out"])
def test_the_native_transform_is_the_matrix_product(head_dim: int, kind: str) -> None:
    """``hadamard`` (csrc/hadamard.cpp) against ``x M``, ``x M / b`` and ``o M^T / b`` in
    float64: block sizes 8 (scalar stages) to 256, several blocks (24, 80, 96), both dtypes."""
    matrix, block = rotation(head_dim)
    want_map = {"in": matrix, "query": matrix / block, "out": matrix.t() / block}[kind].double()
    gen = torch.Generator().manual_seed(head_dim)
    x = torch.randn(37, 3, head_dim, generator=gen)
    x[..., 1] *= 40.0  # an outlier channel
    want = x.double() @ want_map
    torch.testing.assert_close(rotate(x, kind).double(), want, rtol=1e-6, atol=1e-4)
    # bfloat16: the exact result rounded once, but for a last-bit tie.
    xb = x.bfloat16()
    got = rotate(xb, kind)
    exact = (xb.double() @ want_map).bfloat16()
    assert got.dtype == torch.bfloat16 and got.shape == xb.shape
    assert (got != exact).float().mean() < 0.01
    torch.testing.assert_close(got.float(), exact.float(), rtol=2**-7, atol=1e-6)
