"""tierkv: an LLM inference engine with a differentiated, paged KV cache."""

from tierkv.engine.llm import LLM
from tierkv.engine.request import CompletionOutput, RequestOutput
from tierkv.kv.policy import KVPolicy
from tierkv.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "KVPolicy", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
