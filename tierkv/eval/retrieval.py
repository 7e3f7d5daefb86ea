"""Synthetic long-range key/value retrieval, shared by training and evaluation.

An example is a Python-looking file::

    CONFIG = {}
    CONFIG["cache_limit"] = "3fa9c0"
    CONFIG["retry_path"] = "b71e2d"
    ...

    <real standard-library code used as filler>

    assert CONFIG["retry_path"] == "b71e2d"
    assert CONFIG["cache_limit"] == "

The prompt ends right after the opening quote of the last query; the answer is that key's
value followed by the closing quote. Earlier queries (if any) are already answered in the
prompt. Keys repeat the exact text of their assignment (``CONFIG["name"]``) so that the task
is pure copy-from-context; the distance to copy from is the whole filler.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from tokenizers import Encoding, Tokenizer

# Short, common words so that most key parts are single tokens and keys differ by content,
# not by tokenization accidents.
KEY_WORDS: tuple[str, ...] = (
    "alpha", "batch", "block", "buffer", "cache", "chunk", "client", "color", "count",
    "cursor", "delay", "depth", "entry", "event", "field", "file", "filter", "flag",
    "frame", "group", "handle", "index", "input", "item", "label", "layer", "level",
    "limit", "line", "local", "mode", "name", "node", "offset", "output", "owner",
    "page", "parent", "path", "point", "port", "queue", "range", "record", "retry",
    "scale", "server", "size", "source", "state", "stream", "table", "target", "task",
    "timeout", "token", "total", "user", "value", "weight", "width", "window",
)  # fmt: skip

HEX_DIGITS = "0123456789abcdef"

# Characters of filler text fetched per wanted token; stdlib code averages ~3 chars/token,
# so this over-fetches and the cut happens at a token boundary.
_CHARS_PER_TOKEN_BOUND = 8


class HasBackendTokenizer(Protocol):
    """A ``transformers`` fast tokenizer, reduced to what this module needs."""

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        ...


@dataclass(frozen=True)
class RetrievalExample:
    """One retrieval prompt and the exact continuation a correct model produces."""

    prompt: str
    answer: str
    key: str
    n_keys: int


def _encode(tokenizer: Tokenizer | HasBackendTokenizer, text: str) -> Encoding:
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
    return backend.encode(text, add_special_tokens=False)


def _random_keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        key = f"{rng.choice(KEY_WORDS)}_{rng.choice(KEY_WORDS)}"
        if key not in keys:
            keys.append(key)
    return keys


def _random_values(rng: random.Random, n: int, length: int) -> list[str]:
    values: list[str] = []
    while len(values) < n:
        value = "".join(rng.choice(HEX_DIGITS) for _ in range(length))
        if value not in values:
            values.append(value)
    return values


def _filler(
    rng: random.Random,
    tokenizer: Tokenizer | HasBackendTokenizer,
    filler_text: str,
    n_tokens: int,
) -> str:
    """Cut roughly ``n_tokens`` tokens of whole lines from a random place in ``filler_text``."""
    if n_tokens <= 0 or not filler_text:
        return ""
    want_chars = n_tokens * _CHARS_PER_TOKEN_BOUND
    start = rng.randrange(max(1, len(filler_text) - want_chars))
    # Start on a line boundary so the filler reads as ordinary code.
    newline = filler_text.find("\n", start)
    start = 0 if newline < 0 else newline + 1
    chunk = filler_text[start : start + want_chars]
    offsets = _encode(tokenizer, chunk).offsets
    if len(offsets) > n_tokens:
        chunk = chunk[: offsets[n_tokens][0]]
    # End on a line boundary too; drop the partial last line.
    cut = chunk.rfind("\n")
    return chunk[: cut + 1] if cut >= 0 else ""


def make_retrieval_example(
    rng: random.Random,
    tokenizer: Tokenizer | HasBackendTokenizer,
    context_tokens: int,
    filler_text: str,
    *,
    n_keys: int = 8,
    n_queries: int = 1,
    value_len: int = 6,
) -> RetrievalExample:
    """Build one retrieval example whose prompt is about ``context_tokens`` tokens long.

    Args:
        rng: Source of all randomness; the example is a pure function of its state.
        tokenizer: Tokenizer used to measure lengths (a ``tokenizers.Tokenizer`` or a
            ``transformers`` fast tokenizer).
        context_tokens: Wanted prompt length in tokens, special tokens not counted. If
            the key block and queries alone are longer, the prompt has no filler.
        filler_text: Ordinary code to cut the filler from (use held-out text to evaluate).
        n_keys: Number of ``CONFIG[...] = ...`` assignments in the key block.
        n_queries: Number of ``assert`` lines; all but the last are answered in the prompt.
        value_len: Number of hex digits per value.

    Returns:
        The example; ``answer`` is the queried value plus its closing quote.
    """
    if not 1 <= n_queries <= n_keys:
        raise ValueError(f"need 1 <= n_queries <= n_keys, got {n_queries=} {n_keys=}")
    keys = _random_keys(rng, n_keys)
    values = _random_values(rng, n_keys, value_len)
    header = "CONFIG = {}\n" + "".join(
        f'CONFIG["{k}"] = "{v}"\n' for k, v in zip(keys, values, strict=True)
    )
    queried = rng.sample(range(n_keys), n_queries)
    answered = "".join(f'assert CONFIG["{keys[i]}"] == "{values[i]}"\n' for i in queried[:-1])
    last = queried[-1]
    tail = f'{answered}assert CONFIG["{keys[last]}"] == "'
    # Two separating newlines are counted as (at most) two tokens.
    budget = context_tokens - len(_encode(tokenizer, header + tail)) - 2
    filler = _filler(rng, tokenizer, filler_text, budget)
    prompt = f"{header}\n{filler}\n{tail}"
    return RetrievalExample(prompt=prompt, answer=values[last] + '"', key=keys[last], n_keys=n_keys)
