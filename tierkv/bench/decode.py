"""Single-request decode speed against context length, and the memory bandwidth it achieves.

Decode is bound by memory bandwidth: each step reads every weight once (but of an input
embedding not tied to the output head, only the step's row) and the request's whole KV cache.
Achieved bandwidth = (weight bytes + KV bytes read per step) / step time, reported next to the
machine's own measured copy and read bandwidth, which is the physical limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from statistics import median_low
from typing import TYPE_CHECKING

import torch

from tierkv.model.layers import Linear, linear
from tierkv.sampling import SamplingParams

if TYPE_CHECKING:
    from tierkv.model.decoder import Decoder


@dataclass
class Bandwidth:
    """Measured memory bandwidth of this machine, in GB/s (10^9 bytes per second)."""

    copy_gb_s: float  # bytes read + bytes written per second by a large tensor copy
    read_gb_s: float  # bytes read per second by a large reduction
    # Weight bytes per second of a large matrix-vector product in the compute dtype, by the
    # engine's own linear layer (``tierkv.model.layers.linear``): what the linear layers of a
    # batch-1 decode step can stream here (below read_gb_s where the kernel does not saturate
    # memory, and different per dtype).
    matvec_gb_s: float


@dataclass
class DecodeResult:
    """One context length under one policy."""

    policy: str
    context: int
    ms_per_step: float
    tokens_per_s: float
    weight_bytes: int
    kv_bytes: int
    achieved_gb_s: float
    fraction_of_read_bw: float
    fraction_of_matvec_bw: float
    # ms per step of every round (``run_rounds``); the row is the median one.
    runs_ms: list[float] = field(default_factory=list)


def measure_bandwidth(
    dtype: torch.dtype = torch.float32, size_bytes: int = 1 << 29, repeats: int = 5
) -> Bandwidth:
    """Best-of-``repeats`` copy and read bandwidth over ``size_bytes`` of float32, and the
    matrix-vector bandwidth of the engine's linear layer over a ``size_bytes / 8`` matrix of
    ``dtype`` (larger than caches, the size of a small model's largest weights)."""
    cols = 4096
    matrix = torch.randn(size_bytes // 8 // (cols * torch.finfo(dtype).bits // 8), cols).to(dtype)
    vector = torch.randn(1, cols).to(dtype)
    matvec_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        linear(vector, matrix)
        matvec_s = min(matvec_s, time.perf_counter() - start)
    matvec_bytes = matrix.numel() * matrix.element_size()
    del matrix
    src = torch.ones(size_bytes // 4)
    dst = torch.empty_like(src)
    copy_s = read_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        copy_s = min(copy_s, time.perf_counter() - start)
        start = time.perf_counter()
        src.sum()
        read_s = min(read_s, time.perf_counter() - start)
    return Bandwidth(
        copy_gb_s=2 * size_bytes / copy_s / 1e9,
        read_gb_s=size_bytes / read_s / 1e9,
        matvec_gb_s=matvec_bytes / matvec_s / 1e9,
    )


def run_decode(
    model: str,
    policy: str,
    contexts: list[int],
    steps: int,
    dtype: str,
    bandwidth: Bandwidth,
    attention_backend: str = "reference",
) -> list[DecodeResult]:
    """Time ``steps`` decode steps of one request after a prompt of each context length (and
    ``steps // 4``, at least 2, untimed ones)."""
    from tierkv.config import EngineConfig
    from tierkv.engine.engine import Engine

    # Untimed steps first: the first ones after a prefill touch freshly allocated pages and
    # run kernels for the first time (measured: up to 2x a steady step on the demo model).
    warmup = max(2, steps // 4)
    engine = Engine(
        EngineConfig.from_kwargs(
            model,
            dtype=dtype,
            kv_policy=policy,
            kv_cache_memory="2GiB",
            max_model_len=max(contexts) + warmup + steps + 2,
            # Speed only: contexts past the model's positions time as well as any.
            allow_long_max_model_len=True,
            max_num_seqs=1,
            attention_backend=attention_backend,
            # Each round prefills its prompt again rather than reusing the last round's.
            enable_prefix_caching=False,
        )
    )
    weight_bytes = _weight_bytes_per_step(engine.model)
    vocab = engine.spec.vocab_size
    results = []
    for context in contexts:
        prompt = [(i * 7919) % (vocab - 1) + 1 for i in range(context)]
        # Room for the untimed steps too, so the request is still alive (its pages held) when
        # its KV bytes are read.
        rid = engine.add_request(
            prompt, SamplingParams(max_tokens=warmup + steps + 2, ignore_eos=True)
        )
        while not engine.step():  # prefill (possibly chunked) until the first token
            pass
        for _ in range(warmup):
            engine.step()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = (time.perf_counter() - start) / steps
        kv_bytes = engine.store.bytes_in_use()
        engine.abort(rid)
        achieved = (weight_bytes + kv_bytes) / elapsed / 1e9
        results.append(
            DecodeResult(
                policy=policy,
                context=context,
                ms_per_step=elapsed * 1e3,
                tokens_per_s=1 / elapsed,
                weight_bytes=weight_bytes,
                kv_bytes=kv_bytes,
                achieved_gb_s=achieved,
                fraction_of_read_bw=achieved / bandwidth.read_gb_s,
                fraction_of_matvec_bw=achieved / bandwidth.matvec_gb_s,
            )
        )
    return results


def run_rounds(
    model: str,
    policies: list[str],
    contexts: list[int],
    steps: int,
    dtype: str,
    bandwidth: Bandwidth,
    attention_backend: str = "reference",
    repeats: int = 1,
) -> list[DecodeResult]:
    """``run_decode`` for every policy, ``repeats`` rounds with the policies alternating (so a
    slow spell of a shared machine hits all of them); each (policy, context) row is its median
    round, with every round's ms per step in ``runs_ms``."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    rounds = [
        [
            row
            for policy in policies
            for row in run_decode(
                model, policy, contexts, steps, dtype, bandwidth, attention_backend
            )
        ]
        for _ in range(repeats)
    ]
    results = []
    for rows in zip(*rounds, strict=True):
        mid = median_low(r.ms_per_step for r in rows)
        row = next(r for r in rows if r.ms_per_step == mid)
        results.append(replace(row, runs_ms=[r.ms_per_step for r in rows]))
    return results


def _weight_bytes_per_step(model: Decoder) -> int:
    """Bytes of the weights one decode step reads: all of them, except that an untied input
    embedding contributes one row (the tied one is read whole as the output head)."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            # A packed linear layer's weight may be held only in its oneDNN copy.
            held = isinstance(module, Linear) and name == "weight"
            total += module.weight_nbytes if held else p.numel() * p.element_size()
    if model.spec.tie_word_embeddings:
        return total
    table = model.embed_tokens.weight
    return total - table.numel() * table.element_size() + table[0].numel() * table.element_size()


def format_table(results: list[DecodeResult], bandwidth: Bandwidth) -> str:
    """A plain-text table of the rows and the machine's bandwidth."""
    head = (
        f"{'policy':<10}{'context':>8}{'ms/step':>9}{'tok/s':>8}"
        f"{'KV MB':>8}{'GB/s':>7}{'of read':>9}{'of matvec':>11}"
    )
    lines = [
        f"machine: copy {bandwidth.copy_gb_s:.1f} GB/s, read {bandwidth.read_gb_s:.1f} GB/s, "
        f"matrix-vector {bandwidth.matvec_gb_s:.1f} GB/s",
        head,
        "-" * len(head),
    ]
    for r in results:
        lines.append(
            f"{r.policy:<10}{r.context:>8}{r.ms_per_step:>9.2f}{r.tokens_per_s:>8.1f}"
            f"{r.kv_bytes / 1e6:>8.2f}{r.achieved_gb_s:>7.2f}{r.fraction_of_read_bw:>9.1%}"
            f"{r.fraction_of_matvec_bw:>11.1%}"
        )
    return "\n".join(lines)
