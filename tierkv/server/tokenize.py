"""vLLM's utility routes: ``POST /tokenize``, ``POST /detokenize`` and ``GET /version``.

Same request and response shapes as vLLM's, so clients written for vLLM (counting a prompt's
tokens before sending it, say) work unchanged. Behind the API key like the ``/v1`` routes.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, StrictInt

from tierkv import __version__
from tierkv.server.errors import APIError
from tierkv.server.protocol import ChatMessage, OpenAIRequestModel
from tierkv.server.serving import OpenAIServing, _message_text


class TokenizeCompletionRequest(OpenAIRequestModel):
    """A text prompt to tokenize as ``/v1/completions`` would."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(OpenAIRequestModel):
    """A conversation to tokenize as ``/v1/chat/completions`` would (its template writes the
    special tokens, hence ``add_special_tokens`` false by default)."""

    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIRequestModel):
    model: str | None = None
    tokens: list[StrictInt] = Field(max_length=1 << 20)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


# Async like the /v1 routes, so the server's tokenizer is only ever used from the event loop's
# thread (a Rust tokenizer is not safe to share across threads).
router = APIRouter()


def _serving(request: Request, model: str | None) -> OpenAIServing:
    serving: OpenAIServing = request.app.state.serving
    if model is not None and model != serving.model_name:
        raise APIError(
            404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
        )
    return serving


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(
    body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request
) -> TokenizeResponse:
    """Token ids of a prompt (``prompt``) or of a conversation (``messages``)."""
    serving = _serving(request, body.model)
    hf = serving.tokenizer.hf
    if isinstance(body, TokenizeChatRequest):
        if not hf.chat_template:
            raise APIError(400, "this model's tokenizer has no chat template", param="messages")
        conversation = [
            {"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(body.messages)
        ]
        try:
            text = hf.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=body.add_generation_prompt
            )
        except Exception as exc:  # the template refused this conversation: the client's fault
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        param = "messages"
    else:
        text, param = body.prompt, "prompt"
    try:
        tokens = hf.encode(text, add_special_tokens=body.add_special_tokens, verbose=False)
    except (TypeError, ValueError) as exc:  # e.g. a lone surrogate, which no tokenizer encodes
        raise APIError(400, f"cannot tokenize the {param}: {exc}", param=param) from exc
    return TokenizeResponse(count=len(tokens), max_model_len=serving.max_model_len, tokens=tokens)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids."""
    tokenizer = _serving(request, body.model).tokenizer
    bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise APIError(
            400,
            f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})",
            param="tokens",
        )
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    """The tierkv version serving."""
    return VersionResponse(version=__version__)
