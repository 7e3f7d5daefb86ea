"""Compare grammar libraries for structured output: setup, compile and per-token mask cost.

Runs whichever of llguidance, xgrammar and outlines-core import (install them side by side,
e.g. ``pip install --target DIR`` and put DIR on PYTHONPATH). For each tokenizer (the demo
model's, SmolLM2's) it times building the library's tokenizer data, compiling a JSON schema
and ``json_object``, and the mask computation + token advance of every token of a valid
document; then it lists which JSON-schema features each library's compiler accepts.

    python scripts/bench_structured.py
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch

from tierkv.model.bundled import SMOLLM2_NAME
from tierkv.model.source import resolve_model
from tierkv.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}
DOC = '{"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math"], "active": true}'

# One schema per feature; a library "covers" a feature when its compiler accepts the schema.
FEATURES: dict[str, dict[str, Any]] = {
    "enum/const": {"type": "object", "properties": {"a": {"enum": [1, "x"]}, "b": {"const": 3}}},
    "string length": {"type": "string", "minLength": 2, "maxLength": 5},
    "pattern": {"type": "string", "pattern": "^[a-z]{3}-[0-9]+$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format email": {"type": "string", "format": "email"},
    "number bounds": {"type": "number", "minimum": 0, "exclusiveMaximum": 10},
    "integer bounds": {"type": "integer", "minimum": -5, "maximum": 99},
    "multipleOf": {"type": "integer", "multipleOf": 5},
    "array min/maxItems": {
        "type": "array",
        "items": {"type": "integer"},
        "minItems": 1,
        "maxItems": 3,
    },
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
    "allOf": {
        "allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]
    },
    "$ref/$defs": {
        "$defs": {"p": {"type": "integer"}},
        "type": "object",
        "properties": {"x": {"$ref": "#/$defs/p"}},
    },
    "recursive $ref": {
        "$defs": {
            "n": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
            }
        },
        "$ref": "#/$defs/n",
    },
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}},
    "min/maxProperties": {"type": "object", "minProperties": 1, "maxProperties": 2},
    "not": {"not": {"type": "string"}},
    "if/then/else": {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}},
    "any JSON (json_object)": {"type": "object"},
}


def _time(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat, out


class Llguidance:
    """As tierkv uses it (``tierkv.structured``): its own token bytes, fixed separators."""

    name = "llguidance"

    def __init__(self, tok: Tokenizer, vocab: int) -> None:
        import llguidance

        from tierkv.structured.matcher import StructuredOutputs

        self.ll = llguidance
        self.tok = StructuredOutputs(tok, vocab).ll_tokenizer
        self.words = (vocab + 31) // 32

    def compile(self, schema: dict) -> Any:
        from tierkv.structured.params import compile_schema

        grammar = compile_schema(schema)
        self.ll.LLMatcher(self.tok, grammar, log_level=0)
        return grammar

    def run(self, grammar: Any, ids: list[int]) -> float:
        matcher = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        mask = torch.zeros(self.words, dtype=torch.int32)
        start = time.perf_counter()
        for t in ids:
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            assert (int(mask[t // 32]) >> (t % 32)) & 1, "token refused"
            assert matcher.consume_token(t), matcher.get_error()
        return (time.perf_counter() - start) / len(ids)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer, vocab: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tok.hf, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.vocab = vocab

    def compile(self, schema: dict) -> Any:
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": ")
        )

    def run(self, grammar: Any, ids: list[int]) -> float:
        matcher = self.xgr.GrammarMatcher(grammar)
        mask = self.xgr.allocate_token_bitmask(1, self.vocab)
        start = time.perf_counter()
        for t in ids:
            matcher.fill_next_token_bitmask(mask)
            assert (int(mask[0, t // 32]) >> (t % 32)) & 1, "token refused"
            assert matcher.accept_token(t)
        return (time.perf_counter() - start) / len(ids)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok: Tokenizer, vocab: int) -> None:
        import outlines_core

        self.oc = outlines_core
        # Byte-level BPE tokens are written in GPT-2's printable alias of each byte.
        table = _unicode_to_bytes()
        words: dict[bytes, list[int]] = {}
        eos = min(tok.eos_token_ids)
        for text, i in tok.hf.get_vocab().items():
            if i == eos or i >= vocab:
                continue
            raw = bytes(table[c] for c in text) if all(c in table for c in text) else text.encode()
            words.setdefault(raw, []).append(i)
        self.vocab_obj = outlines_core.Vocabulary(eos, words)
        self.words = (vocab + 31) // 32

    def compile(self, schema: dict) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab_obj)

    def run(self, grammar: Any, ids: list[int]) -> float:
        guide = self.oc.Guide(grammar)
        mask = torch.zeros(self.words, dtype=torch.int32)
        start = time.perf_counter()
        for t in ids:
            guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
            assert (int(mask[t // 32]) >> (t % 32)) & 1, "token refused"
            guide.advance(t, return_tokens=False)
        return (time.perf_counter() - start) / len(ids)


def _unicode_to_bytes() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def apply_cost(vocab: int, rows: int = 8) -> float:
    """Seconds to unpack a [rows] bitmask and mask [rows, vocab] logits (tierkv's own op)."""
    from tierkv.structured.bitmask import apply_bitmask

    logits = torch.randn(rows, vocab)
    mask = torch.randint(-(2**31), 2**31 - 1, (rows, (vocab + 31) // 32), dtype=torch.int32)
    apply_bitmask(logits, mask)
    return _time(lambda: apply_bitmask(logits, mask), 200)[0]


def main() -> None:
    models = {
        "demo (4,096)": ("assets/demo-model", 4096),
        "SmolLM2 (49,152)": (resolve_model(SMOLLM2_NAME).folder, 49152),
    }
    for label, (folder, vocab) in models.items():
        tok = Tokenizer(folder)
        ids = tok.hf.encode(DOC, add_special_tokens=False)
        print(
            f"\n## {label}: {len(ids)}-token document; apply mask (8 rows) "
            f"{apply_cost(vocab) * 1e6:.0f} us"
        )
        for lib in (Llguidance, Xgrammar, OutlinesCore):
            try:
                setup, impl = _time(lambda lib=lib, tok=tok, vocab=vocab: lib(tok, vocab))
            except ImportError:
                print(f"{lib.name}: not installed")
                continue
            try:
                c_schema, g_schema = _time(lambda impl=impl: impl.compile(SCHEMA))
                per_tok = min(impl.run(g_schema, ids) for _ in range(3))
                c_obj, g_obj = _time(lambda impl=impl: impl.compile({"type": "object"}))
                per_obj = min(impl.run(g_obj, ids) for _ in range(3))
                print(
                    f"{lib.name}: tokenizer {setup * 1e3:.0f} ms; schema compile "
                    f"{c_schema * 1e3:.1f} ms, mask+advance {per_tok * 1e6:.0f} us/token; "
                    f"json_object compile {c_obj * 1e3:.1f} ms, {per_obj * 1e6:.0f} us/token"
                )
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{lib.name}: failed: {exc!r}"[:300])
            if label.startswith("demo"):
                covered = []
                for feature, schema in FEATURES.items():
                    try:
                        impl.compile(schema)
                        covered.append(feature)
                    except Exception:  # noqa: BLE001
                        pass
                missing = sorted(set(FEATURES) - set(covered))
                print(f"  covers {len(covered)}/{len(FEATURES)}; refuses: {missing}")


if __name__ == "__main__":
    main()
