"""ModelRunner: turns a scheduled step into flat batch tensors, runs the decoder, returns logits."""

from __future__ import annotations

import torch

from tierkv.batch import AttentionBatch
from tierkv.engine.request import Request
from tierkv.engine.scheduler import SchedulerOutput
from tierkv.kv import PagedAttention
from tierkv.model.decoder import Decoder


class ModelRunner:
    """Runs one step of the model over the paged KV cache."""

    def __init__(self, model: Decoder, attention: PagedAttention) -> None:
        self.model = model
        self.attention = attention

    def execute(self, step: SchedulerOutput) -> tuple[list[Request], torch.Tensor]:
        """Compute the step's tokens; return the requests that now sample and their logits.

        A request samples when its chunk reaches its last token: every decode, and the final
        chunk of a prefill. Logits are only computed for those rows.
        """
        ids: list[int] = []
        slots, contexts, rows, sampling = [], [], [], []
        for req, n in zip(step.requests, step.num_new_tokens, strict=True):
            start = req.num_computed_tokens
            ids.extend(req.token_ids(start, start + n))
            slots.append(req.slot)
            contexts.append(start)
            if start + n == req.num_tokens:
                rows.append(len(ids) - 1)
                sampling.append(req)
        batch = AttentionBatch.build(slots, contexts, step.num_new_tokens)
        # Host-side work for the whole step, so that no layer waits on a device read.
        self.attention.plan(batch)
        logits = self.model(
            torch.tensor(ids, dtype=torch.int64),
            batch.token_index,
            self.attention,
            batch,
            torch.tensor(rows, dtype=torch.int64),
        )
        self.attention.finish_step(batch)
        for req, n in zip(step.requests, step.num_new_tokens, strict=True):
            req.num_computed_tokens += n
        return sampling, logits
