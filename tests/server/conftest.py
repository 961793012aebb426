"""The server tier: real servers (uvicorn on a loopback socket in a thread), real clients, the shipped model.

Every server here listens on 127.0.0.1 only, on a port the kernel picks. Test modules are named
test_server_* (the tiers share one namespace of module names).
"""

from __future__ import annotations

import pytest

# the tests skip themselves without the serve extra (each module's importorskip); fixtures import lazily


@pytest.fixture(scope="session")
def server():
    """One server for the tests that need no special configuration."""
    from server_helpers import running_server

    with running_server() as running:
        yield running


@pytest.fixture(scope="session")
def reference():
    """The library's own pipeline, for the images the server must reproduce exactly."""
    from edgediff.runtime import Pipeline, resolve_bundle

    with Pipeline.from_bundle(resolve_bundle("shipped")) as pipe:
        yield pipe
