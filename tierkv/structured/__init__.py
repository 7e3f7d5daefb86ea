"""Structured output: constrain a completion to JSON (a schema, or any object).

``StructuredOutputsParams`` (on ``SamplingParams.structured_outputs``) compiles the constraint
to an llguidance grammar; the engine gives each request a ``GrammarMatcher``; the batched
sampler masks every constrained row's logits with its matcher's token bitmask.
"""

from tierkv.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
