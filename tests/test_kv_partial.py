"""Causal prefill attention without a mask (``partial.causal_attention``) against SDPA with the
causal mask every other path builds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tierkv.kv.backends.partial import causal_attention
from tierkv.kv.store.views import causal_visibility


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize(("context", "n"), [(0, 1), (0, 50), (1, 1), (13, 40), (300, 17)])
@pytest.mark.parametrize("group", [1, 3])
def test_causal_attention_equals_masked_sdpa(
    dtype: torch.dtype, window: int | None, context: int, n: int, group: int
) -> None:
    gen = torch.Generator().manual_seed(context * 31 + n)
    heads, dim, total = 2, 32, context + n
    q = torch.randn(1, heads * group, n, dim, generator=gen).to(dtype)
    k = torch.randn(1, heads, total, dim, generator=gen).to(dtype)
    v = torch.randn(1, heads, total, dim, generator=gen).to(dtype)
    visible = causal_visibility(torch.arange(context, total), torch.arange(total), window)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    got = causal_attention(q, k, v, context, window)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
