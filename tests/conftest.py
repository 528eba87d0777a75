from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

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
