"""Peer KV-cache methods, run through Hugging Face transformers on the same checkpoint.

Every peer is a ``Peer``: a way to build the cache (and, for kvpress, the press applied while
the prompt is prefilled) plus an analytic byte count per token, with the same accounting as the
tierkv pool: 2 bytes per fp16 element, 2 bytes per fp16 scale or zero, and index metadata where
a method needs it. Bytes are those of a prompt of ``length`` tokens once compressed.

- ``hf:full``: transformers' ``DynamicCache``, uncompressed. It is the reference of every peer
  below, so a peer's ratios measure its compression alone, not framework numerics; its own row
  compares it with tierkv's ``fp16`` (the gap between the two frameworks).
- kvpress presses (``snapkv``, ``expected``, ``streaming``, ``knorm``, ``adakv-snapkv``) at a
  compression ratio ``r``: the press prunes the prompt's cache once, at the end of prefill;
  tokens generated later are kept in full. SnapKV, ExpectedAttention, StreamingLLM and KNorm keep
  the same number of tokens in every head and really shrink the cache tensors. **AdaKV does not
  free memory**: kvpress masks the pruned keys of each head in attention and keeps the full
  tensors; its bytes here are what a per-head store would need (kept tokens plus a 4-byte
  position per token), not what kvpress holds.
- ``quanto-int4``/``quanto-int2``: transformers' ``QuantizedCache`` (optimum-quanto backend) at
  its defaults: groups of 64 contiguous elements along the head dim, fp16 scale and shift per
  group, a full-precision residual of 128 tokens (counted at its full size).
- ``kivi-2``/``kivi-4``: a KIVI-style quantizer **simulated** here (not a tierkv pool policy):
  keys per channel in groups of 32 tokens, values per token in groups of 32 channels, a
  full-precision residual window of 128 tokens. The cache stores the dequantized values, so the
  model sees exactly what a KIVI kernel would read; the memory saving is analytic.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from tierkv.eval.optional import PeerUnavailable, require

ModelShape = tuple[int, int, int]
"""(num_layers, num_kv_heads, head_dim) of a model."""

PRESS_RATIOS = (0.25, 0.5, 0.75, 0.875)
PRESSES = ("snapkv", "expected", "streaming", "knorm", "adakv-snapkv")
QUANTO_BITS = (4, 2)
KIVI_BITS = (2, 4)

# Defaults of the methods as their authors ship them.
QUANTO_GROUP = 64
QUANTO_RESIDUAL = 128
KIVI_GROUP = 32
KIVI_RESIDUAL = 128
FP16_BYTES = 2
INDEX_BYTES = 4


@dataclass(frozen=True)
class Peer:
    """A KV method run through transformers.

    Attributes:
        name: row name in the results (``snapkv@0.5``, ``quanto-int4``, ``kivi-2``...).
        make_cache: builds a fresh cache for one forward sequence, given the HF config.
        press: context manager factory applied around the prefill forward, or None.
        bytes_per_token: analytic KV bytes per token of a ``length``-token prompt.
        memory_freed: False where the method keeps the full cache and only masks it.
        note: one line on how the bytes were counted.
    """

    name: str
    make_cache: Callable[[Any], Any]
    press: Callable[[Any], AbstractContextManager[None]] | None
    bytes_per_token: Callable[[ModelShape, int], float]
    memory_freed: bool = True
    note: str = ""


def _dense_bytes(shape: ModelShape) -> float:
    layers, heads, dim = shape
    return float(layers * heads * 2 * dim * FP16_BYTES)


def _dynamic_cache(config: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=config)


def reference_peer() -> Peer:
    """transformers' uncompressed ``DynamicCache``: the reference of the other peers."""
    return Peer("hf:full", _dynamic_cache, None, lambda s, n: _dense_bytes(s), note="dense fp16")


