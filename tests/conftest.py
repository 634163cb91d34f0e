"""Cross-service fixtures: a real nats-server and the services as real processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from harness import System, running_system
from nats.aio.client import Client

from virtbackup.runtime.nats_server import start_nats_server
from virtbackup.runtime.ports import free_port
from virtbackup.testing.libvirtd import ensure_libvirtd
from virtbackup.testing.nats import connect
from virtbackup.virt import Connection, open_connection


@pytest.fixture(scope="session")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("system")) as system:
        yield system


@pytest.fixture
async def api(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=15
    ) as client:
        yield client


@pytest.fixture
async def nc(system: System) -> AsyncIterator[Client]:
    client = await connect(system.nats)
    try:
        yield client
    finally:
        await client.drain()


@pytest.fixture
def make_system(tmp_path: pytest.TempPathFactory) -> Iterator[Callable[..., System]]:
    """A factory of separate systems (own NATS, own data directory), stopped at teardown."""
    made: list[System] = []

    def make(start: bool = True, **env: str) -> System:
        data = Path(str(tmp_path)) / f"system{len(made)}"
        data.mkdir()
        server = start_nats_server(data / "nats", auth=True)
        sys_ = System(data_dir=data, nats=server, agent_port=free_port(), extra_env=env)
        made.append(sys_)
        if start:
            sys_.start_all()
        return sys_

    yield make
    for sys_ in made:
        sys_.stop_all()
        sys_.nats.stop()


@pytest.fixture(scope="session")
async def conn() -> AsyncIterator[Connection]:
    """A connection to the local libvirtd (started if needed) for the tests' own setup."""
    ensure_libvirtd()
    connection = await open_connection()
    try:
        yield connection
    finally:
        await connection.close()
