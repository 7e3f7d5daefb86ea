"""The native bfloat16 flash prefill kernel (``partial.flash``) against attention computed in
float64 from the same bfloat16 inputs, and beside torch's own bfloat16 kernel; its scoring
companion (``partial.flash_scores``, each key's probability summed over queries) likewise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tierkv.kv.backends.partial import flash, flash_scores, flash_serves
from tierkv.kv.store.views import causal_visibility

pytestmark = pytest.mark.skipif(
    not flash_serves(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)),
    reason="the extension is not built with AVX512-BF16 here",
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shift: int, window: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked softmax attention in float64: ``(out, lse, visible)``, query ``i`` at position
    ``shift + i`` over keys at positions ``0 ..``."""
    n, keys = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k64, v64 = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    visible = causal_visibility(torch.arange(shift, shift + n), torch.arange(keys), window)
    logits = q.double() @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return probs @ v64, lse, visible


@settings(max_examples=40, deadline=None)
@given(
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    dim=st.sampled_from([16, 32, 48, 64, 80, 128]),
    n=st.integers(1, 150),
    before=st.integers(0, 200),
    shift_delta=st.integers(-20, 20),
    window=st.one_of(st.none(), st.integers(1, 90)),
    seed=st.integers(0, 2**16),
)
def test_flash_equals_float64_attention(
    kv_heads: int,
    group: int,
    dim: int,
    n: int,
    before: int,
    shift_delta: int,
    window: int | None,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    keys = before + n
    # Query i sits at position shift + i; a negative shift leaves the first queries no key.
    shift = before + shift_delta
    q = torch.randn(1, kv_heads * group, n, dim, generator=gen).bfloat16()
    k = torch.randn(1, kv_heads, keys, dim, generator=gen).bfloat16()
    v = torch.randn(1, kv_heads, keys, dim, generator=gen).bfloat16()
    out, lse = flash(q, k, v, shift, window)
    want, want_lse, visible = reference(q, k, v, shift, window)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and lse.shape == q.shape[:3]
    blind = ~visible.any(-1)  # [n]: queries that see no key
    assert torch.isinf(lse[0][:, blind]).all() and not torch.isinf(lse[0][:, ~blind]).any()
    assert (out[0][:, blind] == 0).all()
    # Exact products and float32 sums: the log-sum-exp is float32-accurate; the output carries
    # the bf16 rounding of the probabilities and of itself.
    seen_lse, want_seen = lse[0][:, ~blind].double(), want_lse[0][:, ~blind]
    torch.testing.assert_close(seen_lse, want_seen, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


@settings(max_examples=30, deadline=None)
@given(
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 3, 4]),
    dim=st.sampled_from([16, 64, 96]),
    n=st.integers(1, 70),
    before=st.integers(0, 200),
    shift_delta=st.integers(-20, 20),
    window=st.one_of(st.none(), st.integers(1, 90)),
    extra=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_flash_scores_sum_the_float64_probabilities(
    kv_heads: int,
    group: int,
    dim: int,
    n: int,
    before: int,
    shift_delta: int,
    window: int | None,
    extra: float,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    keys, shift = before + n, before + shift_delta
    q = torch.randn(1, kv_heads * group, n, dim, generator=gen).bfloat16()
    k = (torch.randn(1, kv_heads, keys, dim, generator=gen) * 2).bfloat16()
    v = torch.zeros(1, kv_heads, keys, dim).bfloat16()
    _, want_lse, visible = reference(q, k, v, shift, window)
    # The rows also attend elsewhere (another part, ``extra`` more log-mass): their lse is
    # larger than this part's, and the sums are this part's share of the probabilities.
    lse = torch.logaddexp(want_lse, torch.full_like(want_lse, extra)).float()
    sums = flash_scores(q, k, lse, shift, window)
    assert sums.shape == (1, kv_heads * group, keys) and sums.dtype == torch.float32
    logits = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)
    probs = torch.exp(logits / math.sqrt(dim) - lse.double()[..., None]) * visible
    want = probs.sum(2)
    torch.testing.assert_close(sums.double(), want, rtol=1e-4, atol=1e-5)
    # A key no query sees gets nothing.
    assert (sums[0][:, ~visible.any(0)] == 0).all()


@settings(max_examples=30, deadline=None)
@given(
    group=st.sampled_from([1, 3]),
    dim=st.sampled_from([16, 64]),
    n=st.integers(1, 140),
    first=st.tuples(
        st.integers(0, 150), st.integers(-10, 10), st.one_of(st.none(), st.integers(1, 60))
    ),
    second=st.tuples(
        st.integers(1, 150), st.integers(-10, 10), st.one_of(st.none(), st.integers(1, 60))
    ),
    seed=st.integers(0, 2**16),
)
def test_flash_going_on_from_a_state_attends_both_key_sets(
    group: int,
    dim: int,
    n: int,
    first: tuple[int, int, int | None],
    second: tuple[int, int, int | None],
    seed: int,
) -> None:
    """``flash(..., state)`` over a second key set continues the first call's softmax: the
    float64 attention over both sets, each seen through its own band (shift, window)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2 * group, n, dim, generator=gen).bfloat16()
    parts, visible = [], []
    for keys, delta, window in (first, second):
        k = torch.randn(1, 2, keys, dim, generator=gen).bfloat16()
        v = torch.randn(1, 2, keys, dim, generator=gen).bfloat16()
        shift = keys - n + delta
        parts.append((k, v, shift, window))
        visible.append(
            causal_visibility(torch.arange(shift, shift + n), torch.arange(keys), window)
        )
    (k1, v1, s1, w1), (k2, v2, s2, w2) = parts
    out, lse = flash(q, k2, v2, s2, w2, flash(q, k1, v1, s1, w1))
    k64 = torch.cat([k1, k2], 2).double().repeat_interleave(group, 1)
    v64 = torch.cat([v1, v2], 2).double().repeat_interleave(group, 1)
    seen = torch.cat(visible, 1)
    logits = (q.double() @ k64.transpose(-1, -2) / math.sqrt(dim)).masked_fill(~seen, -math.inf)
    want_lse = torch.logsumexp(logits, -1)
    blind = ~seen.any(-1)
    probs = torch.exp(logits - torch.where(torch.isinf(want_lse), 0.0, want_lse)[..., None])
    assert torch.isinf(lse[0][:, blind]).all() and (out[0][:, blind] == 0).all()
    torch.testing.assert_close(
        lse[0][:, ~blind].double(), want_lse[0][:, ~blind], rtol=0, atol=1e-4
    )
    torch.testing.assert_close(out.double(), probs @ v64, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("window", [None, 100])
def test_flash_error_is_no_larger_than_torch_bfloat16_kernel(window: int | None) -> None:
    """On a long causal prompt, the kernel's error against float64 stays within torch's own
    bfloat16 SDPA error (both round the probabilities to bf16)."""
    gen = torch.Generator().manual_seed(0)
    n, dim = 700, 64
    q = torch.randn(1, 4, n, dim, generator=gen).bfloat16()
    k = torch.randn(1, 2, n, dim, generator=gen).bfloat16()
    v = torch.randn(1, 2, n, dim, generator=gen).bfloat16()
    want, _, visible = reference(q, k, v, 0, window)
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    ours = (flash(q, k, v, 0, window)[0].double() - want).abs()
    theirs = (torch_out.double() - want).abs()
    assert ours.mean() <= 1.5 * theirs.mean()
    assert ours.max() <= 1.5 * theirs.max()


def test_flash_refuses_what_it_does_not_compute() -> None:
    q = torch.randn(2, 5, 64).bfloat16()
    kv = torch.randn(1, 5, 64).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.tierkv.flash_prefill(q.float(), kv.float(), kv.float(), 0, 0, 0.125)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        odd = torch.randn(2, 5, 24).bfloat16()
        torch.ops.tierkv.flash_prefill(odd, odd[:1], odd[:1], 0, 0, 0.125)
    with pytest.raises(RuntimeError, match="divide"):
        three = torch.randn(3, 5, 64).bfloat16()
        torch.ops.tierkv.flash_prefill(q, three, three, 0, 0, 0.125)
