"""Per-engine grammar state: the tokenizer as llguidance sees it, and per-request matchers.

The engine owns one ``StructuredOutputs``; each constrained request holds a ``GrammarMatcher``
that the sampler asks for a token bitmask every step and the engine advances with every
token the request accepts. Matchers live on the request, not in the batch, so preemption,
any KV policy, ``n > 1`` and streaming need nothing special.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import llguidance
import torch

from tierkv.structured.params import StructuredOutputsParams, library_panics
from tierkv.structured.vocab import token_bytes
from tierkv.tokenizer import Tokenizer

# Compiled grammars kept per engine: clients tend to send the same few schemas again.
CACHE_SIZE = 64


class _Encoder:
    """What ``llguidance.TokenizerWrapper`` reads: token bytes, specials and an encoder."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokens, self.special_token_ids = token_bytes(tokenizer.hf)
        self.eos_token_id = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None
        self.bos_token_id = tokenizer.hf.bos_token_id
        self._hf = tokenizer.hf

    def __call__(self, text: str) -> list[int]:
        # str only: llguidance probes with bytes first, and a TypeError tells it to send str.
        if not isinstance(text, str):
            raise TypeError("encode takes str")
        return self._hf.encode(text, add_special_tokens=False)


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, bitmask_words: int) -> None:
        self._matcher = matcher
        self.bitmask_words = bitmask_words
        """Width of this matcher's bitmask rows in int32 words."""

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into ``row`` (one contiguous int32 bitmask row)."""
        self._check()
        with library_panics(RuntimeError, "structured output failed"):
            self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        self._check()

    def accept(self, token: int) -> None:
        """Advance past a token the request generated (``RuntimeError`` if not allowed)."""
        with library_panics(RuntimeError, "structured output failed"):
            accepted = self._matcher.consume_token(token)
        if not accepted:
            self._check()
            raise RuntimeError(f"structured output failed: token {token} refused")

    @property
    def finished(self) -> bool:
        """The grammar is complete and nothing can follow: the request must stop."""
        return self._matcher.is_stopped()

    def _check(self) -> None:
        if self._matcher.is_error():
            # Only a bug can get here (the mask allows nothing the grammar refuses); the
            # request fails alone rather than producing text that breaks its schema.
            raise RuntimeError(f"structured output failed: {self._matcher.get_error()}")


class StructuredOutputs:
    """Builds matchers for one engine's tokenizer and vocabulary.

    llguidance's tokenizer data (a token trie over the whole vocabulary: ~50 ms for 4k
    tokens, a few hundred for 49k) is built on the first constrained request, not at engine
    start, so engines that never see one never pay for it.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                wrapper = llguidance.TokenizerWrapper(_Encoder(self._tokenizer))
                eos = sorted(self._tokenizer.eos_token_ids) or None
                # n_vocab: the model's logits may be wider than the tokenizer (padding).
                n_vocab = max(self.vocab_size, len(wrapper.tokens))
                with library_panics(ValueError, "structured output is not available"):
                    self._ll_tokenizer = llguidance.LLTokenizer(
                        wrapper, n_vocab=n_vocab, eos_token=eos
                    )
            return self._ll_tokenizer

    @property
    def bitmask_words(self) -> int:
        """Width of a bitmask row: int32 words covering llguidance's vocabulary."""
        return (self.ll_tokenizer.vocab_size + 31) // 32

    def matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        """A fresh matcher at the start of ``params``' grammar (``ValueError`` if the grammar
        does not work with this tokenizer)."""
        template = self._templates.get(params.grammar)
        if template is None:
            with library_panics(ValueError, "unsupported structured output"):
                template = llguidance.LLMatcher(self.ll_tokenizer, params.grammar, log_level=0)
            if template.is_error():
                raise ValueError(f"unsupported structured output: {template.get_error()}")
            self._templates[params.grammar] = template
            if len(self._templates) > CACHE_SIZE:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(params.grammar)
        # A copy of a matcher at its start skips compiling the grammar again.
        with library_panics(ValueError, "unsupported structured output"):
            return GrammarMatcher(template.deep_copy(), self.bitmask_words)
