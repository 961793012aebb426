"""edgediff serve: a local image server speaking OpenAI's images API, AUTOMATIC1111's API and its own job
API with server-sent progress, plus a web page (needs the `serve` extra: starlette, uvicorn, python-multipart).

    from edgediff.server import ServerConfig, create_app, serve
    serve(ServerConfig(models=("shipped",)), port=7860)   # or run create_app(...) under any ASGI server
"""

from .app import create_app
from .config import DEFAULT_HOST, DEFAULT_PORT, Limits, ServerConfig, ServerConfigError, check_bind, is_loopback
from .run import serve

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "Limits",
    "ServerConfig",
    "ServerConfigError",
    "check_bind",
    "create_app",
    "is_loopback",
    "serve",
]
