"""Fixtures: a fresh driver of each kind per test (the servers, ``sshd``, ``seaweed`` and
``google``, are ``virtbackup.testing.fixtures``')."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtbackup.testing.drivers import DRIVER_KINDS, DriverCase
from virtbackup.testing.fixtures import driver_case


@pytest.fixture(params=DRIVER_KINDS)
async def case(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DriverCase]:
    """A fresh, empty driver of each kind (servers are shared, roots are not)."""
    result = driver_case(request, request.param, tmp_path)
    try:
        yield result
    finally:
        await result.driver.close()
