"""The restore-point listing's filters taken strictly: an empty ``destinationId`` is a
400 naming it, never the default destination's points passed off as "the" listing."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from harness import System, api_client, local_config

from virtbackup.testing.points import write_point

VM = f"vbt-filter-{os.getpid()}"


@pytest.fixture(scope="module")
async def api(system: System, repo_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(system, local_config(repo_dir)) as client:
        yield client


async def test_an_empty_destination_id_is_a_400_naming_it(
    api: httpx.AsyncClient, repo_dir: Path
) -> None:
    await write_point(repo_dir, VM, chunks=1)
    every = await api.get("/api/v1/restore-points", params={"vmName": VM})
    assert every.status_code == 200 and len(every.json()) == 1, every.text
    resp = await api.get("/api/v1/restore-points", params={"destinationId": "", "vmName": VM})
    assert resp.status_code == 400, resp.text
    assert "destinationId" in resp.json()["error"], resp.text
