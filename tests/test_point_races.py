"""Deleting restore points concurrently: each point is deleted once, and only that
deletion says so. Two ``DELETE`` requests for one point answer one 200 and one 404; two
prunes of one destination (prunes may run together) never both report a point removed.
Points are written straight into a filesystem repository (no VM needed)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, api_client, local_config, wait_job

from virtbackup.contracts.v1.points import point_id
from virtbackup.testing.points import write_point

VM = f"vbt-race-{os.getpid()}"
PRUNED = f"vbt-race2-{os.getpid()}"


@pytest.fixture(scope="module")
async def api(system: System, repo_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(system, local_config(repo_dir)) as client:
        yield client


async def points_of(repo_dir: Path, vm: str, count: int) -> list[str]:
    """``count`` new points of ``vm`` in destination ``fs``: their ids."""
    ids = []
    for _ in range(count):
        xml = await write_point(repo_dir, vm, chunks=1)
        timestamp = xml.split("/")[2]
        ids.append(point_id("fs", vm, timestamp))
    return ids


async def test_concurrent_deletes_of_one_point_answer_one_200(
    api: httpx.AsyncClient, repo_dir: Path
) -> None:
    for pid in await points_of(repo_dir, VM, 6):
        answers = await asyncio.gather(
            *(api.delete(f"/api/v1/restore-points/{pid}") for _ in range(6))
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [200] + [404] * 5, [(a.status_code, a.text[:200]) for a in answers]
        gone = [a for a in answers if a.status_code == 404]
        assert all("not found" in a.text for a in gone), [a.text for a in gone]
        assert (await api.get(f"/api/v1/restore-points/{pid}")).status_code == 404


async def test_concurrent_prunes_never_both_report_a_point_removed(
    api: httpx.AsyncClient, repo_dir: Path
) -> None:
    ids = await points_of(repo_dir, PRUNED, 16)
    body = {"vmName": PRUNED, "keepLast": 1}
    started = await asyncio.gather(
        *(api.post("/api/v1/destinations/fs/prune", json=body) for _ in range(2))
    )
    assert [s.status_code for s in started] == [200, 200], [s.text for s in started]
    jobs = [await wait_job(api, s.json()["jobId"]) for s in started]
    assert [j["state"] for j in jobs] == ["success", "success"], jobs
    results: list[dict[str, Any]] = [j["result"] for j in jobs]
    removed = [r["id"] for result in results for r in result["removed"]]
    # Each point removed by exactly one of them; the newest kept by both.
    assert sorted(removed) == sorted(ids[:-1]), results
    left = (await api.get(f"/api/v1/restore-points?destinationId=fs&vmName={PRUNED}")).json()
    assert [p["id"] for p in left] == [ids[-1]]
    for result in results:  # what the other removed first is skipped, saying so
        for skipped in result["skipped"]:
            assert "already deleted" in skipped["reason"], skipped
