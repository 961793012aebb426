"""What a server runs with: the models it serves, the runtime options, the key, and every bound on a request.

`check_bind` is the one rule about where it may listen: loopback freely, anywhere else only with an API key.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

from edgediff.runtime import RuntimeOptions

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # AUTOMATIC1111's port: its clients try it first


class ServerConfigError(ValueError):
    """A server configuration that must not start (the CLI prints it as one line)."""


@dataclass(frozen=True)
class Limits:
    """Bounds on one request, checked before it is queued: a client cannot make the server allocate at will."""

    max_prompt_chars: int = 4000  # OpenAI's own limit for image prompts
    max_images: int = 8  # images per request (n; A1111's batch_size * n_iter)
    max_side: int = 2048  # pixels per side, of requested sizes and of uploaded images
    max_steps: int = 200
    max_upload_bytes: int = 16 * 2**20  # one uploaded image or mask, as sent (not base64-inflated)

    @property
    def max_body_bytes(self) -> int:
        """A whole request: an image and a mask, base64-inflated (4/3), plus the other fields."""
        return 2 * (self.max_upload_bytes * 4 // 3 + 4) + 2**20


@dataclass(frozen=True)
class ServerConfig:
    # catalogue names (`edgediff list`); empty: every readable bundle there, the shipped one first
    models: tuple[str, ...] = ()
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    # when set, every request needs `Authorization: Bearer <api_key>`
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    queue_size: int = 16  # jobs waiting for a worker; one more is answered 429
    workers: int = 1  # jobs generated at once (one pipeline serves them all, each call its own noise)
    idle_seconds: float = 300.0  # a model's pipeline is closed after this long unused (its memory given back)
    stored_image_bytes: int = 64 * 2**20  # images kept for `url` responses and the web page, newest first
    kept_jobs: int = 256  # finished jobs of the job API that stay queryable

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise ServerConfigError("the API key must be non-empty and have no surrounding spaces")
        for name in ("queue_size", "workers", "kept_jobs"):
            if getattr(self, name) < (0 if name == "queue_size" else 1):
                raise ServerConfigError(f"{name} must be >= {0 if name == 'queue_size' else 1}")
        if self.idle_seconds <= 0:
            raise ServerConfigError("idle_seconds must be > 0")

    def replace(self, **changes) -> "ServerConfig":
        return replace(self, **changes)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: addresses no other machine can reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuses to listen beyond this machine without a key: anyone on the network could use it otherwise."""
    if not is_loopback(host) and not api_key:
        raise ServerConfigError(
            f"refusing to listen on {host}: other machines could reach it; pass --api-key KEY "
            "(or set EDGEDIFF_API_KEY), or keep the default host 127.0.0.1"
        )
