"""Pydantic models of the OpenAI wire format: requests, responses, stream chunks and errors.

Request models accept and ignore fields they do not know (clients send many optional ones),
logging each name once so an operator can see what was ignored. Numbers and strings are
checked at the edge (``fields``): ranges, finiteness, 64-bit integers, encodable text.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tierkv.sampling import SamplingParams
from tierkv.server.fields import (
    FiniteFloat,
    Int64,
    StopTokenId,
    TokenId,
    check_text,
    check_token_ids,
    log_unknown_fields,
)
from tierkv.structured.openai import ResponseFormat

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20
MAX_N = 128

# Request fields passed to SamplingParams under the same name when the client set them.
_SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "skip_special_tokens",
    "kv_policy",
    "prefix_caching",
    "cache_salt",
)


def _now() -> int:
    return int(time.time())


class OpenAIRequestModel(BaseModel):
    """Base of request models: unknown fields are kept out of the way and logged (each name
    once per process); every string of a known field must be encodable text."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _encodable_text(cls, value: Any, info: ValidationInfo) -> Any:
        check_text(info.field_name or "a field", value)
        return value

    @model_validator(mode="after")
    def _log_unknown_fields(self) -> OpenAIRequestModel:
        log_unknown_fields(self)
        return self


class StreamOptions(OpenAIRequestModel):
    include_usage: bool = False


class SamplingRequest(OpenAIRequestModel):
    """Fields shared by completions and chat completions (``None`` means the default)."""

    model: str | None = None
    n: Int64 | None = Field(None, ge=1, le=MAX_N)
    temperature: FiniteFloat | None = Field(None, ge=0)
    top_p: FiniteFloat | None = Field(None, gt=0, le=1)
    top_k: Int64 | None = Field(None, ge=-1)
    min_p: FiniteFloat | None = Field(None, ge=0, le=1)
    seed: Int64 | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stop_token_ids: list[StopTokenId] | None = None
    presence_penalty: FiniteFloat | None = Field(None, ge=-2, le=2)
    frequency_penalty: FiniteFloat | None = Field(None, ge=-2, le=2)
    repetition_penalty: FiniteFloat | None = Field(None, gt=0)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    kv_policy: str | None = None
    return_token_ids: bool = False
    prefix_caching: bool | None = None
    cache_salt: str | None = Field(None, min_length=1)
    response_format: ResponseFormat | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Engine sampling parameters; raises ``ValueError`` for values out of range."""
        given = {k: getattr(self, k) for k in _SAMPLING_FIELDS if getattr(self, k) is not None}
        if self.response_format is not None:
            given["structured_outputs"] = self.response_format.structured_outputs()
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **given)


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``; ``prompt`` is text, token ids, or a list of either."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: Int64 | None = Field(16, ge=1)
    logprobs: Int64 | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _token_ids_are_integers(cls, prompt: Any) -> Any:
        check_token_ids(prompt)
        return prompt


class ContentPart(OpenAIRequestModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIRequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` wins over ``max_tokens``."""

    messages: list[ChatMessage]
    max_tokens: Int64 | None = Field(None, ge=1)
    max_completion_tokens: Int64 | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int64 | None = Field(None, ge=0, le=MAX_LOGPROBS)


# -- responses -----------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One choice; with ``return_token_ids`` (vLLM's), its prompt's token ids (in a stream:
    on the choice's first chunk) and the ids of its tokens (in a stream: of this chunk)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    """A completion, and also each chunk of a streamed one (as in OpenAI's API)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    """A chat completion; ``prompt_token_ids`` with ``return_token_ids`` (vLLM's)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "tierkv"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo

    @classmethod
    def of(
        cls, message: str, type: str, param: str | None = None, code: str | None = None
    ) -> ErrorResponse:
        return cls(error=ErrorInfo(message=message, type=type, param=param, code=code))
