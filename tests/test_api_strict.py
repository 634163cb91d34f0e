"""Bodies decoded strictly on every listener, one form of error, unreadable destinations
named (503), and concurrent changes of one VM's restore points taking turns.

No VM is needed: restore points are written straight into a filesystem repository
(``test_restore_points.write_points``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System
from test_restore_points import write_points

from virtbackup.contracts.v1.points import point_id

VM = f"vbt-strict-{os.getpid()}"
STAMPS = ["2026-01-01T10-00-00", "2026-01-02T10-00-00", "2026-01-03T10-00-00"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("strict")
    out = {name: base / name for name in ("good", "bad", "gone")}
    for path in out.values():
        path.mkdir(mode=0o700)
    return out


@pytest.fixture(scope="module")
async def api(system: System, dirs: dict[str, Path]) -> AsyncIterator[httpx.AsyncClient]:
    await write_points("filesystem", {"path": str(dirs["good"])}, VM, STAMPS)
    await write_points("filesystem", {"path": str(dirs["bad"])}, VM, STAMPS[:1])
    cfg = {
        "servers": [{"id": "local", "name": "This host", "host": ""}],
        "destinations": [
            {"id": d, "name": d, "driverId": "filesystem", "params": {"path": str(p)}}
            for d, p in dirs.items()
        ],
        "backupDestinationId": "good",
    }
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as client:
        resp = await client.post("/config", json=cfg)
        assert resp.status_code == 200, resp.text
        # After the configuration is stored: the bad one's repository turns unreadable,
        # the gone one's directory disappears (an unmounted disk).
        repo_json = next(dirs["bad"].rglob("repository.json"))
        repo_json.write_text("{garbage")
        dirs["gone"].rmdir()
        yield client


@pytest.fixture
async def hyper(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.hypersdk_url, headers=system.auth(), timeout=30
    ) as client:
        yield client


def refused(resp: httpx.Response, status: int, *words: str) -> str:
    assert resp.status_code == status, resp.text
    message: str = resp.json()["error"]
    for word in words:
        assert word in message, message
    assert "vb.cmd" not in message, message
    return message


async def post(api: httpx.AsyncClient, path: str, raw: str, method: str = "POST") -> httpx.Response:
    """``raw`` sent as it is (a client's JSON encoder would not write it)."""
    return await api.request(
        method, path, content=raw, headers={"content-type": "application/json"}
    )


async def test_no_body_is_coerced_on_any_listener(
    api: httpx.AsyncClient, hyper: httpx.AsyncClient
) -> None:
    refused(
        await api.post("/api/v1/destinations/good/gc", json={"graceSeconds": "60", "dryRun": True}),
        400,
        "Expected `int | null`, got `str` - at `$.graceSeconds`",
    )
    refused(
        await api.post(
            "/api/v1/destinations/good/verify", json={"mode": "sample", "samplePercent": "5"}
        ),
        400,
        "- at `$.samplePercent`",
    )
    refused(
        await api.post("/servers/local/backup", json={"vmName": "no-such-vm", "fresh": "true"}),
        400,
        "- at `$.fresh`",
    )
    refused(await hyper.post("/jobs/query", json={"limit": "5"}), 400, "- at `$.limit`")
    # The whole body of the wrong type: the same form, at ``$``.
    refused(await api.post("/api/v1/destinations/good/gc", json=[1]), 400, "- at `$`")


async def test_a_key_given_twice_is_400_naming_it(
    api: httpx.AsyncClient, hyper: httpx.AsyncClient
) -> None:
    refused(
        await post(api, "/api/v1/destinations/good/prune", '{"dryRun":true,"dryRun":false}'),
        400,
        "'dryRun' is given twice",
        "- at `$.dryRun`",
    )
    assert len(await listed(api)) == len(STAMPS)  # nothing pruned
    refused(
        await post(api, "/servers/local/backup", '{"vmName":"a","vmName":"b"}'),
        400,
        "- at `$.vmName`",
    )
    refused(
        await post(api, "/config", '{"servers":[{"id":"x","id":"y"}]}'),
        400,
        "- at `$.servers[0].id`",
    )
    refused(await post(hyper, "/jobs/query", '{"all":true,"all":false}'), 400, "- at `$.all`")


async def listed(api: httpx.AsyncClient, dest: str = "good") -> list[dict[str, Any]]:
    resp = await api.get("/api/v1/restore-points", params={"destinationId": dest, "vmName": VM})
    assert resp.status_code == 200, resp.text
    points: list[dict[str, Any]] = resp.json()
    return points


async def test_error_texts_have_one_form(api: httpx.AsyncClient) -> None:
    pid = point_id("good", VM, STAMPS[0])
    message = refused(
        await post(api, f"/api/v1/restore-points/{pid}", '{"notes":"\\ud800"}', "PATCH"),
        400,
        "lone UTF-16 surrogate",
        "- at `$.notes`",
    )
    assert "truncated" not in message
    refused(await api.get(f"/api/v1/restore-points/{'x' * 800}"), 400, "- at `pointId`")
    refused(await api.get("/api/v1/restore-points/nonsense"), 400, "- at `pointId`")
    refused(await api.get("/servers/a%00b/vms"), 400, "NUL", "- at `serverId`")
    refused(await api.get("/api/v1/restore-points?vmName=a%00b"), 400, "- at `vmName`")
    refused(await api.post("/api/v1/destinations/good/verify", json={"mode": "sample"}), 400,
            "- at `$.samplePercent`")  # fmt: skip
    refused(
        await api.post(f"/api/v1/destinations/{'d' * 300}/gc", json={}),
        400,
        "- at `destinationId`",
    )
    refused(
        await api.post(f"/api/v1/destinations/{'d' * 300}/prune", json={"dryRun": True}),
        400,
        "- at `destinationId`",
    )
    not_found = "destination 'nope' not found - at `destinationId`"
    refused(
        await api.post("/api/v1/destinations/nope/prune", json={"dryRun": True}), 404, not_found
    )
    refused(await api.post("/api/v1/destinations/nope/gc", json={}), 404, not_found)
    refused(await api.post("/api/v1/destinations/nope/verify", json={}), 404, not_found)
    refused(await api.get("/api/v1/destinations/nope/stats"), 404, not_found)
    refused(await api.get("/api/v1/restore-points?destinationId=nope"), 404, not_found)


async def test_unreadable_destinations_are_503_naming_them(api: httpx.AsyncClient) -> None:
    bad_point = point_id("bad", VM, STAMPS[0])
    for resp in (
        await api.get("/api/v1/restore-points", params={"destinationId": "bad"}),
        await api.get("/api/v1/destinations/bad/stats"),
        await api.post("/api/v1/destinations/bad/prune", json={"dryRun": True, "keepLast": 1}),
        await api.get(f"/api/v1/restore-points/{bad_point}"),
        await api.delete(f"/api/v1/restore-points/{bad_point}"),
        await api.post("/api/v1/destinations/bad/gc", json={"dryRun": True}),
        await api.post("/api/v1/destinations/bad/verify", json={}),
    ):
        refused(resp, 503, "destination 'bad' cannot be used", "repository.json is unreadable")
    for resp in (
        await api.get("/api/v1/restore-points", params={"destinationId": "gone"}),
        await api.get("/api/v1/destinations/gone/stats"),
        await api.post("/api/v1/destinations/gone/prune", json={"dryRun": True, "keepLast": 1}),
        await api.post("/api/v1/destinations/gone/gc", json={"dryRun": True}),
    ):
        refused(resp, 503, "destination 'gone' cannot be used", "does not exist")
    every = await api.get("/api/v1/restore-points")
    assert every.status_code == 200, every.text
    assert every.headers["x-unreadable-destinations"] == "bad,gone"
    assert {p["destinationId"] for p in every.json() if p["vmName"] == VM} == {"good"}


async def test_parallel_changes_of_one_vms_points_take_turns(api: httpx.AsyncClient) -> None:
    async def patch(ts: str, notes: str) -> httpx.Response:
        return await api.patch(
            f"/api/v1/restore-points/{point_id('good', VM, ts)}", json={"notes": notes}
        )

    answers = await asyncio.gather(
        *(patch(ts, f"note {n} {ts}") for n in range(2) for ts in STAMPS)
    )
    for resp in answers:
        assert resp.status_code == 200, resp.text
    notes = {p["timestamp"]: p["notes"] for p in await listed(api)}
    assert all(notes[ts] in (f"note 0 {ts}", f"note 1 {ts}") for ts in STAMPS), notes
