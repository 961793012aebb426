"""The Starlette application: routes, the request guard (host, key, body size) and start/stop of the workers."""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

from . import jobs_api, openai_api, sdapi
from .config import ServerConfig, is_loopback
from .errors import ApiError, handle_api_error, handle_http_exception, handle_unexpected
from .state import ServerState


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """Checked before any route reads a byte of the body: the Host header (without a key the server is
    loopback-only, and a web page on another site must not reach it through DNS rebinding), the API key,
    and the body size (Content-Length up front, counted bytes for chunked bodies)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        if self.expected is None and not is_loopback(_hostname(headers.get(b"host", b"").decode("latin-1"))):
            error = ApiError(
                403,
                "this server answers only loopback host names (start it with --api-key for others)",
                code="host_not_allowed",
            )
            return await error.response(path)(scope, receive, send)
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            error = ApiError(
                401,
                "missing or wrong API key: send `Authorization: Bearer KEY`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await error.response(path)(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(path)(scope, receive, send)

        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await self._too_large(path)(scope, receive, send)

    def _too_large(self, path: str):
        message = f"the request body is larger than {self.max_body_bytes} bytes"
        return ApiError(413, message, code="request_too_large").response(path)


def _hostname(host: str) -> str:
    """The name in a Host header, without its port ("[::1]:7860" -> "::1")."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _index_page() -> str:
    return resources.files("edgediff.server").joinpath("static", "index.html").read_text(encoding="utf-8")


def create_app(config: ServerConfig | None = None, **overrides) -> Starlette:
    """The ASGI app for `config` (keyword overrides change single fields, e.g. `create_app(workers=2)`).
    Workers start with the app's lifespan; run it with uvicorn (`edgediff.server.serve` does)."""
    config = config or ServerConfig()
    if overrides:
        config = config.replace(**overrides)
    state = ServerState.from_config(config)
    page = _index_page()

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "models": state.catalog.names(),
                "default_model": state.catalog.default,
                "loaded": state.cache.loaded(),
                "queue_depth": state.queue.depth,
                "running": len(state.queue.running()),
            }
        )

    async def metrics(request: Request) -> PlainTextResponse:
        text = state.metrics.render(state.catalog.names(), state.queue, state.cache, state.store)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @asynccontextmanager
    async def lifespan(app):
        state.queue.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.queue.stop)
            state.cache.close_all()

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *openai_api.routes,
            *sdapi.routes,
            *jobs_api.routes,
        ],
        middleware=[Middleware(RequestGuard, api_key=config.api_key, max_body_bytes=config.limits.max_body_bytes)],
        exception_handlers={
            ApiError: handle_api_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        lifespan=lifespan,
    )
    app.state.server = state
    return app
