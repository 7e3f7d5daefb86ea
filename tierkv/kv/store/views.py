"""What the store hands attention: one tier's raw page fields (``TierRead``), a residual
ring's uncompressed entries (``Residual``), and the causal visibility every path masks with."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def causal_visibility(
    query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None
) -> torch.Tensor:
    """``[..., nq, T]``: which keys at ``key_pos`` [T] queries at ``query_pos`` [..., nq] see:
    those at or before them, and within ``window`` positions under a sliding window."""
    qpos, kpos = query_pos[..., None], key_pos
    visible = kpos <= qpos
    if window is not None:
        visible &= kpos > qpos - window
    return visible


@dataclass
class TierRead:
    """Every token of one tier of a group of slots at one layer, as raw page fields.

    ``fields`` maps field names to ``[B, H, T, numel]``; entries at or past ``count`` [B, H]
    are stale bytes. Read at every layer (``layer=None``), H is ``num_layers * num_kv_heads``,
    layer-major.
    """

    fields: dict[str, torch.Tensor]
    count: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        width = self.fields["pos"].shape[2]
        return torch.arange(width) < self.count[..., None]


@dataclass
class Residual:
    """Uncompressed keys and values of a group of slots' newest tokens at one layer.

    ``keys``/``values`` are ``[B, H, E, D]`` in the compute dtype and ``pos`` ``[B, E]`` their
    positions (the same for every head), -1 where an entry holds no token (its keys and values
    are zero); ``window`` [B] is each slot's residual window (0: the slot has none).
    """

    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor
    window: torch.Tensor

    def select(self, rows: torch.Tensor | None) -> Residual:
        """The entries of batch rows ``rows`` (all of them for ``None``)."""
        if rows is None:
            return self
        return Residual(self.keys[rows], self.values[rows], self.pos[rows], self.window[rows])

    def append(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> Residual:
        """These entries followed by a step's own new tokens, which the ring does not hold yet:
        ``k``/``v`` [B, H, n, D] at positions ``index`` [B, n]."""
        return Residual(
            torch.cat([self.keys, k.to(self.keys.dtype)], 2),
            torch.cat([self.values, v.to(self.values.dtype)], 2),
            torch.cat([self.pos, index], 1),
            self.window,
        )

    def visible(self, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """``[B, nq, E]``: which entries queries at ``query_pos`` [B, nq] see uncompressed."""
        pos = self.pos[:, None, :]
        newest = pos > query_pos[..., None] - self.window[:, None, None]
        return (pos >= 0) & newest & causal_visibility(query_pos, pos, window)
