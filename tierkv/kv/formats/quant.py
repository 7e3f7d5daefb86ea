"""KV storage formats: how one token of one KV head is stored in a page.

Each format is one entry of ``FORMATS``. The uncompressed format ``full`` keeps keys and values
in the model's compute dtype. Quantized formats ``kXvY`` store keys with X bits and values with Y
bits per element, quantized asymmetrically (min/max) per token and KV head in groups of
``group_size`` channels: every group keeps an fp16 scale and zero beside its packed codes, and
element ``i`` of a group is reconstructed as ``code_i * scale + zero``.

The scale and zero are rounded to fp16 *before* the codes are computed, the zero downwards and
the scale upwards, so the grid ``zero + [0, 2**bits - 1] * scale`` still covers the group's
``[min, max]``: no element is clamped and every element is within half a stored step of its
reconstruction (up to float32 arithmetic). Inputs must be finite and small enough for fp16
(``|x| < 65504`` and ``(max - min) / (2**bits - 1) < 65504``), which KV activations are.

A quantized page also stores each token's float32 attention score (the policy's running sum)
and int32 position (pruning leaves gaps, so a token's slot no longer tells its position).

Bytes per token per head at the default group size 32 (codes + scales/zeros + score +
position, or k + v for ``full`` at fp16), and how many tokens fit in a page of
``default_page_bytes(head_dim)`` bytes, with the bytes of a full page that hold no token
(field alignment and the tail) and the page bytes per token that capacity really costs. The
table is produced by ``layout`` itself and checked by ``tests/test_quant.py``::

    format  head_dim  bytes/token  tokens/page  waste  page bytes/token
    full          64          256           16      0             256.0
    k8v8          64          152           26    144             157.5
    k8v4          64          120           33    136             124.1
    k8v2          64          104           39     40             105.0
    k4v4          64           88           46     48              89.0
    k4v2          64           72           56     64              73.1
    k4v1          64           64           64      0              64.0
    k2v2          64           56           72     64              56.9
    full         128          512           16      0             512.0
    k8v8         128          296           27    200             303.4
    k8v4         128          232           35     72             234.1
    k8v2         128          200           40    192             204.8
    k4v4         128          168           48    128             170.7
    k4v2         128          136           60     32             136.5
    k4v1         128          120           68     32             120.5
    k2v2         128          104           78     80             105.0

Waste stays under 3.6% of a page for every format, so one page size serves all precisions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tierkv.kv.formats.layout import PageField, PageLayout

QUANT_BITS = (8, 4, 2, 1)
"""Bit widths a quantized key or value can have; each divides 8, so codes pack into bytes."""

DEFAULT_GROUP_SIZE = 32

# Bits of the uncompressed format: keys and values stay in the compute dtype.
_FULL_BITS = 16


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor ``[..., head_dim]`` quantized in groups of channels along its last dim.

    ``codes`` are uint8 ``[..., packed_bytes(head_dim, bits)]``; ``scale`` and ``zero`` are
    float16 ``[..., groups]`` with ``groups * group_size == head_dim``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Channels per group (the head dim itself when a group spans the whole head)."""
        return self.head_dim // self.scale.shape[-1]


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take once packed."""
    _check_bits(bits)
    return -(-n * bits // 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., n]`` (each below ``2**bits``) into ``[..., packed_bytes(n)]``.

    Code ``i`` goes to byte ``i // (8 // bits)`` at bit ``(i % (8 // bits)) * bits``; the last
    byte is zero-padded when ``n * bits`` is not a multiple of 8.
    """
    n = codes.shape[-1]
    if bits == 8:
        return codes.to(torch.uint8)
    width = packed_bytes(n, bits)
    per_byte = 8 // bits
    padded = torch.nn.functional.pad(codes, (0, width * per_byte - n))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    grouped = padded.reshape(*codes.shape[:-1], width, per_byte)
    # The shifted codes occupy disjoint bits, so their sum is their bitwise OR and never carries.
    return (grouped << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: the ``n`` uint8 codes ``[..., n]`` held in ``packed``."""
    width = packed_bytes(n, bits)
    if packed.shape[-1] != width:
        raise ValueError(
            f"{n} codes of {bits} bits pack into {width} bytes, got {packed.shape[-1]}"
        )
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], width * (8 // bits))[..., :n]


def quantize(x: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Quantize ``x [..., head_dim]`` to ``bits`` bits, min/max per group of ``group_size``.

    A group size larger than ``head_dim`` means one group per row; otherwise it must divide
    ``head_dim``. A constant group gets a zero scale (or, when its value is not an fp16 number,
    a scale of about its fp16 rounding error) and reconstructs to its value within fp16 rounding.
    """
    _check_bits(bits)
    head_dim = x.shape[-1]
    width = _group_width(head_dim, group_size)
    qmax = (1 << bits) - 1
    grouped = x.float().reshape(*x.shape[:-1], head_dim // width, width)
    low, high = torch.aminmax(grouped, dim=-1)
    zero = _round_fp16(low, up=False)
    span = high - zero.float()
    # A span of a few float32 subnormals divides to 0, yet its step must still round up to a
    # positive fp16 so the grid reaches the max; any positive float32 below fp16's tiny does.
    ideal = torch.where(span > 0, (span / qmax).clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    scale = _round_fp16(ideal, up=True)
    step = scale.float()[..., None]
    # Only a constant group whose value is an fp16 number has a zero step; its codes are all 0,
    # so dividing by 1 instead keeps NaN out without changing anything.
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((grouped - zero.float()[..., None]) / safe_step).round_().clamp_(0, qmax)
    packed = pack(codes.to(torch.uint8).reshape(*x.shape[:-1], head_dim), bits)
    return QuantizedTensor(codes=packed, scale=scale, zero=zero, bits=bits, head_dim=head_dim)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct ``[..., head_dim]`` in ``dtype`` from a ``QuantizedTensor``."""
    groups = q.scale.shape[-1]
    codes = unpack(q.codes, q.bits, q.head_dim)
    codes = codes.reshape(*codes.shape[:-1], groups, q.head_dim // groups).float()
    out = torch.addcmul(q.zero.float()[..., None], codes, q.scale.float()[..., None])
    return out.reshape(*out.shape[:-2], q.head_dim).to(dtype)


@dataclass(frozen=True)
class KVFormat:
    """Precision of one stored token: ``key_bits``/``value_bits`` of 16 mean "uncompressed".

    Quantized formats use bit widths from ``QUANT_BITS`` and groups of ``group_size`` channels
    (tested at 32, 64 and 128; see ``with_group_size``).
    """

    name: str
    key_bits: int
    value_bits: int
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        bits = (self.key_bits, self.value_bits)
        if bits != (_FULL_BITS, _FULL_BITS) and not all(b in QUANT_BITS for b in bits):
            raise ValueError(
                f"format {self.name}: bits must both be {_FULL_BITS} or both in {QUANT_BITS}, "
                f"got k{self.key_bits}v{self.value_bits}"
            )
        if self.group_size < 1:
            raise ValueError(f"format {self.name}: group size must be positive")

    @property
    def quantized(self) -> bool:
        """Whether tokens are stored as packed codes with scales and zeros."""
        return self.key_bits != _FULL_BITS

    def fills_bytes(self, head_dim: int) -> bool:
        """Whether every group of channels packs into whole bytes at both bit widths (what
        the kernels that read a group's codes as whole bytes need)."""
        width = min(self.group_size, head_dim)
        return all(width * bits % 8 == 0 for bits in (self.key_bits, self.value_bits))

    def with_group_size(self, group_size: int) -> KVFormat:
        """The same format with another group size (same name: the bits name the format)."""
        return replace(self, group_size=group_size)

    def layout(self, head_dim: int, dtype: torch.dtype, page_bytes: int) -> PageLayout:
        """The page layout of this format for a head dim and compute dtype.

        ``full`` stores ``k`` and ``v`` in ``dtype``. Quantized formats store ``k_codes``,
        ``k_scale``, ``k_zero``, ``v_codes``, ``v_scale``, ``v_zero``, ``score`` and ``pos``;
        they need the codes to fill whole bytes (``head_dim * bits`` a multiple of 8), so
        ``decode`` can tell the head dim from the packed width.
        """
        if not self.quantized:
            fields = (PageField("k", dtype, head_dim), PageField("v", dtype, head_dim))
            return PageLayout(fields=fields, page_bytes=page_bytes)
        groups = head_dim // _group_width(head_dim, self.group_size)
        for bits in (self.key_bits, self.value_bits):
            if head_dim * bits % 8:
                raise ValueError(f"{bits}-bit codes of head dim {head_dim} do not fill whole bytes")
        fields = (
            PageField("k_codes", torch.uint8, packed_bytes(head_dim, self.key_bits)),
            PageField("k_scale", torch.float16, groups),
            PageField("k_zero", torch.float16, groups),
            PageField("v_codes", torch.uint8, packed_bytes(head_dim, self.value_bits)),
            PageField("v_scale", torch.float16, groups),
            PageField("v_zero", torch.float16, groups),
            PageField("score", torch.float32, 1),
            PageField("pos", torch.int32, 1),
        )
        return PageLayout(fields=fields, page_bytes=page_bytes)

    def encode(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """The page fields of ``N`` tokens: ``name -> [N, heads, numel]`` in the layout's dtypes.

        ``k``/``v`` are ``[N, heads, head_dim]``. ``positions`` and ``scores`` are ``[N]``
        (shared by every head) or ``[N, heads]``; formats that store them require positions,
        and scores default to 0 (no attention received yet). ``dtype`` is the stored dtype of
        ``full`` (the layout's compute dtype), by default ``k``'s.
        """
        if not self.quantized:
            dtype = dtype or k.dtype
            return {"k": k.to(dtype), "v": v.to(dtype)}
        if positions is None:
            raise ValueError(f"format {self.name} stores positions: pass positions=")
        tokens = k.shape[:2]
        if scores is None:
            scores = torch.zeros(tokens, dtype=torch.float32, device=k.device)
        kq = quantize(k, self.key_bits, self.group_size)
        vq = quantize(v, self.value_bits, self.group_size)
        return {
            "k_codes": kq.codes,
            "k_scale": kq.scale,
            "k_zero": kq.zero,
            "v_codes": vq.codes,
            "v_scale": vq.scale,
            "v_zero": vq.zero,
            "score": _per_token(scores, tokens, torch.float32),
            "pos": _per_token(positions, tokens, torch.int32),
        }

    def decode(
        self, fields: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[..., tokens, head_dim]`` in ``dtype`` from gathered page fields.

        ``fields`` maps layout field names to ``[..., tokens, numel]`` (as indexed out of
        ``PagePool.fields``); fields ``decode`` does not need (score, pos) may be absent.
        """
        if not self.quantized:
            return fields["k"].to(dtype), fields["v"].to(dtype)
        k = self._dequantize(fields, "k", self.key_bits, dtype)
        v = self._dequantize(fields, "v", self.value_bits, dtype)
        return k, v

    @staticmethod
    def _dequantize(
        fields: dict[str, torch.Tensor], prefix: str, bits: int, dtype: torch.dtype
    ) -> torch.Tensor:
        codes = fields[f"{prefix}_codes"]
        q = QuantizedTensor(
            codes=codes,
            scale=fields[f"{prefix}_scale"],
            zero=fields[f"{prefix}_zero"],
            bits=bits,
            head_dim=codes.shape[-1] * 8 // bits,
        )
        return dequantize(q, dtype)


FULL = KVFormat("full", _FULL_BITS, _FULL_BITS)

# (key bits, value bits) of the quantized formats; a new precision is one more pair. Keys never
# get fewer bits than values: they feed the softmax's logits and are the more sensitive.
# (key bits, value bits) of the quantized formats; csrc/paged_decode.cpp instantiates these.
QUANTIZED_BITS = ((8, 8), (8, 4), (8, 2), (4, 4), (4, 2), (4, 1), (2, 2))

FORMATS: dict[str, KVFormat] = {
    FULL.name: FULL,
    **{f"k{kb}v{vb}": KVFormat(f"k{kb}v{vb}", kb, vb) for kb, vb in QUANTIZED_BITS},
}


def default_page_bytes(head_dim: int) -> int:
    """Page size: 16 uncompressed tokens at 2 bytes per element (64 * head_dim bytes).

    One page holds one (request, layer, KV head) slice, so a small page keeps the partly
    filled last page of each head cheap: at head dim 64 a page is 4 KiB, 16 bf16 tokens or
    8 float32 tokens, with no waste for the uncompressed format. Quantized formats waste at
    most 3.6% of it (see the module docstring's table).
    """
    return 64 * head_dim


def _check_bits(bits: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"quantization bits must be one of {QUANT_BITS}, got {bits}")


def _group_width(head_dim: int, group_size: int) -> int:
    """Channels per group: ``group_size``, or the whole head when the group is larger."""
    width = min(group_size, head_dim)
    if width < 1 or head_dim % width:
        raise ValueError(f"group size {group_size} does not divide head dim {head_dim}")
    return width


def _round_fp16(x: torch.Tensor, *, up: bool) -> torch.Tensor:
    """``x`` rounded to float16 towards +inf (``up``) or -inf, instead of to nearest."""
    nearest = x.half()
    wrong_side = nearest.float() < x if up else nearest.float() > x
    towards = _TOWARDS_UP if up else _TOWARDS_DOWN
    return torch.where(wrong_side, torch.nextafter(nearest, towards), nearest)


# ``nextafter`` targets, broadcast against any shape (made once: a step quantizes per layer).
_TOWARDS_UP = torch.tensor(float("inf"), dtype=torch.float16)
_TOWARDS_DOWN = torch.tensor(float("-inf"), dtype=torch.float16)


def _per_token(values: torch.Tensor, tokens: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``[N]`` or ``[N, heads]`` values as the ``[N, heads, 1]`` field of one scalar per token."""
    values = values.to(dtype)
    if values.dim() == 1:
        values = values[:, None]
    return values.expand(tokens).unsqueeze(-1)
