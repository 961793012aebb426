"""Running the app with uvicorn: the bind check first, then a socket bound here (so that port 0 works and
the address printed is the real one)."""

from __future__ import annotations

import socket

from .app import create_app
from .config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig, check_bind

GRACEFUL_SECONDS = 5  # Ctrl-C waits this long for open responses (event streams never end on their own)


def bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


def serve(config: ServerConfig | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level="info"):
    """Serves until interrupted. Refuses a non-loopback host without an API key (ServerConfigError)."""
    import uvicorn

    config = config or ServerConfig()
    check_bind(host, config.api_key)
    app = create_app(config)  # before binding: a bad model name fails without touching the network
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"edgediff serve: http://{shown}:{bound_port}/ (models: {', '.join(app.state.server.catalog.names())})")
    print(f"  OpenAI: base_url http://{shown}:{bound_port}/v1   AUTOMATIC1111: http://{shown}:{bound_port}", flush=True)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=log_level, proxy_headers=False, timeout_graceful_shutdown=GRACEFUL_SECONDS)
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