def press_peer(kind: str, ratio: float) -> Peer:
    """A kvpress press at compression ratio ``ratio`` (fraction of prompt tokens pruned)."""
    require("kvpress")
    try:
        import kvpress
    except Exception as exc:  # a kvpress that does not import with this transformers
        raise PeerUnavailable(
            f"kvpress does not import here ({type(exc).__name__}: {exc}); "
            "pip install 'tierkv[eval]' pins a transformers it works with"
        ) from exc

    builders: dict[str, Callable[[], Any]] = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
        "expected": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "streaming": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
        "adakv-snapkv": lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio)),
    }
    if kind not in builders:
        raise ValueError(f"unknown press {kind!r}; known: {', '.join(builders)}")
    press = builders[kind]()
    masked = kind.startswith("adakv")

    def nbytes(shape: ModelShape, length: int) -> float:
        kept = int(length * (1 - ratio)) / length
        per_token = _dense_bytes(shape) + (shape[0] * shape[1] * INDEX_BYTES if masked else 0)
        return kept * per_token

    note = (
        "kept tokens + 4-byte index per (layer, head); kvpress masks, memory NOT freed"
        if masked
        else "kept tokens, dense fp16 (pruned tensors are freed)"
    )
    return Peer(f"{kind}@{ratio:g}", _dynamic_cache, press, nbytes, not masked, note)


