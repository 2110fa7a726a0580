"""Shared fixtures. Tests that need a broker start their own Mosquitto (or NATS cluster) on
free ports."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# TenSEAL (the he extra) must load before TensorFlow (the build tests): each carries its own
# protobuf, and TenSEAL loaded second cannot serialise (fedge.protocol.he.tenseal()).
with contextlib.suppress(ImportError):
    import tenseal  # noqa: F401
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


# The suite runs on two xdist workers (pyproject: -n 2, one module to a worker at a time, in
# the order below). Modules go out longest first, so that none of them starts late and ends the
# run alone: the wire fuzz (one to two minutes of CPU), then the modules with tests marked slow,
# then the rest, each group in collection order.
FIRST = ("tests/test_fuzz_wire.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        path = item.path.relative_to(REPO).as_posix()
        return 0 if path in FIRST else 1 if item.path in slow else 2

    items.sort(key=rank)  # stable: a module's tests stay together and in order


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def digits_model() -> Path:
    return REPO / "models" / "artifacts" / "digits_mlp.tflite"


@pytest.fixture(scope="session")
def digits_spec_path() -> Path:
    return REPO / "models" / "specs" / "digits_mlp.json"


@pytest.fixture(scope="session")
def mosquitto():  # type: ignore[no-untyped-def]
    """One real Mosquitto for the session, from broker_config/dev.conf on a free port."""
    from mosquitto import MosquittoServer

    with MosquittoServer() as server:
        yield server


@pytest.fixture(scope="session")
def nats_cluster():  # type: ignore[no-untyped-def]
    """Three nats-server nodes routed to each other, from broker_config/nats-cluster.conf,
    MQTT on a free port each (``nats_cluster.nodes[i].url``)."""
    from nats_cluster import NatsCluster

    with NatsCluster(3) as cluster:
        yield cluster


@pytest.fixture
def fleet_id(request: pytest.FixtureRequest) -> str:
    """A fleet id (and so a topic prefix) of the test's own."""
    import re
    import uuid

    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]
    return f"{name}-{uuid.uuid4().hex[:8]}"
