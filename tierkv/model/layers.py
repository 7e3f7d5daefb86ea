"""Building blocks of the decoder: linear layers, RMSNorm, rotary position embedding, gated MLP."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tierkv import extension

logger = logging.getLogger(__name__)

# Up to this many rows (decode steps of that many requests) the native kernel
# (``csrc/small_batch_linear.cpp``) streams the weights faster than torch's matrix product;
# beyond, torch's blocked product reuses each weight across rows and wins.
NATIVE_LINEAR_ROWS = 4
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)
# A weight of at least this many bytes keeps only its oneDNN layout once packed (``Linear.
# prepack``): streamed from memory, from about 1 MB on, oneDNN over the packed copy costs what
# the native kernel does at one row and 1.3-1.9x less at four, so the row-major copy would
# only double the memory.
RELEASE_BYTES = 1 << 20


def native_dtype(dtype: torch.dtype) -> bool:
    """Whether this module's native kernels serve ``dtype``: float32 and bfloat16 with the
    extension built. They are the small-batch linear layer (``linear``) and the one-pass
    RMSNorm, SiLU product and rotary embedding (``csrc/fused_elementwise.cpp``), which give
    torch's values (bf16 rounding where torch rounds) at a fraction of the passes and
    dispatches."""
    return dtype in _NATIVE_DTYPES and extension.available()


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` [out, in] reordered once into oneDNN's blocked layout for ``linear``, or None
    where this torch build or CPU has no oneDNN linear for its dtype (float32 always,
    bfloat16 with AVX-512).

    ``F.linear`` reorders the weight on every call; a pre-reordered one (what inductor's
    freezing does) made a decode step's linear layers 1.2-1.8x faster from 2 to 64 rows and
    1.1x at 512 for a 0.36B-parameter model, whose weights stream from memory, and 1.1-1.5x
    from 8 to 32 rows for the demo model's cached ones (scripts/bench_linear.py).
    """
    if weight.dtype not in _NATIVE_DTYPES or not torch.backends.mkldnn.is_available():
        return None
    try:
        if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        # The batch-size hint picks a blocking; measured not to matter from 1 to 512 rows. A
        # copy that requires grad would send every call through autograd (about 30 ms here).
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    except (AttributeError, RuntimeError) as exc:
        # A torch build without these private ops, or a CPU oneDNN refuses: F.linear serves.
        _packing_unavailable(f"{type(exc).__name__}: {str(exc).strip().splitlines()[:1]}")
        return None


@functools.cache
def _packing_unavailable(reason: str) -> None:
    """Say once per reason that linear layers run without packed weights."""
    logger.warning("linear weights stay unpacked (%s); F.linear serves them", reason)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
    invariant: bool = False,
) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` [N, in].

    Up to ``NATIVE_LINEAR_ROWS`` rows of a weight it holds, by the native small-batch kernel
    (float32 or bfloat16, extension built): a decode step of a few requests reads the weights
    at close to memory bandwidth, where oneDNN's fixed cost per call (15-30 µs) outweighs a
    small weight's reads. Otherwise by oneDNN over ``packed`` (``pack_weight(weight)``; the
    weight may then be released, empty), else ``F.linear``.

    These kernels round a row differently from one another, and oneDNN's own rounding of a row
    changes with the number of rows (its blocking follows the shape), so a row's result
    depends on the batch around it. ``invariant`` (the engine's ``batch_invariant`` mode) makes
    it depend on the row alone: every row count goes through ``invariant_linear``
    (``csrc/small_batch_linear.cpp``: the small-batch kernel's fixed per-element summation,
    tiled for any count), or where that kernel does not serve (float16, no extension) through
    ``F.linear`` one row at a time (slow, but the same call for every row).
    """
    if invariant and x.dim() == 2:
        if x.dtype == weight.dtype and native_dtype(x.dtype):
            return torch.ops.tierkv.invariant_linear(x, weight, bias)
        if x.shape[0] > 1:
            return torch.cat([F.linear(row, weight, bias) for row in x.split(1)])
        return F.linear(x, weight, bias)
    rows = x.shape[0] if x.dim() == 2 else 0
    if (
        0 < rows <= NATIVE_LINEAR_ROWS
        and weight.numel()
        and x.dtype == weight.dtype
        and native_dtype(x.dtype)
    ):
        return torch.ops.tierkv.small_batch_linear(x, weight, bias)
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computed by ``linear``, over oneDNN's layout of its weight once
    ``prepack`` has run."""

    packed: torch.Tensor | None = None
    # Batch-invariant mode (``set_invariant``): every row count through ``invariant_linear``.
    invariant: bool = False

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the weight, whichever copy holds it."""
        return self.in_features * self.out_features * self.weight.element_size()

    def prepack(self) -> None:
        """Reorder the weight for oneDNN (``pack_weight``; nothing where that has no path for
        the dtype). A weight of ``RELEASE_BYTES`` or more then keeps only that copy: its
        ``weight`` becomes empty."""
        self.packed = pack_weight(self.weight)
        if self.packed is not None and self.weight_nbytes >= RELEASE_BYTES:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def set_invariant(self) -> None:
        """Compute every row count by ``linear``'s batch-invariant path. It reads the row-major
        weight, so this is for a layer that has not been packed (``prepack`` releases it)."""
        if self.packed is not None:
            raise RuntimeError("a packed Linear may have released its row-major weight")
        self.invariant = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed, self.invariant)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the activation dtype (as HF does)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native_dtype(x.dtype):
            return torch.ops.tierkv.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def fused_linear(
    in_features: int, parts: tuple[tuple[str, int], ...], bias: bool, dtype: torch.dtype
) -> Linear:
    """One linear layer standing for several checkpoint projections stacked along the output.

    ``parts`` names each projection as the checkpoint does (e.g. ``q_proj``) with its output
    size; the loader fills the matching row slices. One matmul instead of several per layer
    matters on CPU, where small models are bound by per-call overhead.
    """
    layer = Linear(in_features, sum(size for _, size in parts), bias=bias, dtype=dtype)
    layer.fused_from = parts
    return layer


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``: the MLP of every supported family."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        parts = (("gate_proj", intermediate), ("up_proj", intermediate))
        self.gate_up_proj = fused_linear(hidden, parts, bias=False, dtype=dtype)
        self.down_proj = Linear(intermediate, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if native_dtype(x.dtype):
            return self.down_proj(torch.ops.tierkv.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters as read from ``config.json``.

    ``rope_type`` is ``default``, ``linear`` or ``llama3``; the other types change the
    frequencies with the running sequence length (``dynamic``) or scale attention (``yarn``),
    which this engine refuses rather than approximates.
    """

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies (float32, ``head_dim // 2``) with the configured scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band
        # between them interpolated smoothly.
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (the half-split layout HF uses): its angles are worked out
    once per step (``forward``) and applied to q and k by every layer (``apply_rotary``)."""

    def __init__(self, head_dim: int, rope: RopeConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, rope), persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``sin`` [N, 1, D] in ``dtype`` of the angles of token ``positions`` [N]."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [N, Hq, D] and ``k`` [N, Hkv, D] by the ``(cos, sin)`` of their tokens."""
    cos, sin = rope
    if native_dtype(q.dtype):
        return torch.ops.tierkv.rotary(q, k, cos, sin)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
