"""AttentionBatch: where each token of an engine step comes from and goes to.

Built once per step by the engine's runner, read by the model's layers and by the KV cache's
attention; it belongs to neither, so both import it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionBatch:
    """Where each token of a step comes from and goes to, built once per step by the runner.

    Attributes:
        token_slots: [N] store slot of each new token.
        token_index: [N] index of each new token in its request (its position).
        query_lens: new tokens per request, in batch order.
        context_lens: tokens each request had stored before this step.
        slots: [B] store slot of each request.
        decode_rows: [Bd] requests (batch indices) with exactly one new token.
        prefill_rows: requests with more than one new token.
        query_starts: offset of each request's first token in the flat token list.
        slot_list: the same slots as ``slots``, as Python ints (read on the host without a
            device sync).
    """

    token_slots: torch.Tensor
    token_index: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    slots: torch.Tensor
    decode_rows: torch.Tensor
    prefill_rows: list[int]
    query_starts: list[int]
    slot_list: list[int]

    @classmethod
    def build(
        cls, slots: list[int], context_lens: list[int], query_lens: list[int]
    ) -> AttentionBatch:
        """Describe a step in which request ``i`` adds ``query_lens[i]`` tokens to ``slots[i]``."""
        starts, total = [], 0
        for n in query_lens:
            starts.append(total)
            total += n
        slot_t = torch.tensor(slots, dtype=torch.int64)
        lens_t = torch.tensor(query_lens, dtype=torch.int64)
        ctx_t = torch.tensor(context_lens, dtype=torch.int64)
        token_slots = torch.repeat_interleave(slot_t, lens_t)
        first = torch.repeat_interleave(ctx_t - torch.tensor(starts, dtype=torch.int64), lens_t)
        return cls(
            token_slots=token_slots,
            token_index=first + torch.arange(total),
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            slots=slot_t,
            decode_rows=torch.nonzero(lens_t == 1).flatten(),
            prefill_rows=[i for i, n in enumerate(query_lens) if n > 1],
            query_starts=starts,
            slot_list=list(slots),
        )
