"""The OpenAI endpoints' logic, apart from the web framework: requests in, responses out.

Prompts are tokenized here with the server's own tokenizer (the engine's belongs to the engine
thread), validated, and handed to the ``AsyncEngine`` as token ids. Outputs become a response
or a stream of server-sent events.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from pydantic import BaseModel

from tierkv.engine.async_engine import AsyncEngine
from tierkv.engine.async_protocol import RequestStream
from tierkv.engine.request import CompletionOutput, RequestOutput
from tierkv.sampling import SamplingParams
from tierkv.server.errors import APIError
from tierkv.server.outputs import chat_logprobs, completion_logprobs, count_usage
from tierkv.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    SamplingRequest,
)
from tierkv.server.streaming import Delta, event_stream
from tierkv.tokenizer import Tokenizer


async def _final(stream: RequestStream) -> RequestOutput:
    output = await anext(stream)
    while not output.finished:
        output = await anext(stream)
    return output


class OpenAIServing:
    """Completions, chat completions and the model list over one ``AsyncEngine``."""

    def __init__(
        self, engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, max_model_len: int
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.max_model_len)])

    async def completions(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """A completion, or its SSE event stream when ``req.stream``."""
        self._check_model(req.model)
        prompts, texts = self._completion_prompts(req.prompt)
        if req.echo and req.logprobs is not None:
            raise APIError(
                400,
                "echo with logprobs needs prompt logprobs, which are not supported",
                param="echo",
            )
        params = self._params(req, req.max_tokens, req.logprobs)
        if "max_tokens" in req.model_fields_set:
            for ids in prompts:
                self._check_room(len(ids), req.max_tokens)
        prefixes = [""] * len(prompts)
        if req.echo:
            prefixes = [
                t if t is not None else self.tokenizer.decode(ids, False)
                for t, ids in zip(texts, prompts, strict=True)
            ]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._start(prompts, params, request_id)
        want_logprobs = req.logprobs is not None
        ids = req.return_token_ids
        if req.stream:
            offsets: dict[int, int] = {}
            started: set[int] = set()

            def render(deltas: list[Delta]) -> BaseModel:
                choices = []
                for d in deltas:
                    logprobs = None
                    if want_logprobs:
                        base = offsets.get(d.index, len(prefixes[d.index // params.n]))
                        logprobs, offsets[d.index] = completion_logprobs(
                            d.completion, d.start, d.end, base
                        )
                    first = ids and d.index not in started
                    started.add(d.index)
                    choices.append(
                        CompletionChoice(
                            index=d.index,
                            text=d.text,
                            logprobs=logprobs,
                            finish_reason=d.completion.finish_reason,
                            prompt_token_ids=prompts[d.index // params.n] if first else None,
                            token_ids=d.completion.token_ids[d.start : d.end] if ids else None,
                        )
                    )
                return CompletionResponse(id=request_id, model=self.model_name, choices=choices)

            def usage_chunk(finals: list[RequestOutput]) -> BaseModel:
                return CompletionResponse(
                    id=request_id, model=self.model_name, choices=[], usage=count_usage(finals)
                )

            return await event_stream(
                streams,
                params.n,
                params.stop_strings,
                prefixes,
                [],
                render,
                usage_chunk if req.include_usage else None,
            )
        finals = await self._finish(streams)
        choices = [
            CompletionChoice(
                index=p * params.n + c.index,
                text=prefixes[p] + c.text,
                logprobs=(
                    completion_logprobs(c, 0, len(c.token_ids), len(prefixes[p]))[0]
                    if want_logprobs
                    else None
                ),
                finish_reason=c.finish_reason,
                prompt_token_ids=prompts[p] if ids else None,
                token_ids=list(c.token_ids) if ids else None,
            )
            for p, out in enumerate(finals)
            for c in out.outputs
        ]
        return CompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=count_usage(finals)
        )

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """A chat completion, or its SSE event stream when ``req.stream``."""
        self._check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        prompt = self._chat_prompt(req.messages)
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens
        param = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = req.max_tokens, "max_tokens"
        params = self._params(req, max_tokens, top)
        self._check_room(len(prompt), max_tokens, param)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._start([prompt], params, request_id)

        def logprobs(c: CompletionOutput, start: int, end: int) -> ChatLogprobs | None:
            return None if top is None else chat_logprobs(c, start, end, top)

        if req.stream:
            role = ChatCompletionChunk(
                id=request_id,
                model=self.model_name,
                choices=[
                    ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                    for i in range(params.n)
                ],
            )

            def render(deltas: list[Delta]) -> BaseModel:
                choices = [
                    ChatChunkChoice(
                        index=d.index,
                        delta=DeltaMessage(content=d.text),
                        logprobs=logprobs(d.completion, d.start, d.end),
                        finish_reason=d.completion.finish_reason,
                        token_ids=(
                            d.completion.token_ids[d.start : d.end]
                            if req.return_token_ids
                            else None
                        ),
                    )
                    for d in deltas
                ]
                return ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices)

            def usage_chunk(finals: list[RequestOutput]) -> BaseModel:
                return ChatCompletionChunk(
                    id=request_id, model=self.model_name, choices=[], usage=count_usage(finals)
                )

            return await event_stream(
                streams,
                params.n,
                params.stop_strings,
                [""],
                [role],
                render,
                usage_chunk if req.include_usage else None,
            )
        finals = await self._finish(streams)
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=logprobs(c, 0, len(c.token_ids)),
                finish_reason=c.finish_reason,
                token_ids=list(c.token_ids) if req.return_token_ids else None,
            )
            for c in finals[0].outputs
        ]
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=count_usage(finals),
            prompt_token_ids=prompt if req.return_token_ids else None,
        )

    # -- validation ------------------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
            )

    def _check_room(
        self, prompt_len: int, max_tokens: int | None, param: str = "max_tokens"
    ) -> None:
        # A prompt that alone is too long is reported by the engine.
        if max_tokens is None or prompt_len >= self.max_model_len:
            return
        if prompt_len + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the length of the prompt "
                f"or of the completion.",
                param=param,
                code="context_length_exceeded",
            )

    @staticmethod
    def _params(
        req: SamplingRequest, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        try:
            return req.sampling_params(max_tokens, logprobs)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

    def _completion_prompts(
        self, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> tuple[list[list[int]], list[str | None]]:
        """Token ids of each prompt, and its text when it came as text."""
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        # One prompt (text or token ids) or a list of them.
        single = isinstance(prompt, str) or isinstance(prompt[0], int)
        items = [prompt] if single else list(prompt)
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in items]
        # Checked here, not only in the engine: echo decodes the ids before they get there.
        vocab = self.engine.engine.spec.vocab_size
        for prompt_ids in ids:
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            if bad:
                raise APIError(
                    400,
                    f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})",
                    param="prompt",
                )
        return ids, [p if isinstance(p, str) else None for p in items]

    def _chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        if not messages:
            raise APIError(400, "messages must not be empty", param="messages")
        conversation = [
            {"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(messages)
        ]
        # Templates reject conversations they cannot render (jinja2's raise_exception, type
        # errors on odd content...): that is the request's fault, not the server's.
        try:
            return self.tokenizer.apply_chat_template(conversation)
        except Exception as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc

    # -- running ---------------------------------------------------------------------------------

    async def _start(
        self, prompts: list[list[int]], params: SamplingParams, request_id: str
    ) -> list[RequestStream]:
        """Hand every prompt to the engine at once; if one is refused, none stays queued."""
        added = await asyncio.gather(
            *(
                self.engine.add_request(ids, params, f"{request_id}-{i}")
                for i, ids in enumerate(prompts)
            ),
            return_exceptions=True,
        )
        streams = [s for s in added if isinstance(s, RequestStream)]
        errors = [e for e in added if isinstance(e, BaseException)]
        if errors:
            for stream in streams:
                stream.abort()
            if isinstance(errors[0], ValueError):  # the engine refused a prompt or a parameter
                raise APIError(400, str(errors[0])) from errors[0]
            raise errors[0]
        return streams

    @staticmethod
    async def _finish(streams: list[RequestStream]) -> list[RequestOutput]:
        try:
            return [await _final(s) for s in streams]
        finally:
            for stream in streams:
                stream.abort()


def _message_text(message: ChatMessage, i: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(
                400,
                f"only text content parts are supported, got {part.type!r}",
                param=f"messages[{i}].content",
            )
        texts.append(part.text)
    return "\n".join(texts)
