"""Attention backends over the paged store, behind one interface (``base.KVBackend``).

- ``reference``: gather, dequantize, dense SDPA (torch, any device; the oracle);
- ``torch``: fused torch ops over quantized pages;
- ``cpu``: the C++ kernels (``cpu/csrc``), reading pages and rings in place;
- ``triton``: a Triton kernel over the same pages (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``).

``EngineConfig.attention_backend`` names a *chain* (``CHAINS``): each format's decode rows go
to the first backend of the chain that serves that format (``KVBackend.refusal``), and
``reference``, which serves everything, ends every chain. ``fast`` (the default) is
``cpu``, then ``torch``, then ``reference``. A new backend is one folder here with a
``KVBackend`` subclass, one entry in ``REGISTRY`` and, if it should be picked by default, its
place in the ``fast`` chain.
"""

from __future__ import annotations

from tierkv.kv.backends.base import DecodeGroup, DecodeStep, KVBackend
from tierkv.kv.backends.cpu.backend import CpuBackend
from tierkv.kv.backends.reference.backend import ReferenceBackend
from tierkv.kv.backends.torch.backend import TorchBackend
from tierkv.kv.backends.triton.backend import TritonBackend

REGISTRY: dict[str, KVBackend] = {
    b.name: b for b in (CpuBackend(), TorchBackend(), TritonBackend(), ReferenceBackend())
}

# Name -> the backends asked in order. Every chain ends with ``reference``.
CHAINS: dict[str, tuple[str, ...]] = {
    "fast": ("cpu", "torch", "reference"),
    "cpu": ("cpu", "reference"),
    "torch": ("torch", "reference"),
    # Not in ``fast`` yet: the engine's arena is a CPU tensor, where the triton backend runs
    # only in Triton's (slow) interpreter.
    "triton": ("triton", "reference"),
    "reference": ("reference",),
}
BACKENDS = tuple(CHAINS)


def chain(name: str) -> list[KVBackend]:
    """The backends ``name`` asks, in order, leaving out those that cannot run here."""
    if name not in CHAINS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    return [REGISTRY[b] for b in CHAINS[name] if REGISTRY[b].unavailable() is None]


__all__ = ["BACKENDS", "CHAINS", "REGISTRY", "DecodeGroup", "DecodeStep", "KVBackend", "chain"]
