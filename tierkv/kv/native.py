"""A native (C++) decode kernel over quantized pages, built on first use.

``tierkv.kv.fast`` folds dequantization into two matmuls but still pays for a gather of every
page, unpacked float32 copies of the codes and about 40 small torch ops per layer, which at
decode sizes cost more than the arithmetic. ``csrc/paged_decode.cpp`` does the whole decode
attention of a layer in one call:

* one work item per (request, KV head), spread over torch's intra-op threads; the query heads
  sharing the KV head (GQA) are processed together, so every key and value byte is read once;
* pages are read in place from the arena through the page table (no gather), a block of up to
  64 tokens of one page at a time; each token's key is dequantized into registers (codes in
  "plane" order: the codes at bit ``p * bits`` of every byte, so unpacking is shifts and masks,
  see ``tierkv.kv.fast``) and dotted with every query head;
* an online (streaming) softmax in float32: each block's maximum rescales the running sums
  once, then the block's values are dequantized and accumulated the same way.

The kernel returns the log-sum-exp of the logits beside the output, so attention over a token
range can be split (``partial`` over several ranges, then ``tierkv.kv.partial.merge``) and
combined exactly with attention computed elsewhere (the residual window's uncompressed tokens).

The extension is compiled with ``torch.utils.cpp_extension.load`` the first time it is needed
(``-O3 -march=native``, or without ``-march=native`` when the compiler refuses it) into
``$XDG_CACHE_HOME/tierkv/ext/<hash>`` (``~/.cache`` by default), the hash covering the source,
the flags, torch's version and the CPU, so later processes load the cached build. A machine
without a compiler simply has no native kernel: ``available()`` says so and the engine keeps
its torch paths.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

from tierkv.kv.partial import merge, residual_part
from tierkv.kv.pool import PageLayout
from tierkv.kv.quant import KVFormat
from tierkv.kv.store import HIGH, KVStore, Residual

_SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"

# Tried in order: the first set the compiler accepts is kept. -fopenmp lets at::parallel_for
# (inlined from torch's headers) spread work items over torch's OpenMP threads.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
)

# Per-token fields the kernel reads, in the order it takes their offsets and strides.
_FIELDS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tierkv" / "ext"


def _cpu_signature() -> str:
    """What a -march=native build depends on: the machine and, on Linux, its CPU flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    """Build (or load the cached build of) the extension once per process.

    Returns the module, or None and why it could not be built.
    """
    try:
        from torch.utils import cpp_extension

        source = _SOURCE.read_bytes()
    except (ImportError, OSError) as exc:
        return None, f"cannot read the kernel source: {exc}"
    reasons = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), torch.__version__.encode()])
            + _cpu_signature().encode()
        ).hexdigest()[:16]
        build = _cache_root() / key
        try:
            build.mkdir(parents=True, exist_ok=True)
            module = cpp_extension.load(
                name=f"tierkv_paged_decode_{key}",
                sources=[str(_SOURCE)],
                extra_cflags=list(flags),
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                verbose=False,
            )
            return module, None
        except Exception as exc:  # any build failure means "no native kernel", never a crash
            reasons.append(f"{' '.join(flags)}: {str(exc).strip().splitlines()[-1:]}")
    return None, "the native kernel did not build (" + "; ".join(reasons) + ")"


def available() -> bool:
    """Whether the native kernel is built and loadable here (builds it on the first call)."""
    return _load()[0] is not None


def unavailable_reason() -> str | None:
    """Why ``available()`` is False, or None when the kernel is available."""
    return _load()[1]


def supports(fmt: KVFormat, head_dim: int) -> bool:
    """Whether the kernel serves slots stored in ``fmt`` at this head dim.

    Quantized formats whose groups of channels fill whole bytes at both bit widths: the same
    formats as ``tierkv.kv.fast.supports``.
    """
    if not fmt.quantized:
        return False
    width = min(fmt.group_size, head_dim)
    return head_dim % width == 0 and all(
        width * bits % 8 == 0 for bits in (fmt.key_bits, fmt.value_bits)
    )


