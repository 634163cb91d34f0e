"""Pytest fixtures shared by every test package (loaded by the root ``conftest.py``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtbackup.runtime.nats_server import NatsServer, start_nats_server
from virtbackup.testing.vms import vm_directory


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream for one test, storing under ``tmp_path``; clients
    must log in (``server.client_settings()``, ``virtbackup.testing.nats.connect``)."""
    server = start_nats_server(tmp_path / "nats", auth=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vm_dir() -> Iterator[Path]:
    """A QEMU-traversable directory for a module's images and scratch files."""
    path = vm_directory()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def repo_dir() -> Iterator[Path]:
    """A module's filesystem repository folder (a destination's ``path``), removed at
    the end (root owns what the services wrote there)."""
    path = vm_directory(prefix="vbtest-repo-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
