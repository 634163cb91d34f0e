"""Restore points as resources and prune, through the API, on a filesystem, an SFTP and
an S3 (SeaweedFS) destination: the points are written straight into each repository with
known timestamps (real chunks, manifests, records), so that a prune's outcome can be
checked exactly."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, wait_job

from virtbackup.contracts.v1.points import point_id
from virtbackup.repository.format import manifest_key, record_key
from virtbackup.repository.records import DiskManifest, DiskRecord, RestorePoint
from virtbackup.repository.repository import Repository
from virtbackup.storage.factory import open_driver
from virtbackup.testing.seaweedfs import SeaweedServer
from virtbackup.testing.sshd import SshdServer

VM = f"vbt-rp-{os.getpid()}"
#: A name that needs every trick of the point id (space, ``~``, ``%``, non-ASCII).
ODD = f"vbt rp~ü%41-{os.getpid()}"
#: PBS's test set (tests/prune.rs ``test_prune_simple2``).
SIMPLE2 = [
    "2018-11-15T11-59-15",
    "2019-11-15T11-59-15",
    "2019-11-21T11-59-15",
    "2019-11-22T11-59-15",
    "2019-11-29T11-59-15",
    "2019-12-01T11-59-15",
    "2019-12-02T11-59-15",
    "2019-12-03T11-59-15",
    "2019-12-04T11-59-15",
]


@pytest.fixture(scope="module")
def destinations(
    repo_dir: Path, sshd: SshdServer, seaweed: SeaweedServer
) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "fs": ("filesystem", {"path": str(repo_dir)}),
        "sftp": ("sftp", sshd.params(sshd.make_base(f"rp-{os.getpid()}"))),
        "s3": ("s3", seaweed.params(prefix=f"rp-{os.getpid()}")),
    }


@pytest.fixture(scope="module")
async def api(
    system: System, destinations: dict[str, tuple[str, dict[str, Any]]]
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as client:
        assert (await client.post("/config", json=config(destinations))).status_code == 200
        yield client


def config(
    destinations: dict[str, tuple[str, dict[str, Any]]], **retention: dict[str, Any]
) -> dict[str, Any]:
    """The configuration: this host as server ``local``, ``destinations``, and the
    retention of a destination as ``<id>={"retention": ..., "vmRetention": ...}``."""
    return {
        "servers": [{"id": "local", "name": "This host", "host": ""}],
        "destinations": [
            {"id": d, "name": d, "driverId": kind, "params": params, **retention.get(d, {})}
            for d, (kind, params) in destinations.items()
        ],
        "backupDestinationId": "fs",
    }


async def write_points(kind: str, params: dict[str, Any], vm: str, stamps: list[str]) -> None:
    """Complete restore points of ``vm`` at ``stamps`` (one disk, one shared chunk and one
    of its own each) in the destination."""
    repo = await Repository.open_or_create(open_driver(kind, params))
    try:
        shared = os.urandom(4096) * 8
        shared_id = repo.chunk_id(shared)
        await repo.store_chunk(shared_id, repo.encode_chunk(shared_id, shared))
        for ts in stamps:
            own = os.urandom(32768)
            own_id = repo.chunk_id(own)
            await repo.store_chunk(own_id, repo.encode_chunk(own_id, own))
            manifest = DiskManifest(
                target="vda", size=2 * 32768, chunk_size=32768, format="qcow2",
                source_path="/x/vda.qcow2", chunks=[shared_id, own_id],
            )  # fmt: skip
            point = RestorePoint(
                vm_name=vm, timestamp=ts, source_server_id="local", source_server_name="Local",
                kind="full", created_at="2026-01-30T12:00:00Z", bytes_written=len(own),
                disks=[DiskRecord(
                    target="vda", basename="vda.qcow2", path="/x/vda.qcow2", format="qcow2",
                    size=2 * 32768, manifest=manifest_key(vm, ts, "vda"),
                )],
            )  # fmt: skip
            await repo.commit(point, [manifest], f"<domain><name>{vm}</name></domain>")
    finally:
        await repo.close()


async def keys(kind: str, params: dict[str, Any], prefix: str) -> list[str]:
    driver = open_driver(kind, params)
    try:
        return [key async for key in driver.list(prefix)]
    finally:
        await driver.close()


async def listed(api: httpx.AsyncClient, dest: str, vm: str) -> list[str]:
    resp = await api.get("/api/v1/restore-points", params={"destinationId": dest, "vmName": vm})
    assert resp.status_code == 200, resp.text
    return sorted(p["timestamp"] for p in resp.json())


@pytest.mark.parametrize("dest", ["fs", "sftp", "s3"])
async def test_prune_keeps_exactly_what_the_policy_keeps(
    api: httpx.AsyncClient, destinations: dict[str, tuple[str, dict[str, Any]]], dest: str
) -> None:
    kind, params = destinations[dest]
    vm, other = f"{VM}-{dest}", f"{ODD}-{dest}"
    await write_points(kind, params, vm, SIMPLE2)
    await write_points(kind, params, other, SIMPLE2[-3:])
    # The destination keeps 1 daily and 1 weekly; the odd VM's override keeps the last 2.
    retention = {
        "retention": {"keepDaily": 1, "keepWeekly": 1},
        "vmRetention": {other: {"keepLast": 2}},
    }
    resp = await api.post("/config", json=config(destinations, **{dest: retention}))
    assert resp.status_code == 200, resp.text
    # A point the policy would remove, protected: it survives the prune.
    protected = point_id(dest, vm, "2019-11-15T11-59-15")
    resp = await api.patch(
        f"/api/v1/restore-points/{protected}", json={"protected": True, "notes": "before the move"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["protected"] is True
    assert resp.json()["notes"] == "before the move"

    # The dry run answers at once and changes nothing.
    resp = await api.post(f"/api/v1/destinations/{dest}/prune", json={"dryRun": True})
    assert resp.status_code == 200, resp.text
    plan = resp.json()
    kept = {(d["vmName"], d["timestamp"]): d["reason"] for d in plan["keep"]}
    assert kept == {
        (vm, "2019-12-04T11-59-15"): "keepDaily",
        (vm, "2019-12-01T11-59-15"): "keepWeekly",
        (vm, "2019-11-15T11-59-15"): "protected",
        (other, "2019-12-04T11-59-15"): "keepLast",
        (other, "2019-12-03T11-59-15"): "keepLast",
    }
    assert len(plan["remove"]) == len(SIMPLE2) - 3 + 1
    assert plan["policies"][other] == {"keepLast": 2}
    assert await listed(api, dest, vm) == SIMPLE2

    resp = await api.post(f"/api/v1/destinations/{dest}/prune", json={})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"])
    assert job["state"] == "success", job
    assert job["type"] == "prune"
    removed = {(r["vmName"], r["timestamp"]) for r in job["result"]["removed"]}
    assert removed == {(d["vmName"], d["timestamp"]) for d in plan["remove"]}
    assert job["completedUnits"] == job["totalUnits"] == len(removed)

    assert await listed(api, dest, vm) == [
        "2019-11-15T11-59-15",
        "2019-12-01T11-59-15",
        "2019-12-04T11-59-15",
    ]
    assert await listed(api, dest, other) == ["2019-12-03T11-59-15", "2019-12-04T11-59-15"]
    # Nothing of a removed point is left; every chunk is (only GC removes chunks).
    for ts in SIMPLE2[2:5]:
        folder = record_key(vm, ts).rsplit("/", 1)[0] + "/"
        assert await keys(kind, params, folder) == []
    assert len(await keys(kind, params, "chunks/")) == 1 + len(SIMPLE2) + 1 + 3
    if dest != "s3":  # nor are their (empty) folders, where a destination has folders
        base = Path(params.get("path") or params["basePath"]) / "VirtBackup"
        for ts in SIMPLE2[2:5]:
            gone = base / record_key(vm, ts).rsplit("/", 1)[0]
            assert not gone.exists(), gone
    # The agent API's listing shows the same points.
    entries = await api.get("/restore/entries", params={"destinationId": dest})
    assert sorted(e["timestamp"] for e in entries.json() if e["vmName"] == vm) == await listed(
        api, dest, vm
    )

    # The protected point survives DELETE too, until it is unprotected.
    resp = await api.delete(f"/api/v1/restore-points/{protected}")
    assert resp.status_code == 409, resp.text
    assert "protected" in resp.json()["error"]
    resp = await api.patch(f"/api/v1/restore-points/{protected}", json={"protected": False})
    assert resp.status_code == 200, resp.text
    assert resp.json()["notes"] == "before the move"
    resp = await api.delete(f"/api/v1/restore-points/{protected}")
    assert resp.status_code == 200, resp.text
    assert resp.json()["point"]["timestamp"] == "2019-11-15T11-59-15"
    assert (await api.get(f"/api/v1/restore-points/{protected}")).status_code == 404
    assert await listed(api, dest, vm) == ["2019-12-01T11-59-15", "2019-12-04T11-59-15"]


async def test_bad_input_is_a_4xx_naming_the_field(
    api: httpx.AsyncClient, destinations: dict[str, tuple[str, dict[str, Any]]]
) -> None:
    kind, params = destinations["fs"]
    vm = f"{VM}-bad"
    await write_points(kind, params, vm, ["2026-01-30T12-00-00"])
    pid = point_id("fs", vm, "2026-01-30T12-00-00")
    resp = await api.get(f"/api/v1/restore-points/{pid}")
    assert resp.status_code == 200, resp.text
    point = resp.json()
    assert point["id"] == pid
    assert (point["destinationId"], point["vmName"], point["serverId"]) == ("fs", vm, "local")
    assert (point["kind"], point["parent"], point["protected"], point["notes"]) == (
        "full",
        None,
        False,
        "",
    )
    assert point["logicalBytes"] == 65536
    assert point["storedBytes"] == 32768
    assert point["storedBytesSource"] == "backup.json:bytesWritten"
    assert point["verification"] == {
        "state": "none", "verifiedAt": None, "mode": None, "chunksChecked": 0, "damagedChunks": 0
    }  # fmt: skip

    def says(resp: httpx.Response, status: int, *words: str) -> None:
        assert resp.status_code == status, resp.text
        for word in words:
            assert word in resp.json()["error"], (word, resp.text)

    url = f"/api/v1/restore-points/{pid}"
    says(await api.patch(url, json={"protected": True, "vmName": "x"}), 400, "vmName")
    says(await api.patch(url, json={"protected": "yes"}), 400, "protected")
    says(await api.patch(url, json={"notes": "n" * 1025}), 400, "notes")
    says(await api.get("/api/v1/restore-points/nonsense"), 400, "id")
    says(await api.delete("/api/v1/restore-points/fs~!!~2026-01-30T12-00-00"), 400, "id")
    says(await api.get(f"/api/v1/restore-points/fs~{pid.split('~')[1]}~2026-01-30T12-00-01"), 404)
    # The shape of a timestamp but no date and time: a bad id, not an unknown point.
    says(await api.get(f"/api/v1/restore-points/fs~{pid.split('~')[1]}~2026-13-40T12-00-00"), 400)
    says(
        await api.get(f"/api/v1/restore-points/nowhere~{pid.split('~')[1]}~2026-01-30T12-00-00"),
        404,
        "nowhere",
    )
    says(await api.get("/api/v1/restore-points", params={"destinationId": "nowhere"}), 404)
    # Nothing changed by the refused requests.
    assert (await api.get(url)).json() == point
    # A verification (verify.json, written by verify jobs) shows in the listing.
    driver = open_driver(kind, params)
    verified = b'{"state":"damaged","verifiedAt":"2026-11-30T10:00:00Z","mode":"full",'
    verified += b'"chunksChecked":2,"damagedChunks":["ab"]}'
    await driver.put(
        record_key(vm, "2026-01-30T12-00-00").replace("backup.json", "verify.json"), verified
    )
    await driver.close()
    point = (await api.get(url)).json()
    assert point["verification"] == {
        "state": "damaged", "verifiedAt": "2026-11-30T10:00:00Z", "mode": "full",
        "chunksChecked": 2, "damagedChunks": 1,
    }  # fmt: skip

    prune = "/api/v1/destinations/fs/prune"
    says(await api.post(prune, json={"keepDaily": -1}), 400, "keepDaily")
    says(await api.post(prune, json={"keepLast": 1.5}), 400, "keepLast")
    says(await api.post(prune, json={"keepWeekly": "2"}), 400, "keepWeekly")
    says(await api.post(prune, json={"keepEvery": 2}), 400, "keepEvery")
    says(await api.post(prune, json={"keepLast": 0, "vmName": vm}), 400, "keepAll")
    says(await api.post(prune, json={"vmName": vm}), 400, "vmName")
    # No policy given for a destination that has none: nothing to prune by, said so.
    says(await api.post(prune, json={}), 400, "no retention policy")
    says(await api.post(prune, json={"dryRun": True}), 400, "no retention policy")
    says(await api.post("/api/v1/destinations/nowhere/prune", json={"keepLast": 1}), 404)
    # Acknowledged: a dry run of a policy that keeps nothing removes every point.
    resp = await api.post(prune, json={"vmName": vm, "keepAll": False, "dryRun": True})
    assert resp.status_code == 200, resp.text
    assert [d["timestamp"] for d in resp.json()["remove"]] == ["2026-01-30T12-00-00"]
    assert (await api.get(url)).status_code == 200

    # The configuration refuses bad policies as it refuses every bad field.
    base = config(destinations)
    for policy, field in [
        ({"keepLast": -1}, "retention.keepLast"),
        ({"keepDaily": 2.5}, "retention.keepDaily"),
        ({}, "retention"),
        ({"keepHourly": 0}, "keepAll"),
        ({"keepAll": True, "keepLast": 3}, "retention.keepAll"),
        ({"keepYearly": 1, "keepForever": 1}, "keepForever"),
    ]:
        base["destinations"][0]["retention"] = policy
        says(await api.post("/config", json=base), 400, field)
    base["destinations"][0]["retention"] = {"keepAll": False}
    base["destinations"][0]["vmRetention"] = {vm: {"keepMonthly": -3}}
    says(await api.post("/config", json=base), 400, "vmRetention", "keepMonthly")
    # None of them was stored.
    assert (await api.get("/config")).json()["destinations"][0]["retention"] is None


async def test_a_point_a_job_reads_is_not_deleted(
    api: httpx.AsyncClient, system: System, destinations: dict[str, tuple[str, dict[str, Any]]]
) -> None:
    kind, params = destinations["fs"]
    vm = f"{VM}-busy"
    await write_points(kind, params, vm, ["2026-01-30T12-00-00"])
    pid = point_id("fs", vm, "2026-01-30T12-00-00")
    xml_path = (await api.get(f"/api/v1/restore-points/{pid}")).json()["xmlPath"]
    # Without a transfer worker, a sanity check of the point waits in ``transferring``.
    system.stop("transfer-worker")
    try:
        resp = await api.post("/restore/sanity", json={"xmlPath": xml_path, "destinationId": "fs"})
        assert resp.status_code == 200, resp.text
        job_id = resp.json()["jobId"]
        for _ in range(100):
            if (await api.get(f"/jobs/{job_id}")).json()["phase"] == "transferring":
                break
            await asyncio.sleep(0.1)
        resp = await api.delete(f"/api/v1/restore-points/{pid}")
        assert resp.status_code == 409, resp.text
        assert job_id in resp.json()["error"]
        # A prune skips it and says why.
        resp = await api.post(
            "/api/v1/destinations/fs/prune", json={"vmName": vm, "keepAll": False}
        )
        assert resp.status_code == 200, resp.text
        job = await wait_job(api, resp.json()["jobId"])
        assert job["state"] == "success", job
        assert job["result"]["removed"] == []
        assert job_id in job["result"]["skipped"][0]["reason"]
        assert (await api.post(f"/jobs/{job_id}/cancel")).status_code == 200
        await wait_job(api, job_id)
    finally:
        system.start("transfer-worker")
    resp = await api.delete(f"/api/v1/restore-points/{pid}")
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("dest", ["fs", "sftp", "s3"])
async def test_a_point_whose_record_cannot_be_read_is_listed_as_unreadable(
    api: httpx.AsyncClient, destinations: dict[str, tuple[str, dict[str, Any]]], dest: str
) -> None:
    kind, params = destinations[dest]
    vm = f"{VM}-unreadable-{dest}"
    good, bad = "2026-01-31T12-00-00", "2026-01-30T12-00-00"
    await write_points(kind, params, vm, [bad, good])
    key = record_key(vm, bad)
    driver = open_driver(kind, params)
    try:
        record = await driver.get(key)
        await driver.put(key, b'{"vmName":')
        resp = await api.get("/api/v1/restore-points", params={"destinationId": dest, "vmName": vm})
        assert resp.status_code == 200, resp.text
        points = {p["timestamp"]: p for p in resp.json()}
        assert sorted(points) == [bad, good]
        assert (points[good]["state"], points[good]["reason"]) == ("ok", None)
        shown = points[bad]
        assert shown["state"] == "unreadable", shown
        assert key in shown["reason"] and "cannot be read" in shown["reason"], shown
        assert (shown["id"], shown["vmName"], shown["kind"]) == (
            point_id(dest, vm, bad),
            vm,
            "unknown",
        )
        # The listing of every destination shows it too, and GET says why it is unusable.
        every = await api.get("/api/v1/restore-points", params={"vmName": vm})
        assert [p["state"] for p in every.json() if p["id"] == shown["id"]] == ["unreadable"]
        one = await api.get(f"/api/v1/restore-points/{shown['id']}")
        assert one.status_code == 409 and "cannot be read" in one.json()["error"], one.text
    finally:
        await driver.put(key, record)
        await driver.close()


async def test_an_sftp_destination_whose_base_path_is_missing_is_unavailable(
    api: httpx.AsyncClient, destinations: dict[str, tuple[str, dict[str, Any]]], sshd: SshdServer
) -> None:
    """As a filesystem destination whose disk is not mounted: 503 naming it and saying
    the path is missing, never an empty repository."""
    missing = str(sshd.data_dir / f"unmounted-{os.getpid()}")
    with_gone = {**destinations, "gone": ("sftp", sshd.params(missing))}
    assert (await api.post("/config", json=config(with_gone))).status_code == 200
    try:
        for url in ("/api/v1/restore-points?destinationId=gone", "/api/v1/destinations/gone/stats"):
            resp = await api.get(url)
            assert resp.status_code == 503, (url, resp.text)
            error = resp.json()["error"]
            assert "gone" in error and "does not exist" in error and missing in error, error
        resp = await api.get("/api/v1/restore-points")
        assert resp.status_code == 200, resp.text
        assert "gone" in resp.headers["X-Unreadable-Destinations"].split(",")
    finally:
        assert (await api.post("/config", json=config(destinations))).status_code == 200
    assert not os.path.exists(missing)


@pytest.mark.parametrize("kind", ["sftp", "s3"])
async def test_a_missing_base_path_or_bucket_is_unavailable_on_every_point_route(
    api: httpx.AsyncClient,
    destinations: dict[str, tuple[str, dict[str, Any]]],
    sshd: SshdServer,
    seaweed: SeaweedServer,
    kind: str,
) -> None:
    """An SFTP ``basePath`` that does not exist, an S3 bucket that does not exist: as an
    unmounted filesystem destination, 503 naming the destination and what is missing on
    every restore-point route, never an empty repository (404) or a 500."""
    if kind == "sftp":
        missing = str(sshd.data_dir / f"unmounted-{os.getpid()}")
        params = sshd.params(missing)
    else:
        missing = f"vbt-no-bucket-{os.getpid()}"
        params = seaweed.params(prefix="rp", bucket=missing)
    with_gone = {**destinations, "gone": (kind, params)}
    assert (await api.post("/config", json=config(with_gone))).status_code == 200
    pid = point_id("gone", VM, "2026-01-30T12-00-00")
    try:
        for method, url, body in [
            ("GET", "/api/v1/restore-points?destinationId=gone", None),
            ("GET", f"/api/v1/restore-points/{pid}", None),
            ("PATCH", f"/api/v1/restore-points/{pid}", {"notes": "x"}),
            ("DELETE", f"/api/v1/restore-points/{pid}", None),
            ("POST", "/api/v1/destinations/gone/prune", {"keepLast": 1, "dryRun": True}),
            ("GET", "/api/v1/destinations/gone/stats", None),
        ]:
            resp = await api.request(method, url, json=body)
            assert resp.status_code == 503, (method, url, resp.text)
            error = resp.json()["error"]
            assert "gone" in error and "does not exist" in error and missing in error, error
    finally:
        assert (await api.post("/config", json=config(destinations))).status_code == 200