def quanto_peer(bits: int) -> Peer:
    """transformers' ``QuantizedCache`` with the optimum-quanto backend at its defaults."""
    require("optimum.quanto")
    from transformers import QuantizedCache

    def make(config: Any) -> Any:
        return QuantizedCache(backend="quanto", config=config, nbits=bits)

    def nbytes(shape: ModelShape, length: int) -> float:
        layers, heads, dim = shape
        groups = -(-dim // QUANTO_GROUP)
        quant = 2 * (dim * bits / 8 + groups * 2 * FP16_BYTES)
        full = 2 * dim * FP16_BYTES
        residual = min(QUANTO_RESIDUAL, length)
        return layers * heads * ((length - residual) * quant + residual * full) / length

    note = f"int{bits} codes + fp16 scale/shift per {QUANTO_GROUP} elts, {QUANTO_RESIDUAL} fp16"
    return Peer(f"quanto-int{bits}", make, None, nbytes, note=note + " residual")


def kivi_peer(bits: int) -> Peer:
    """The simulated KIVI-style quantizer (see ``KiviLayer``)."""

    def make(config: Any) -> Any:
        return Cache(layers=[KiviLayer(bits) for _ in range(config.num_hidden_layers)])

    def nbytes(shape: ModelShape, length: int) -> float:
        layers, heads, dim = shape
        codes = 2 * dim * bits / 8
        key_scales = dim * 2 * FP16_BYTES / KIVI_GROUP  # per channel, shared by 32 tokens
        value_scales = (dim // KIVI_GROUP) * 2 * FP16_BYTES  # per token, per 32 channels
        quant = codes + key_scales + value_scales
        residual = min(KIVI_RESIDUAL, length)
        full = 2 * dim * FP16_BYTES
        return layers * heads * ((length - residual) * quant + residual * full) / length

    note = f"simulated: K per channel/V per token, {KIVI_RESIDUAL} fp16 residual"
    return Peer(f"kivi-{bits}", make, None, nbytes, note=note)


def default_peers() -> tuple[list[Peer], list[str]]:
    """Every peer of the default sweep that can run here, and a message per skipped group."""
    peers: list[Peer] = [reference_peer()]
    skipped: list[str] = []
    try:
        peers += [press_peer(k, r) for k in PRESSES for r in PRESS_RATIOS]
    except PeerUnavailable as exc:
        skipped.append(f"kvpress presses skipped: {exc}")
    try:
        peers += [quanto_peer(b) for b in QUANTO_BITS]
    except PeerUnavailable as exc:
        skipped.append(f"QuantizedCache skipped: {exc}")
    peers += [kivi_peer(b) for b in KIVI_BITS]
    return peers, skipped


def parse_peer(spec: str) -> Peer:
    """A peer from its row name: ``hf:full``, ``snapkv@0.5``, ``quanto-int4``, ``kivi-2``."""
    if spec == "hf:full":
        return reference_peer()
    if "@" in spec:
        kind, ratio = spec.split("@", 1)
        return press_peer(kind, float(ratio))
    if spec.startswith("quanto-int"):
        return quanto_peer(int(spec.removeprefix("quanto-int")))
    if spec.startswith("kivi-"):
        return kivi_peer(int(spec.removeprefix("kivi-")))
    raise ValueError(
        f"unknown peer {spec!r}; use hf:full, PRESS@RATIO (presses: {', '.join(PRESSES)}), "
        "quanto-int4, quanto-int2, kivi-2 or kivi-4"
    )


# -- the simulated KIVI cache ----------------------------------------------------------------


def fake_quantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min/max quantize-dequantize of ``x`` with one scale/zero along ``dim``.

    Scale and zero are rounded to fp16 as they would be stored.
    """
    lo = x.amin(dim=dim, keepdim=True).half().float()
    hi = x.amax(dim=dim, keepdim=True).float()
    scale = ((hi - lo) / (2**bits - 1)).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((x.float() - lo) / safe).round().clamp(0, 2**bits - 1)
    return (codes * scale + lo).to(x.dtype)


def kivi_keys(k: torch.Tensor, bits: int, group: int = KIVI_GROUP) -> torch.Tensor:
    """Keys [B, H, T, D] (T a multiple of ``group``): per channel over groups of tokens."""
    b, h, t, d = k.shape
    return fake_quantize(k.reshape(b, h, t // group, group, d), bits, dim=3).reshape(b, h, t, d)


def kivi_values(v: torch.Tensor, bits: int, group: int = KIVI_GROUP) -> torch.Tensor:
    """Values [B, H, T, D]: per token over groups of ``group`` channels."""
    b, h, t, d = v.shape
    g = min(group, d)
    return fake_quantize(v.reshape(b, h, t, d // g, g), bits, dim=4).reshape(b, h, t, d)


class KiviLayer(DynamicLayer):
    """A ``DynamicLayer`` whose tokens older than the residual window are quantized.

    Whenever more than ``residual + group`` tokens are unquantized, the oldest whole groups of
    ``group`` tokens are quantize-dequantized in place (keys per channel, values per token);
    the newest ``residual`` tokens stay exact. As in KIVI, the forward that adds tokens attends
    to them unquantized.
    """

    def __init__(self, bits: int, group: int = KIVI_GROUP, residual: int = KIVI_RESIDUAL) -> None:
        super().__init__()
        self.bits = bits
        self.group = group
        self.residual = residual
        self.num_quantized = 0

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, cache_kwargs)
        pending = keys.shape[-2] - self.num_quantized - self.residual
        n = (pending // self.group) * self.group
        if n > 0:
            span = slice(self.num_quantized, self.num_quantized + n)
            # New tensors: the ones returned for this forward keep the exact values.
            self.keys = self.keys.clone()
            self.values = self.values.clone()
            self.keys[:, :, span] = kivi_keys(self.keys[:, :, span], self.bits, self.group)
            self.values[:, :, span] = kivi_values(self.values[:, :, span], self.bits, self.group)
            self.num_quantized += n
        return keys, values


def press_context(peer: Peer, model: Any, prompt_len: int) -> AbstractContextManager[None]:
    """The context to run a ``prompt_len``-token prefill forward in (the press, or nothing).

    A SnapKV-style press scores the prompt with its last ``window_size`` queries and refuses a
    prompt no longer than that window (kvpress asserts). Such a prompt has nothing outside the
    window to select from, so it is kept whole, as a deployment of the press would keep it:
    short chat prompts then score as the uncompressed cache does, not as an error.
    """
    if peer.press is None:
        return nullcontext()
    scorer = getattr(peer.press, "press", peer.press)  # AdaKV wraps the press it adapts
    if prompt_len <= getattr(scorer, "window_size", 0):
        return nullcontext()
    return peer.press(model)
