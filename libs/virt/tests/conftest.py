"""Fixtures for the virt tests: the real libvirtd on this machine and one connection.

Tests marked ``libvirt`` skip when libvirtd is not running and cannot be started (not
root). VM names carry the pid so that parallel runs on one libvirtd do not collide.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable

import pytest

from virtbackup.testing.libvirtd import ensure_libvirtd
from virtbackup.virt import Connection, open_connection


@pytest.fixture(scope="session")
def libvirtd() -> None:
    """libvirtd and virtlogd are running (started here if needed)."""
    try:
        ensure_libvirtd()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no usable libvirtd: {exc}")


@pytest.fixture(scope="session")
async def conn(libvirtd: None) -> AsyncIterator[Connection]:
    """One local read-write connection for the whole session."""
    connection = await open_connection()
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def vm_name() -> Callable[[str], str]:
    """Unique VM names: ``vm_name("backup")`` -> ``vbt-virt-<pid>-backup``."""
    return lambda suffix: f"vbt-virt-{os.getpid()}-{suffix}"
