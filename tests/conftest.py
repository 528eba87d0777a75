from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.relayproc import RelayProcess, free_port


@pytest.fixture(scope="session")
def relay() -> Iterator[RelayProcess]:
    """One relay with default settings, shared by tests that use their own rooms."""
    server = RelayProcess(free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def relay_with() -> Iterator[Callable[..., RelayProcess]]:
    """Start a relay with particular settings; stopped after the test."""
    started: list[RelayProcess] = []

    def start(**settings: object) -> RelayProcess:
        server = RelayProcess(free_port(), settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def room() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


# --- Redis backplane: real redis-server processes on free ports ----------------------


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A fresh redis-server of this test's own (it may kill and restart it)."""
    from tests.redisproc import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """A 3-master Redis Cluster, shared by the tests that use it."""
    from tests.redisproc import REDIS_CLI, REDIS_SERVER, RedisClusterProcs

    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server / redis-cli are not installed")
    cluster = RedisClusterProcs()
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()


@pytest.fixture
def redis_relays() -> Iterator[Callable[..., list[RelayProcess]]]:
    """Start relays sharing a Redis (``redis_relays(url, 2, node_ttl_s=2)``); stopped after the test."""
    from tests.redisproc import start_relays

    started: list[RelayProcess] = []

    def start(url: str, count: int, **settings: object) -> list[RelayProcess]:
        relays = start_relays(url, count, **settings)
        started.extend(relays)
        return relays

    yield start
    for server in started:
        server.stop()
