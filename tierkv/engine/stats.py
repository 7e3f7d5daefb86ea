"""Counters of the engine: where step time goes, and histograms for ``Engine.kv_stats``."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepTimes:
    """Wall time spent in ``Engine.step``, by kind of step: steps that compute prompt tokens
    (prefill chunks and recomputation after a preemption, with any decodes batched beside
    them) and steps of decodes only. ``decode_rows`` sums the requests of the decode steps, so
    ``decode_rows / decode_steps`` is their mean batch. Benchmarks read the difference of two
    snapshots (``snapshot``): where a run's time goes, and at what batch it decodes."""

    prefill_steps: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0
    decode_rows: int = 0

    def record(self, decode_only: bool, rows: int, seconds: float) -> None:
        """Count one step of ``rows`` requests that took ``seconds``."""
        if decode_only:
            self.decode_steps += 1
            self.decode_s += seconds
            self.decode_rows += rows
        else:
            self.prefill_steps += 1
            self.prefill_s += seconds

    def snapshot(self) -> StepTimes:
        """A copy of the counters as they are now."""
        return StepTimes(**vars(self))

    def since(self, earlier: StepTimes) -> StepTimes:
        """The steps recorded after ``earlier`` (a ``snapshot`` of this one)."""
        return StepTimes(**{k: v - getattr(earlier, k) for k, v in vars(self).items()})


def histogram(values: torch.Tensor, bins: int = 8) -> dict[str, list[float] | list[int]]:
    """Counts of ``values`` in ``bins`` equal-width bins over [0, max]: ``edges`` has bins + 1."""
    top = int(values.max()) if values.numel() else 0
    edges = torch.linspace(0, max(top, 1), bins + 1)
    counts = torch.histc(values.float(), bins=bins, min=0, max=float(edges[-1]))
    return {"edges": [round(float(e), 1) for e in edges], "counts": counts.int().tolist()}
