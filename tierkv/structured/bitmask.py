"""Token bitmasks: one bit per vocabulary entry, 32 to an int32 word, bit ``t % 32`` of word
``t // 32`` set when token ``t`` is allowed (the layout llguidance and xgrammar fill)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from tierkv.structured.matcher import GrammarMatcher


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An all-allowed ``[rows, ceil(vocab_size / 32)]`` int32 bitmask."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def unpack_bitmask(mask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """``[rows, vocab_size]`` bool array: which tokens ``mask`` allows."""
    # numpy's unpackbits (little bit order on the little-endian bytes of each word) unpacks
    # a 49k-token row in a few microseconds; shifting in torch costs 20x that.
    raw = np.ascontiguousarray(mask.numpy()).view(np.uint8)
    return np.unpackbits(raw, axis=-1, bitorder="little")[:, :vocab_size].view(np.bool_)


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """Set the logits ``mask`` does not allow to -inf, in place (``logits`` [rows, V], CPU).

    Tokens past the mask's width (a model vocabulary padded beyond the tokenizer's) are
    never allowed.
    """
    vocab = logits.shape[1]
    width = min(vocab, mask.shape[1] * 32)
    allowed = unpack_bitmask(mask, width)
    # numpy, single-threaded, rather than torch.where: on a loaded CPU torch's parallel
    # elementwise kernels wait on each other (8 rows x 49k took 31 ms with 2 threads, 3 ms
    # with numpy, when other work shared the 2 cores).
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        values = logits.numpy()
        np.copyto(values[:, :width], -np.inf, where=~allowed)
    else:  # numpy has no bfloat16 (nor a GPU)
        refused = torch.from_numpy(~allowed).to(logits.device)
        logits[:, :width] = logits[:, :width].masked_fill(refused, float("-inf"))
    logits[:, width:] = float("-inf")


def mask_logits(logits: torch.Tensor, grammars: list[GrammarMatcher | None]) -> None:
    """Restrict each row of ``logits`` [R, V] to the tokens its grammar allows (in place);
    rows without a grammar are left alone."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return
    words = max(grammars[i].bitmask_words for i in rows)  # type: ignore[union-attr]
    mask = allocate_bitmask(len(rows), words * 32)
    for j, i in enumerate(rows):
        grammars[i].fill_bitmask(mask[j])  # type: ignore[union-attr]
    if len(rows) == len(grammars):
        apply_bitmask(logits, mask)
        return
    index = torch.tensor(rows)
    sub = logits[index]
    apply_bitmask(sub, mask)
    logits[index] = sub
