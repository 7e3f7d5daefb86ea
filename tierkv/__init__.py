"""tierkv: an LLM inference engine with a differentiated, paged KV cache."""

from tierkv.engine.llm import LLM
from tierkv.engine.request import CompletionOutput, RequestOutput
from tierkv.kv import KVPolicy
from tierkv.sampling import SamplingParams
from tierkv.structured import StructuredOutputsParams

__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "KVPolicy",
    "RequestOutput",
    "CompletionOutput",
]
__version__ = "0.1.0"
