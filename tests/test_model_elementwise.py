"""The native one-pass RMSNorm, SiLU product and rotary embedding against transformers' own
modules and functions (Llama's), in both dtypes the engine computes in on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from tierkv import extension
from tierkv.model.layers import GatedMLP, RMSNorm, apply_rotary, native_dtype

pytestmark = pytest.mark.skipif(
    not extension.available(), reason=f"no native kernels: {extension.unavailable_reason()}"
)

DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


def _agree(ours: torch.Tensor, theirs: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """bfloat16: torch's roundings are reproduced, so values are equal but for rare one-ulp
    flips (a row's sum of squares in another order, an exponential's last bit); float32:
    equal to about 1e-6 relative (fused multiply-adds, the exponential's last bits, carried
    through a matrix product). ``scale``: the magnitude each float32 output's error scales
    with, where cancellation makes that larger than the output itself."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if ours.dtype == torch.bfloat16:
        differ = ours != theirs
        assert differ.float().mean() <= 1e-3
        ulp = theirs.float().abs().clamp(min=1e-30) * 2**-7
        assert ((ours.float() - theirs.float()).abs() <= ulp * 1.01)[differ].all()
    else:
        atol = 1e-5 if scale is None else 1e-5 * (1 + scale)
        assert ((ours - theirs).abs() <= atol + 1e-5 * theirs.abs()).all()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    dim=st.integers(1, 80),
    dtype=DTYPES,
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_matches_transformers(
    rows: int, dim: int, dtype: torch.dtype, scale: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=gen) * scale).to(dtype)
    weight = torch.randn(dim, generator=gen).to(dtype)
    theirs = LlamaRMSNorm(dim, eps=1e-6).to(dtype)
    ours = RMSNorm(dim, 1e-6, dtype)
    with torch.no_grad():
        theirs.weight.copy_(weight)
        ours.weight.copy_(weight)
    _agree(ours(x), theirs(x))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    hidden=st.integers(1, 40),
    intermediate=st.integers(1, 80),
    dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_gated_mlp_matches_silu_times_up(
    rows: int, hidden: int, intermediate: int, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    mlp = GatedMLP(hidden, intermediate, dtype)
    with torch.no_grad():
        mlp.gate_up_proj.weight.copy_(torch.randn(2 * intermediate, hidden, generator=gen))
        mlp.down_proj.weight.copy_(torch.eye(hidden, intermediate))  # passes the product on
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    gate, up = F.linear(x, mlp.gate_up_proj.weight).chunk(2, dim=-1)
    # A gate or up projection that nearly cancels carries the rounding of its terms' sizes
    # (our small-batch linear and oneDNN sum in other orders), multiplied by the other factor.
    sizes = F.linear(x.float().abs(), mlp.gate_up_proj.weight.float().abs())
    size_gate, size_up = sizes.chunk(2, dim=-1)
    scale = F.silu(gate.float()).abs() * size_up + up.float().abs() * size_gate
    scale = F.linear(scale, mlp.down_proj.weight.float().abs())
    _agree(mlp(x), F.linear(F.silu(gate) * up, mlp.down_proj.weight), scale)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 20),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    half=st.integers(1, 70),
    dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_rotary_matches_transformers(
    tokens: int, kv_heads: int, group: int, half: int, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    dim = 2 * half
    heads = kv_heads * group
    # q and k as the decoder has them: views into one fused projection's rows.
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    angles = torch.rand(tokens, 1, half, generator=gen) * 100
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    ours = apply_rotary(q, k, (cos, sin))
    # transformers' layout: [batch, heads, tokens, dim], cos/sin [batch, tokens, dim].
    theirs = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos.transpose(0, 1), sin.transpose(0, 1)
    )
    for got, want in zip(ours, theirs, strict=True):
        _agree(got, want[0].transpose(0, 1))


def test_float16_keeps_torch_ops() -> None:
    assert native_dtype(torch.bfloat16) and native_dtype(torch.float32)
    assert not native_dtype(torch.float16)
    norm = RMSNorm(8, 1e-6, torch.float16)
    x = torch.randn(3, 8).half()
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).half()
    assert torch.equal(norm(x), want)


def test_ops_refuse_what_they_do_not_compute() -> None:
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.tierkv.rms_norm(torch.randn(2, 4).half(), torch.ones(4).half(), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.tierkv.rms_norm(torch.randn(2, 4), torch.ones(5), 1e-6)
    with pytest.raises(RuntimeError, match="gate and up"):
        torch.ops.tierkv.silu_and_mul(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="share their dtype"):
        q = torch.randn(2, 1, 4)
        torch.ops.tierkv.rotary(q, q, torch.ones(2, 1, 4).bfloat16(), torch.ones(2, 1, 4))