@functools.cache
def _fields(layout: PageLayout) -> tuple[list[int], list[int], int]:
    """Byte offsets and per-token strides of the kernel's fields in pages of ``layout``, and
    its tokens per page (cached: ``PageLayout.offsets`` walks the fields in Python)."""
    offsets = layout.offsets()
    strides = {field.name: field.token_bytes for field in layout.fields}
    return (
        [offsets[name] for name in _FIELDS],
        [strides[name] for name in _FIELDS],
        layout.tokens_per_page,
    )


def partial(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    pages: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    f: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [B, Hq, D] over the token indices ``[starts[b], ends[b])`` of each
    request, stored in format index ``f`` in the pages ``pages`` [B, H, P] (page ids of each
    (request, KV head) of one layer, e.g. ``store.tables[slots, layer, :, HIGH, :P]``).

    Token ``i`` is slot ``i % tokens_per_page`` of page ``pages[b, h, i // tokens_per_page]``;
    only the pages holding tokens of the range are read, so stale ids past them are harmless.
    The logits are scaled by ``1/sqrt(D)``. Returns ``(out, lse)``: ``out`` [B, Hq, D] in
    ``q``'s dtype (0 for an empty range) and ``lse`` [B, Hq] float32, the log-sum-exp of the
    logits over the range (-inf for an empty range).
    ``layer`` is only checked against the store (the pages already name the layer's tokens).
    ``tierkv.kv.partial.merge`` combines parts.
    """
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    if not 0 <= layer < store.num_layers:
        raise ValueError(f"layer {layer} outside the store's {store.num_layers} layers")
    fmt = store.formats[f]
    if not supports(fmt, store.head_dim):
        raise ValueError(
            f"the native kernel does not serve {fmt.name} at head dim {store.head_dim}"
        )
    offsets, strides, per_page = _fields(store.layouts[f])
    dim = q.shape[-1]
    return module.paged_decode(
        q,
        store.pool.arena,
        pages,
        starts,
        ends,
        1.0 / math.sqrt(dim),
        fmt.key_bits,
        fmt.value_bits,
        fmt.group_size,
        offsets,
        strides,
        per_page,
    )


def decode(
    store: KVStore,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    window: int | None,
    f: int,
    cache: dict | None = None,
    residual: Residual | None = None,
) -> torch.Tensor:
    """Attention of one query token per slot over the slot's first ``lens`` tokens (the last
    ``window`` of them under a sliding window): the contract of ``tierkv.kv.fast.decode``,
    residual window included (the kernel stops before it; its part is merged here).

    ``q`` is ``[B, Hq, D]``; every slot stores its (uniform) tokens in the store's format
    index ``f``, which ``supports``. Returns ``[B, Hq, D]`` in ``q``'s dtype.

    ``cache`` (a dict the caller keeps for one step and passes again for every layer with the
    same ``slots`` and ``lens``) holds what does not change between layers: the page ids of
    every layer, gathered once, and the start of each request's visible range.
    """
    cache = {} if cache is None else cache
    per_page = store.layouts[f].tokens_per_page
    plan = cache.get(("native", f))
    if plan is None:
        num = -(-int(lens.max()) // per_page)
        # [L, B, H, num]: one contiguous [B, H, num] table per layer.
        pages = store.tables[slots, :, :, HIGH, :num].transpose(0, 1).contiguous()
        plan = cache[("native", f)] = (pages, lens.to(torch.int64).contiguous())
    pages, ends = plan
    starts = cache.get(("native_starts", f, window))
    if starts is None:
        starts = torch.zeros_like(ends) if window is None else (ends - window).clamp_(min=0)
        cache[("native_starts", f, window)] = starts
    if residual is None:
        return partial(store, layer, q, pages[layer], starts, ends, f)[0]
    # The newest ``residual.window`` positions come from the residual, uncompressed.
    quantized_end = (ends - residual.window).clamp(min=0)
    starts = torch.minimum(starts, quantized_end)
    out, lse = partial(store, layer, q, pages[layer], starts, quantized_end, f)
    out_r, lse_r = residual_part(q, residual, lens, window)
    return merge(out, lse, out_r, lse_r)[0].to(q.dtype)
