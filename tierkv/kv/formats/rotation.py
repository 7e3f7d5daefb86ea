"""The rotated basis quantized policies store keys and values in (``KVPolicy.rotate``).

A few channels of a model's keys carry most of their magnitude (the outlier channels KIVI
quantizes per channel for). Quantized per token, those channels set each group's scale and
the others lose their resolution. Multiplying every key and query by the same orthogonal
matrix leaves every attention logit unchanged (``q R . k R = q . k``) and spreads each
outlier over all channels of its block, so per-token groups see evenly sized values (the
rotation QuaRot and SpinQuant apply before low-bit KV quantization). Values get the same
treatment: the cache holds ``v R`` and the output is rotated back by ``R^T``.

The matrix is a Walsh-Hadamard matrix with seeded random column signs, block-diagonal over the
largest power of two that divides the head dim (64 -> one 64 block, 96 -> three of 32). Its
entries are +1 and -1, so ``x M`` has exact products in any dtype and one rounding of a sum;
``M M^T = b I`` (``b`` the block size, a power of two), so the scales below are exact too:

* stored keys ``k M`` and values ``v M``;
* queries ``q M / b``, so that ``(q M / b) . (k M) = q . k``;
* the attention output ``o M^T / b`` back in the model's basis.

On CPU, where the extension is built, rows go through ``torch.ops.tierkv.hadamard``: the
fast Walsh-Hadamard transform (``csrc/hadamard.cpp``; log2(b) butterfly stages instead of a
product, about 4x less work than ``invariant_linear`` at head dim 64, and one op call per use).
Elsewhere they go through ``linear`` with the matrix. Either way a row's result does not depend
on the rows beside it, which the engine's batch-invariant mode needs.
"""

from __future__ import annotations

import functools

import torch

from tierkv import extension

# Fixed so that every process (and a prefix cache's pages) stores in the same basis.
_SEED = 0x7E1C


@functools.cache
def _signs(head_dim: int) -> torch.Tensor:
    """The seeded column signs ``s`` [D] of ``M`` (+-1, float32)."""
    bits = torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(_SEED))
    return (bits * 2 - 1).float()


@functools.cache
def rotation(head_dim: int) -> tuple[torch.Tensor, int]:
    """The float32 matrix ``M`` [D, D] (entries +-1) and its block size ``b`` (see above):
    ``M = blockdiag(H, ..., H) diag(s)``, ``H`` the Sylvester Hadamard matrix of size ``b``."""
    block = head_dim & -head_dim  # the largest power of two dividing head_dim
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    matrix = torch.block_diag(*[h] * (head_dim // block)) * _signs(head_dim)[None, :]
    return matrix, block


@functools.cache
def _weights(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """``linear`` weights ([out, in]) of the three maps, in the compute dtype: +-1 entries and
    a power-of-two scale are exact in every float dtype."""
    matrix, block = rotation(head_dim)
    return {
        "in": matrix.t().contiguous().to(dtype=dtype, device=device),
        "query": (matrix.t() / block).contiguous().to(dtype=dtype, device=device),
        "out": (matrix / block).contiguous().to(dtype=dtype, device=device),
    }


def rotate(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` [..., D] in the rotated basis (``kind`` ``"in"`` for keys and values,
    ``"query"`` for queries) or, for ``"out"``, an attention output back in the model's."""
    dim = x.shape[-1]
    if (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and extension.available()
    ):
        # x M = H(x) s, x M / b = H(x) s / b, o M^T / b = H(o s) / b (csrc/hadamard.cpp).
        block = dim & -dim
        scale = 1.0 if kind == "in" else 1.0 / block
        return torch.ops.tierkv.hadamard(x, _signs(dim), scale, kind == "out")
    rows = x.reshape(-1, dim)
    weight = _weights(dim, x.dtype, x.device)[kind]
    return torch.nn.functional.linear(rows, weight).reshape(x.shape)


def rotate_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | slice
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values [N, heads, D] with rows ``rows`` in the rotated basis, each
    contiguous (the kernels take each with its rows one after the other). One product each:
    cheaper than one over their concatenation, which is copied in and out (SmolLM2 shapes,
    bf16: 37 against 46 us a decode layer, 1.7 against 3.1 ms a 2,048-token chunk's)."""
    return (
        rotate_rows(q, rows, "query").contiguous(),
        rotate_rows(k, rows, "in").contiguous(),
        rotate_rows(v, rows, "in").contiguous(),
    )


def rotate_rows(x: torch.Tensor, rows: torch.Tensor | slice, kind: str) -> torch.Tensor:
    """``rotate`` applied to the rows ``rows`` of ``x`` [N, ...] (a slice: all of them, no
    copy of the others); the other rows unchanged."""
    if isinstance(rows, slice):
        return rotate(x, kind)
    x = x.clone()
    x[rows] = rotate(x[rows], kind)
    return x
