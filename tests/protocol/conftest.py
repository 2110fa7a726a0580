"""Fixtures of the protocol tests. The session broker ``mosquitto`` is in tests/conftest.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fedge.protocol.paho_link import PahoLink
from mosquitto import MosquittoServer  # tests/mosquitto.py, on sys.path via tests/conftest.py


@pytest.fixture
def prefix() -> str:
    """A topic prefix no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}/fedge/v1"


@pytest.fixture
def client_id(request: pytest.FixtureRequest) -> str:
    """A client id no other test uses; add a suffix for more than one client."""
    return f"{request.node.name[:30]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")


@pytest.fixture
def own_mosquitto() -> Iterator[MosquittoServer]:
    """A broker of the test's own, for tests that restart it."""
    with MosquittoServer() as server:
        yield server


@pytest.fixture
def links() -> Iterator[list[PahoLink]]:
    """Links made by a test; closed at teardown."""
    made: list[PahoLink] = []
    yield made
    for link in made:
        link.close()
