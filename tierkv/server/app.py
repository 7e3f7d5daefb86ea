"""FastAPI app of the OpenAI-compatible server, and ``run_server`` behind ``tierkv serve``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, vLLM's
``POST /tokenize``, ``POST /detokenize`` and ``GET /version``, FastAPI's ``/openapi.json`` and
``/docs`` (all behind the API key when one is set), ``GET /health`` and ``GET /metrics``.
Every error has OpenAI's body; invalid input is a 400, never a 422 or a 500. The key, the body
size and the body read time are checked before any route runs (``tierkv.server.guard``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from tierkv import __version__
from tierkv.config import EngineConfig
from tierkv.engine.async_engine import AsyncEngine
from tierkv.engine.async_protocol import EngineDeadError, StepError
from tierkv.engine.engine import Engine
from tierkv.server.errors import APIError, describe_error
from tierkv.server.guard import RequestGuard, ServerLimits
from tierkv.server.launcher import banner, bind_socket, configure_logging, serve_app
from tierkv.server.metrics import Metrics
from tierkv.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)
from tierkv.server.serving import OpenAIServing
from tierkv.server.tokenize import router as tokenize_router
from tierkv.tokenizer import Tokenizer

T = TypeVar("T")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 500, 503)
}


def _json(payload: BaseModel, status: int = 200) -> Response:
    return Response(payload.model_dump_json(), status_code=status, media_type="application/json")


def _error(status: int, message: str, type: str, param: str | None = None) -> Response:
    return _json(ErrorResponse.of(message, type, param), status)


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


def _check_prompt_count(request: Request, prompt: str | list[Any]) -> None:
    """Refuse more prompts in one request than the server allows (each is an engine request)."""
    # A list of texts or of token-id lists is a batch; a list of ints is one prompt.
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return
    limit = request.app.state.limits.max_prompts
    if len(prompt) > limit:
        raise APIError(
            400,
            f"{len(prompt)} prompts in one request; this server takes at most {limit} "
            "(--max-prompts-per-request)",
            param="prompt",
        )


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work``; if the client goes away first, cancel it (which aborts its requests)."""

    async def disconnected() -> None:
        # The body has been read, so the next message can only be the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()  # a no-op once the work is done
    return task.result() if task.done() else None


async def _respond(request: Request, work: Awaitable[BaseModel | AsyncIterator[str]]) -> Response:
    result = await _unless_disconnected(request, work)
    if result is None:
        return Response(status_code=499)  # nobody is listening; nothing is sent
    if isinstance(result, BaseModel):
        return _json(result)
    return StreamingResponse(
        result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


router = APIRouter(prefix="/v1", responses=_ERRORS)


@router.post("/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Complete one or more prompts; ``stream`` returns server-sent events."""
    _check_prompt_count(request, body.prompt)
    return await _respond(request, _serving(request).completions(body))


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Reply to a conversation rendered with the model's chat template."""
    return await _respond(request, _serving(request).chat(body))


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> Response:
    """The one model this server serves."""
    return _json(_serving(request).models())


def _describe_validation(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A message naming the first few invalid fields, and the first one as ``param``."""
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        return f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}", None
    fields = [".".join(str(p) for p in e.get("loc", ())[1:]) or "body" for e in errors]
    problems = [f"{f}: {e.get('msg')}" for f, e in zip(fields, errors, strict=True)][:3]
    return "; ".join(problems), fields[0].split(".")[0]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        message, param = _describe_validation(exc.errors())
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def failure(request: Request, exc: Exception) -> Response:
        status, body = describe_error(exc)
        return _json(body, status)

    # Expected outcomes: registered by class so they bypass the 500 middleware's traceback.
    for kind in (APIError, EngineDeadError, StepError):
        app.add_exception_handler(kind, failure)


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
) -> FastAPI:
    """The server app over ``engine``; its engine loop runs while the app is running.

    ``app.state.engine`` is the ``AsyncEngine``. With ``api_key`` set, every route but
    ``/health`` and ``/metrics`` needs ``Authorization: Bearer <api_key>``. ``limits`` bound
    the requests (default: ``ServerLimits()``).
    """
    limits = limits or ServerLimits()
    metrics = Metrics(model_name)
    # The pool gauges hold their values from the start, not from the first request: a router
    # reads an idle replica's load too.
    metrics.record_engine(engine.pool_counters())
    async_engine = AsyncEngine(engine, metrics)
    # A tokenizer of its own for the server's thread (the engine's runs in the engine thread),
    # read from the engine's resolved folder (a GGUF's cached one).
    tokenizer = Tokenizer(engine.model_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(async_engine.stop)

    app = FastAPI(title="tierkv", version=__version__, lifespan=lifespan)
    app.state.engine = async_engine
    app.state.api_key = api_key
    app.state.limits = limits
    app.state.serving = OpenAIServing(async_engine, tokenizer, model_name, engine.max_model_len)
    _install_error_handlers(app)
    app.include_router(router)
    app.include_router(tokenize_router, responses=_ERRORS)
    app.add_middleware(RequestGuard, api_key=api_key, limits=limits)

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        """200 while the engine loop runs, 503 once it has died."""
        if async_engine.is_running:
            return Response(status_code=200)
        return _error(503, "the engine loop is not running", "service_unavailable")

    @app.post("/reset_prefix_cache", responses={503: {"model": ErrorResponse}})
    async def reset_prefix_cache() -> Response:
        """Evict the cached prefix pages no running request uses (vLLM's route): for A/B
        runs against one server. Needs the API key when the server has one; a dead engine
        loop is a 503 (the ``EngineDeadError`` handler)."""
        await async_engine.reset_prefix_cache()
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus exposition of the ``tierkv:*`` metrics and the ``vllm:*`` router gauges."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def run_server(args: argparse.Namespace, engine_options: Mapping[str, Any]) -> None:
    """Load the model named by ``tierkv serve``'s arguments and serve it until a signal.

    ``engine_options`` are the ``EngineConfig`` keyword arguments of its engine flags
    (``cli_args.engine_kwargs``): passed in, so that the app imports no CLI module.
    """
    configure_logging()
    limits = ServerLimits.from_args(args)
    # Bound first: a busy port fails in a second, not after the model has loaded.
    sock = bind_socket(args.host, args.port)
    try:
        engine = Engine(EngineConfig.from_kwargs(args.model, **engine_options))
        app = create_app(engine, args.served_model_name, args.api_key, limits)
        host, port = sock.getsockname()[:2]
        address = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        logging.getLogger("tierkv.server").info(banner(engine, args.served_model_name, address))
        serve_app(app, sock, limits)
    finally:
        sock.close()
