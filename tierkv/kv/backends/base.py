"""KVBackend: what one attention backend serves, and decode attention over the paged store.

A backend declares what it serves from its own kernel table (``refusal``: ``None`` when it
serves a format at a head dim, dtype and device, else the reason, naming what it lacks), so a
caller never sends a kernel a format it cannot read. ``PagedAttention`` asks the backends of
its chain in order (``tierkv.kv.backends.chain``) and decodes each format's rows with the
first that serves it; ``reference`` serves everything and ends every chain.

The contract of ``decode``: one query token per slot of a ``DecodeGroup``, ``q``
``[B, Hq, D]``, over each slot's first ``lens`` tokens (the last ``window`` of them under a
sliding window), all slots stored uniformly in the store's format index ``f``; the output is
``[B, Hq, D]`` in ``q``'s dtype.
A backend whose ``reads_rings_in_place`` is true reads residual rings from the pages after the
step's write; the others get the ring entries (``residual``, read before the write, with the
step's own tokens appended).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tierkv.kv.formats.quant import KVFormat

if TYPE_CHECKING:
    from tierkv.kv.store.kv_store import KVStore
    from tierkv.kv.store.views import Residual


@dataclass
class DecodeGroup:
    """A step's uniform decode rows stored in one format, planned once per step.

    ``f`` the store's format index; ``rows`` their indices among the step's uniform decodes
    (None: all of them); ``slots`` and ``lens`` [B] their store slots and lengths after the
    step; ``max_len`` the largest length, on the host, so that no layer reads it back from a
    tensor; ``ring_pages`` the pages of the largest residual ring among them (0 when none of
    them has a residual window).
    """

    f: int
    rows: torch.Tensor | None
    slots: torch.Tensor
    lens: torch.Tensor
    max_len: int
    ring_pages: int = 0


@dataclass
class DecodeStep:
    """What the layers of one engine step share when they decode: the store, a cache for
    what stays the same from layer to layer (page ids, masks; emptied every step) and a
    workspace of buffers kept for the engine's life."""

    store: KVStore
    cache: dict = field(default_factory=dict)
    workspace: dict = field(default_factory=dict)


def byte_refusal(fmt: KVFormat, head_dim: int) -> str | None:
    """The refusal of a backend whose kernels read a group's codes as whole bytes."""
    if fmt.fills_bytes(head_dim):
        return None
    return (
        f"{fmt.name}-g{fmt.group_size}: a group of {min(fmt.group_size, head_dim)} channels "
        "does not fill whole bytes at its bit widths"
    )


class KVBackend(ABC):
    """One way to attend over the paged store (see the module docstring)."""

    #: The name ``EngineConfig.attention_backend`` and ``--attention-backend`` use.
    name: str = ""
    #: Whether ``decode`` reads residual rings in place (after the step's write).
    reads_rings_in_place: bool = False

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine (no compiler...), or None."""
        return None

    @abstractmethod
    def refusal(
        self, fmt: KVFormat, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> str | None:
        """None when ``decode`` serves slots stored in ``fmt`` at this head dim, compute dtype
        and device; else why not, naming the format."""

    def serves(
        self, fmt: KVFormat, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> bool:
        """``refusal`` is None, and the backend can run here."""
        return self.unavailable() is None and self.refusal(fmt, head_dim, dtype, device) is None

    @abstractmethod
    def decode(
        self,
        step: DecodeStep,
        layer: int,
        q: torch.Tensor,
        group: DecodeGroup,
        window: int | None,
        residual: Residual | None,
    ) -> torch.Tensor:
        """Decode attention of one query per slot of ``group`` (the module docstring's
        contract). No host reads of device tensors: what the host needs is in ``group``."""
