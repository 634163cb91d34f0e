"""Fixtures: real sshd and SeaweedFS once per session, a Google Drive stand-in per test, a
fresh driver of each kind per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from virtbackup.testing.drivers import DRIVER_KINDS, DriverCase, open_test_driver
from virtbackup.testing.gdrive import FakeGoogleDrive
from virtbackup.testing.seaweedfs import SeaweedServer
from virtbackup.testing.sshd import SshdServer


@pytest.fixture(scope="session")
def sshd() -> Iterator[SshdServer]:
    server = SshdServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedServer]:
    server = SeaweedServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def google() -> Iterator[FakeGoogleDrive]:
    """The Google Drive stand-in (in memory, so one per test keeps memory flat)."""
    server = FakeGoogleDrive()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(params=DRIVER_KINDS)
async def case(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DriverCase]:
    """A fresh, empty driver of each kind (servers are shared, roots are not)."""
    kind: str = request.param
    result = open_test_driver(
        kind,
        scratch=tmp_path,
        sshd=request.getfixturevalue("sshd") if kind == "sftp" else None,
        seaweed=request.getfixturevalue("seaweed") if kind == "s3" else None,
        google=request.getfixturevalue("google") if kind == "gdrive" else None,
    )
    try:
        yield result
    finally:
        await result.driver.close()
