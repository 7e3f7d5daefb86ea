"""KVBackend: what one attention backend serves, and decode attention over the paged store.

A backend declares what it serves from its own kernel table (``refusal``: ``None`` when it
serves a format at a head dim, dtype and device, else the reason, naming what it lacks), so a
caller never sends a kernel a format it cannot read. ``PagedAttention`` asks the backends of
its chain in order (``tierkv.kv.backends.routing``) and decodes each format's rows with the
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
from tierkv.kv.store.tables import HIGH

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
class UnitHost:
    """Host-side facts of a unit of tiered slots for one step, so that no layer reads them
    back from tensors: ``formats`` the store format indices of its high and low tiers;
    ``pages[layer]`` the pages covering the largest count of each tier at that layer once
    the step's tokens are written; ``last_pos`` its largest query position; ``counting`` how
    many of a prefill chunk's queries score (every decode query does); ``recent`` the largest
    residual window of its slots (0: none) and ``ring_pages`` the pages of the largest ring;
    ``pool`` the largest prefill pooling kernel; ``kernel``: a backend's tiered-decode
    arguments that are the same at every layer, left there by the step's first layer."""

    formats: tuple[int, int]
    pages: list[tuple[int, int]]
    last_pos: int
    counting: int
    recent: int
    ring_pages: int
    pool: int
    kernel: dict = field(default_factory=dict)

    def tier(self, layer: int, tier: int) -> tuple[int, int]:
        """``(format index, pages)`` of one tier at ``layer``, for ``KVStore.read_tier``."""
        return self.formats[tier], self.pages[layer][tier]


@dataclass
class TieredAttention:
    """The result of attending tiered slots: the output and the probabilities of every token.

    Token columns ``T`` are those ``read_tier`` gives for the high tier, then the low tier's;
    ``probs`` is ``[B, H, G, nq, T]`` (G query heads per KV head), or None when ``scored``:
    they were already added to the stored scores, or no query counts. ``summed``: ``probs``
    is ``[B, H, G, 1, T]``, already summed over the queries (which all count).
    """

    out: torch.Tensor
    probs: torch.Tensor | None
    scored: bool = False
    summed: bool = False


@dataclass
class DecodeStep:
    """What the layers of one engine step share when they decode: the store, a cache for
    what stays the same from layer to layer (page ids, masks; emptied every step) and a
    workspace of buffers kept for the engine's life."""

    store: KVStore
    cache: dict = field(default_factory=dict)
    workspace: dict = field(default_factory=dict)


def high_page_tables(
    store: KVStore, slots: torch.Tensor, f: int, max_len: int, *, stale_to_first: bool = False
) -> tuple[int, torch.Tensor]:
    """The high-tier page ids of ``slots`` in every layer, ``[L, B, H, P]`` with one
    contiguous ``[B, H, P]`` table per layer, ``P`` the pages of ``max_len`` tokens in format
    index ``f``; and ``P``. What a backend's ``plan`` gathers once per step. Columns past a
    head's own pages hold stale ids; ``stale_to_first`` points them at the head's first page,
    for kernels that read every column (see ``KVStore._gather``)."""
    num = -(-max_len // store.layouts[f].tokens_per_page)
    pages = store.tables[slots, :, :, HIGH, :num]  # [B, L, H, P]
    if stale_to_first:
        valid = torch.arange(num) < store.held[slots, :, :, HIGH][..., None]
        pages = torch.where(valid, pages, pages[..., :1])
    return num, pages.transpose(0, 1).contiguous()


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
    #: Whether a chain holding this backend takes the fast paths for tiered work it does not
    #: serve itself: a tiered prefill chunk by dense attention over the gathered prefix
    #: (``tiered.attend_prefill``), a tiered decode the oracle serves by its fused torch ops
    #: over the codes (with a workspace) rather than the plain gather.
    fast_tiered_paths: bool = False

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

    def plan(self, step: DecodeStep, group: DecodeGroup) -> None:
        """Once per engine step, before its first layer, for each group of uniform decodes
        this backend will serve: where host work and copies to the device that every layer
        shares belong (kept in ``step.cache``). ``decode`` must still work without it (for
        callers that do not plan). Nothing by default."""
        return None

    # Kernels besides uniform decode are optional: a backend without one refuses it (the
    # defaults below) and the next backend of the chain that serves it is asked.

    def tiered_refusal(
        self,
        formats: tuple[KVFormat, KVFormat],
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> str | None:
        """None when ``tiered_decode`` serves tiered slots whose high and low tiers are stored
        in ``formats``; else why not."""
        return f"the {self.name} backend has no tiered decode"

    def tiered_decode(
        self,
        step: DecodeStep,
        layer: int,
        q: torch.Tensor,
        slots: torch.Tensor,
        query_pos: torch.Tensor,
        window: int | None,
        host: UnitHost,
        residual: Residual | None,
    ) -> torch.Tensor:
        """Decode attention of tiered ``slots`` [B] sharing their tier formats, one query
        ``q`` [B, Hq, D] per slot at ``query_pos`` [B], after the step's write: each (slot,
        KV head) attends the tokens it keeps in both tiers (under a sliding ``window``, those
        newer than ``query_pos - window``), and a slot with a residual ring its newest
        positions from the ring instead (``tierkv.kv.backends.tiered_ring``). Returns the
        output [B, Hq, D] in ``q``'s dtype, and adds to each token's stored score the largest
        probability any query head of its group gave it (a ring entry's goes to the tier token
        of its position): what ``tiered_attend.add_received`` adds. ``residual``: the ring
        entries, the step's own token included, for a backend that does not read rings in
        place (None when no slot has a ring)."""
        raise NotImplementedError(f"the {self.name} backend has no tiered decode")

    def write_refusal(
        self, fmt: KVFormat, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> str | None:
        """None when ``write`` stores new tokens in ``fmt``; else why not (the store then
        encodes them with ``KVFormat.encode``, the reference)."""
        return f"the {self.name} backend has no write kernel"

    def write(
        self,
        store: KVStore,
        f: int,
        pages: torch.Tensor,
        rows: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Encode ``k``/``v`` [N, H, D] in the store's format index ``f`` and write every
        field of token ``n``, head ``h`` (a zero score, ``positions`` [N]) at row
        ``rows[n, h]`` of page ``pages[n, h]``: the bytes ``KVFormat.encode`` gives."""
        raise NotImplementedError(f"the {self.name} backend has no write kernel")

    def compact_refusal(
        self, formats: tuple[KVFormat, KVFormat], head_dim: int, device: torch.device
    ) -> str | None:
        """None when ``compact`` serves slots whose tiers are stored in ``formats``; else why
        not (``tierkv.kv.policy.compact`` then moves the bytes with torch ops)."""
        return f"the {self.name} backend has no compaction kernel"

    def compact(
        self,
        store: KVStore,
        layer: int | None,
        slots: torch.Tensor,
        keep_high: torch.Tensor,
        demote: torch.Tensor,
        keep_low: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """The byte-moving half of ``compact.apply_decisions`` (its contract:
        ``tierkv.kv.backends.cpu.tiers.compact_tiers``)."""
        raise NotImplementedError(f"the {self.name} backend has no compaction kernel")

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
