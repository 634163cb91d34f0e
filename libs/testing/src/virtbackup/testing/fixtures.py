"""Pytest fixtures shared by every test package (loaded by the root ``conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from virtbackup.runtime.nats_server import NatsServer, start_nats_server


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream for one test, storing under ``tmp_path``; clients
    must log in (``server.client_settings()``, ``virtbackup.testing.nats.connect``)."""
    server = start_nats_server(tmp_path / "nats", auth=True)
    try:
        yield server
    finally:
        server.stop()
