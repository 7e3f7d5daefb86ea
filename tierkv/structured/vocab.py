"""The bytes each token stands for, read from a Hugging Face fast tokenizer.

A grammar engine matches bytes, so it needs every token's bytes. llguidance can read a
tokenizer itself, but it decides how tokens encode bytes from the top-level decoder only:
the ``tokenizer.json`` that transformers writes for a GGUF (SmolLM2's, for one) wraps its
``ByteLevel`` decoder in a ``Sequence`` with ``ByteFallback``, and llguidance then takes
``Ġ"`` for the three bytes ``Ġ``, ``"``... and refuses every token that starts with a space.
Reading the bytes here, from the whole decoder chain and the model's ``byte_fallback`` flag,
works for both kinds of checkpoint.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from transformers import PreTrainedTokenizerBase

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's printable alias of each byte (``bytes_to_unicode``), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    aliases = dict(zip(printable, printable, strict=True))
    extra = 0
    for b in range(256):
        if b not in aliases:
            aliases[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in aliases.items()}


def _decoder_types(spec: dict[str, Any] | None) -> set[str]:
    """Types of a decoder and of every decoder nested in a ``Sequence``."""
    if not spec:
        return set()
    types = {spec.get("type", "")}
    for inner in spec.get("decoders") or []:
        types |= _decoder_types(inner)
    return types


def token_bytes(hf: PreTrainedTokenizerBase) -> tuple[list[bytes], list[int]]:
    """Every token's bytes (index = token id), and the ids of special tokens.

    Special tokens get their text's bytes; the grammar engine is told they are special, so
    no grammar text can be made of them.
    """
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("structured output needs a fast (Rust) Hugging Face tokenizer")
    spec = json.loads(backend.to_str())
    decoders = _decoder_types(spec.get("decoder"))
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in decoders
    byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in decoders
    metaspace = "Metaspace" in decoders or any(
        d.get("type") == "Replace" and d.get("content") == " "
        for d in (spec.get("decoder") or {}).get("decoders") or []
    )
    table = _byte_level_table()
    # Added tokens are stored as plain text, not in the model's byte encoding.
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    size = max(len(hf), max(added, default=-1) + 1)
    tokens = [b""] * size
    for text, i in hf.get_vocab().items():
        if i in added:
            tokens[i] = added[i]["content"].encode()
        elif byte_fallback and (m := _BYTE_TOKEN.match(text)):
            tokens[i] = bytes([int(m.group(1), 16)])
        elif byte_level and all(c in table for c in text):
            tokens[i] = bytes(table[c] for c in text)
        elif metaspace:
            tokens[i] = text.replace("\u2581", " ").encode()
        else:
            tokens[i] = text.encode()
    special = sorted(i for i, t in added.items() if t.get("special"))
    return tokens, special
