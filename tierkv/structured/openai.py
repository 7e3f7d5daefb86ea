"""OpenAI's ``response_format`` request field, turned into ``StructuredOutputsParams``.

Shapes (as OpenAI's API takes them, on chat completions and completions alike):
``{"type": "text"}``, ``{"type": "json_object"}`` and
``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``.
The schema is compiled while the request body is validated, so a schema the grammar library
cannot handle is a 400 naming ``response_format`` before the engine sees the request.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from tierkv.structured.params import StructuredOutputsParams


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``. ``strict`` is accepted and changes nothing: the
    output always matches the schema exactly (as OpenAI's ``strict: true`` promises)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # ``schema`` is a BaseModel attribute name, hence the alias.
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: plain text (the default), any JSON object, or a JSON schema."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    _structured: StructuredOutputsParams | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _compile(self) -> ResponseFormat:
        # A ValueError here becomes a 400 with the validation error's location as the param.
        if self.type == "json_object":
            self._structured = StructuredOutputsParams(json_object=True)
        elif self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("type json_schema needs a json_schema object")
            if self.json_schema.schema_ is None:
                raise ValueError("json_schema.schema is required")
            self._structured = StructuredOutputsParams(json=self.json_schema.schema_)
        return self

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The engine's constraint for this format (None for plain text)."""
        return self._structured
