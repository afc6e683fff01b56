"""The FastAPI app: OpenAI routes, tokenizer routes, health, metrics, API-key auth, lifespan."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

import jpaged
from jpaged.engine import LLMEngine
from serve.async_engine import AsyncEngine
from serve.completions import create_chat_completion, create_completion, render_chat
from serve.errors import APIError, error_body, install_error_handlers
from serve.generation import ServerState
from serve.metrics import ServerMetrics
from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_text,
)

logger = logging.getLogger("jpaged.serve")


class APIKeyMiddleware:
    """401 for /v1/* requests without `Authorization: Bearer <api_key>` (other routes are open)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith("/v1")
            and scope["method"] != "OPTIONS"
        ):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                body = error_body(401, "Incorrect or missing API key.", None, "invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    engine: LLMEngine,
    served_model_names: str | list[str],
    *,
    api_key: str | None = None,
    max_queued_requests: int | None = None,
    chat_template: str | None = None,
    shutdown_drain_s: float = 0.0,
) -> FastAPI:
    """An app serving `engine` (prebuilt; its worker starts with the app's lifespan).

    served_model_names: the names clients may ask for (the first is used in responses).
    shutdown_drain_s: on shutdown, how long requests still in the engine may run before
    they are aborted (uvicorn's own graceful timeout runs first).
    """
    names = [served_model_names] if isinstance(served_model_names, str) else served_model_names
    if not names:
        raise ValueError("served_model_names must name at least one model")
    # the metrics read the worker's snapshot, so they need the async engine built below
    metrics = ServerMetrics(engine, lambda: async_engine.snapshot, names[0])
    async_engine = AsyncEngine(
        engine,
        max_queued_requests=max_queued_requests,
        on_outputs=metrics.on_outputs,
        on_abort=metrics.on_abort,
    )
    state = ServerState(engine, async_engine, list(names), chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        logger.info("engine worker started; serving %s", ", ".join(names))
        try:
            yield
        finally:
            logger.info("shutting down: %d requests in flight", async_engine.num_in_flight)
            await async_engine.shutdown(shutdown_drain_s)
            logger.info("engine worker stopped")

    app = FastAPI(title="jpaged", version=jpaged.__version__, lifespan=lifespan)
    app.state.server = state
    app.state.metrics = metrics
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(body, request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(body, request, state)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        root = engine.config.model or "SmolLM2-135M-Instruct"
        data = [
            {"id": name, "object": "model", "created": state.created, "owned_by": "jpaged",
             "root": root, "parent": None, "max_model_len": state.max_model_len}
            for name in names
        ]  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_healthy:
            reason = "the engine has failed" if async_engine.error else "the engine is not running"
            raise APIError(503, reason, None, "service_unavailable")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": jpaged.__version__}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        state.model_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if body.messages is not None:
            messages = [m.to_template(i) for i, m in enumerate(body.messages)]
            _, ids = render_chat(state, messages, body.add_generation_prompt)
        else:
            assert body.prompt is not None
            prompt = check_text(body.prompt, "prompt")
            ids = state.tokenizer.encode(prompt, add_special_tokens=body.add_special_tokens)
        strs = state.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                "token_strs": strs}  # fmt: skip

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        state.model_name(body.model)
        vocab = state.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must be in [0, {vocab}), got {bad[0]}", "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
