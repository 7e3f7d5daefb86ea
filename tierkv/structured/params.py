"""What a request's output must match: vLLM's ``StructuredOutputsParams``, JSON only.

Building one compiles the constraint into an llguidance grammar and validates it, so an
unsupported or unsatisfiable schema raises ``ValueError`` where the request is made (the
server answers 400) and never reaches the engine.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import llguidance

# Compact, fixed separators (those of Python's ``json.dumps``) instead of free whitespace: a
# small model offered any whitespace can emit newlines forever and never close the object,
# and one fixed spelling keeps each token choice between meaningful alternatives.
JSON_OPTIONS: llguidance.JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
# Any JSON object, as OpenAI's ``json_object`` mode promises.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class StructuredOutputsParams:
    """Constrain a completion to JSON (vLLM's names).

    ``json`` is a JSON schema (a dict, or its JSON text) the output must validate against;
    ``json_object=True`` asks for any JSON object. Exactly one must be given. Unsupported
    keywords (``not``, ``uniqueItems``, ``if``/``then``...), unknown formats, bad patterns and
    unsatisfiable schemas raise ``ValueError``.
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    grammar: str = field(init=False, repr=False, compare=False)
    """The llguidance grammar the constraint compiles to (what the engine's matchers run)."""

    def __post_init__(self) -> None:
        if (self.json is not None) == bool(self.json_object):
            raise ValueError("structured outputs need exactly one of json and json_object")
        schema = ANY_OBJECT if self.json_object else _schema_dict(self.json)
        self.grammar = compile_schema(schema)


def _schema_dict(schema: dict[str, Any] | str | None) -> dict[str, Any]:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return schema


@contextlib.contextmanager
def library_panics(error: type[Exception], what: str) -> Iterator[None]:
    """Turn a panic of the grammar library's Rust code into ``error``.

    pyo3 raises a panic as ``PanicException``, a ``BaseException``: left alone it would pass
    every ``except Exception`` (pydantic's validation, the engine's per-request isolation).
    llguidance 1.9.1 panics, for one, when an error message about a schema would cut a
    multi-byte character (``{"maxItems": [{"x": "\u00e9" * 60}]}``).
    """
    try:
        yield
    except Exception:
        raise
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise error(f"{what}: the grammar library failed ({exc})") from None


def compile_schema(schema: dict[str, Any]) -> str:
    """The llguidance grammar of ``schema``; ``ValueError`` saying why when it has none."""
    with library_panics(ValueError, "unsupported JSON schema"):
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:  # not serializable, not an object...
            raise ValueError(f"unsupported JSON schema: {exc}") from exc
        # Checked without a tokenizer: whether the schema is supported and satisfiable does
        # not depend on the model, so the server can answer before the engine sees it.
        error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"unsupported JSON schema: {error}")
    return grammar
