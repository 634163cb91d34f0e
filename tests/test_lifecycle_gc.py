"""Garbage collection, verify and statistics end to end: real VMs (libvirtd/QEMU), the
services as processes, a filesystem destination.

Backups that deduplicate against old unreferenced chunks run while a GC (grace 0) marks
and sweeps, with varied timing (every backup holds before its commit); every point then
passes a full verify and restores bit-identical. A corrupted chunk is found by a 100 %
sample and named by a full verify. The tests in this module build on each other, in
order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import blake3
import httpx
import pytest
from harness import System, local_config, running_system, same, snapshot, wait_job

from virtbackup.contracts.v1.points import point_id
from virtbackup.repository.format import (
    DEFAULT_CHUNK_SIZE,
    chunk_key,
    quarantine_key,
    record_key,
)
from virtbackup.repository.repository import Repository
from virtbackup.repository.verification import read_verification
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.testing.vms import SmallVm, create_vm, guest_write, remove_vm, vm_directory
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
SIZE = 64 * MiB
CHUNK = DEFAULT_CHUNK_SIZE  # the repository's (the geometry below is in its chunks)
VM = f"vbt-gc-{os.getpid()}"
OTHER = f"vbt-gc2-{os.getpid()}"
#: Every backup holds this long with its chunks stored, before it commits.
HOLD = 3.0
STATE: dict[str, Any] = {"snaps": {}}


@pytest.fixture(scope="module")
def sysm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(
        tmp_path_factory.mktemp("gc"),
        workers=1,
        orchestrators=1,
        VIRTBACKUP_DEBUG="true",
        VIRTBACKUP_DEBUG_HOLDS=json.dumps({"before:committing": HOLD}),
    ) as system:
        yield system


@pytest.fixture(scope="module")
async def vms(conn: Connection) -> AsyncIterator[tuple[SmallVm, SmallVm]]:
    directory = vm_directory()
    try:
        first = await create_vm(conn, VM, directory, [SIZE])
        second = await create_vm(conn, OTHER, directory, [SIZE])
        yield first, second
    finally:
        await remove_vm(conn, VM)
        await remove_vm(conn, OTHER, delete_directory=directory)


@pytest.fixture(scope="module")
async def api(sysm: System, repo_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=sysm.url, headers=sysm.auth(), verify=False, timeout=60
    ) as client:
        assert (await client.post("/config", json=local_config(repo_dir))).status_code == 200
        yield client


async def start_backup(api: httpx.AsyncClient, vm: str) -> str:
    resp = await api.post("/servers/local/backup", json={"vmName": vm})
    assert resp.status_code == 200, resp.text
    job_id: str = resp.json()["jobId"]
    return job_id


async def start(api: httpx.AsyncClient, what: str, body: dict[str, Any] | None = None) -> str:
    resp = await api.post(f"/api/v1/destinations/fs/{what}", json=body or {})
    assert resp.status_code == 202, resp.text
    job: dict[str, Any] = resp.json()
    assert job["type"] == what and job["destinationId"] == "fs"
    return str(job["id"])


async def succeeded(api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    job = await wait_job(api, job_id)
    assert job["state"] == "success", job
    return job


async def wait_message(api: httpx.AsyncClient, job_id: str, text: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        job: dict[str, Any] = (await api.get(f"/jobs/{job_id}")).json()
        if text in job["message"]:
            return job
        assert job["state"] in {"queued", "running"}, job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)


async def open_repo(repo_dir: Path) -> Repository:
    return await Repository.open(FilesystemDriver(repo_dir / "VirtBackup"))


async def store_garbage(repo: Repository) -> str:
    """A chunk no point names (as a failed backup leaves them)."""
    garbage = os.urandom(CHUNK)
    garbage_id = repo.chunk_id(garbage)
    await repo.store_chunk(garbage_id, repo.encode_chunk(garbage_id, garbage))
    return garbage_id


async def test_bad_input_gets_4xx_naming_the_field(api: httpx.AsyncClient) -> None:
    cases: list[tuple[str, Any, int, str]] = [
        ("gc", {"graceSeconds": -1}, 400, "graceSeconds"),
        ("gc", {"graceSeconds": 1.5}, 400, "graceSeconds"),
        ("gc", {"dryRun": "yes"}, 400, "dryRun"),
        ("gc", {"grace": 5}, 400, "grace"),
        ("verify", {"mode": "quick"}, 400, "mode"),
        ("verify", {"mode": "sample"}, 400, "samplePercent"),
        ("verify", {"mode": "sample", "samplePercent": 0}, 400, "samplePercent"),
        ("verify", {"mode": "sample", "samplePercent": 101}, 400, "samplePercent"),
        ("verify", {"samplePercent": 50}, 400, "samplePercent"),
        ("verify", {"outdatedAfterDays": -1}, 400, "outdatedAfterDays"),
        ("verify", {"vmName": "a/b"}, 400, "vmName"),
        ("verify", {"serverId": "bad id"}, 400, "serverId"),
    ]
    for what, body, status, field in cases:
        resp = await api.post(f"/api/v1/destinations/fs/{what}", json=body)
        assert resp.status_code == status, (what, body, resp.text)
        assert field in resp.text, (what, body, resp.text)
    for what in ("gc", "verify"):
        resp = await api.post(f"/api/v1/destinations/nope/{what}", json={})
        assert resp.status_code == 404, resp.text
        assert "nope" in resp.text
    resp = await api.get("/api/v1/destinations/nope/stats")
    assert resp.status_code == 404 and "nope" in resp.text
    jobs = (await api.get("/jobs")).json()
    assert [j for j in jobs if j["type"] in {"gc", "verify"}] == []  # nothing was started


async def test_backups_deduplicating_against_old_chunks_run_during_gc(
    api: httpx.AsyncClient,
    vms: tuple[SmallVm, SmallVm],
    conn: Connection,
    repo_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    vm, other = vms
    for index in range(SIZE // CHUNK):  # content in every chunk
        await guest_write(conn, VM, "vda", index * CHUNK + 99, CHUNK // 2, pattern=index + 1)
    await succeeded(api, await start_backup(api, VM))
    STATE["snaps"][0] = snapshot(vm, tmp_path_factory.mktemp("p0"))[0]

    # The default grace period (no body) keeps young garbage; a dry run removes nothing.
    repo = await open_repo(repo_dir)
    try:
        young = await store_garbage(repo)
    finally:
        await repo.close()
    resp = await api.post("/api/v1/destinations/fs/gc")
    assert resp.status_code == 202, resp.text
    result = (await succeeded(api, resp.json()["id"]))["result"]
    assert (result["graceSeconds"], result["chunksRemoved"]) == (86700, 0), result
    assert result["chunksTooYoung"] == 1, result
    dry = await succeeded(api, await start(api, "gc", {"graceSeconds": 0, "dryRun": True}))
    assert (dry["result"]["chunksRemoved"], dry["result"]["dryRun"]) == (1, True)
    assert "would remove 1 chunks" in dry["message"]
    repo = await open_repo(repo_dir)
    try:
        assert await repo.has_chunk(young)
    finally:
        await repo.close()

    # Each round: chunks a failed backup left behind (old, unreferenced), which the next
    # backup deduplicates against, and pure garbage; a GC at grace 0 starts `delay`
    # seconds after the backup, which holds HOLD seconds before its commit.
    for round_, delay in enumerate([0.0, 0.4, 1.0, 1.8, 3.5], start=1):
        pattern = 0x40 + round_
        reused = bytes([pattern]) * CHUNK
        reused_id = blake3.blake3(reused).hexdigest()
        repo = await open_repo(repo_dir)
        try:
            await repo.store_chunk(reused_id, repo.encode_chunk(reused_id, reused))
            garbage_id = await store_garbage(repo)
        finally:
            await repo.close()
        index = (round_ * 5) % (SIZE // CHUNK)
        await guest_write(conn, VM, "vda", index * CHUNK, CHUNK, pattern=pattern)
        backup_id = await start_backup(api, VM)
        await asyncio.sleep(delay)
        gc_id = await start(api, "gc", {"graceSeconds": 0})
        if round_ == 2:
            # The GC waits for the running backup; a second GC is refused meanwhile, and a
            # new backup of the destination waits for the GC, queued.
            await wait_message(api, gc_id, "waiting for 1 running backup")
            second = await api.post("/api/v1/destinations/fs/gc", json={})
            assert second.status_code == 409, second.text
            assert gc_id in second.text
            # A prune would delete points the GC has marked: refused while it runs too.
            prune = await api.post(
                "/api/v1/destinations/fs/prune", json={"vmName": VM, "keepLast": 100}
            )
            assert prune.status_code == 409, prune.text
            assert gc_id in prune.text
            await guest_write(conn, OTHER, "vda", 3 * CHUNK + 5, 3 * MiB, pattern=0x77)
            other_id = await start_backup(api, OTHER)
            waiting = await wait_message(api, other_id, "waiting for garbage collection")
            assert waiting["state"] == "queued"
        backup = await succeeded(api, backup_id)
        deduplicated = re.search(r"(\d+) deduplicated", backup["message"])
        assert deduplicated and int(deduplicated.group(1)) >= 1, backup["message"]
        gc = await succeeded(api, gc_id)
        result = gc["result"]
        assert result["chunksRemoved"] >= 1 and result["bytesRemoved"] > 0, result
        assert result["graceSeconds"] == 0 and result["dryRun"] is False
        assert result["chunksKept"] == result["stats"]["chunkCount"], result
        repo = await open_repo(repo_dir)
        try:
            assert await repo.has_chunk(reused_id), f"round {round_}: a deduplicated chunk went"
            assert not await repo.has_chunk(garbage_id), f"round {round_}: garbage kept"
        finally:
            await repo.close()
        STATE["snaps"][round_] = snapshot(vm, tmp_path_factory.mktemp(f"p{round_}"))[0]
        if round_ == 2:
            await succeeded(api, other_id)
            STATE["other"] = snapshot(other, tmp_path_factory.mktemp("other"))[0]


async def points(api: httpx.AsyncClient, vm: str) -> list[dict[str, Any]]:
    resp = await api.get("/restore/entries", params={"destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    return sorted([e for e in resp.json() if e["vmName"] == vm], key=lambda e: e["timestamp"])


async def test_every_point_passes_full_verify_and_restores_bit_identical(
    api: httpx.AsyncClient, vms: tuple[SmallVm, SmallVm], repo_dir: Path
) -> None:
    assert len(STATE["snaps"]) == 6, "needs the rounds before"
    verify = await succeeded(api, await start(api, "verify", {"mode": "full"}))
    result = verify["result"]
    assert (result["pointsChecked"], result["pointsDamaged"]) == (7, 0), result
    assert all(p["state"] == "ok" and p["chunksChecked"] > 0 for p in result["points"])
    repo = await open_repo(repo_dir)
    try:
        for stored in await repo.restore_points():
            done = await read_verification(repo, stored.vm_name, stored.timestamp)
            assert (done.state, done.mode, done.damaged_chunks) == ("ok", "full", [])
    finally:
        await repo.close()
    vm, other = vms
    for name, image, snaps in (
        (VM, vm.disks[0], [STATE["snaps"][i] for i in sorted(STATE["snaps"])]),
        (OTHER, other.disks[0], [STATE["other"]]),
    ):
        listed = await points(api, name)
        assert len(listed) == len(snaps)
        for point, snap in zip(listed, snaps, strict=True):
            off = await api.post(
                "/servers/local/actions", json={"action": "forceOff", "vmName": name}
            )
            assert off.status_code in {200, 409}
            resp = await api.post(
                "/servers/local/restore/start",
                json={"xmlPath": point["xmlPath"], "decision": "overwrite", "destinationId": "fs"},
            )
            assert resp.status_code == 200, resp.text
            await succeeded(api, resp.json()["jobId"])
            assert same(image, snap), f"{name} {point['timestamp']} differs"


async def failure_events(api: httpx.AsyncClient, job_id: str) -> list[str]:
    """The ``agent.job_failure`` messages of a job, read back from the event history."""
    found: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            headers = {"Last-Event-ID": "0"}
            async with api.stream("GET", "/events", headers=headers) as resp:
                kind = ""
                async for line in resp.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "agent.job_failure":
                        payload = json.loads(line[6:])["payload"]
                        if payload["jobId"] == job_id:
                            found.append(payload["message"])
    return found


async def test_verify_finds_and_names_a_corrupted_chunk(
    api: httpx.AsyncClient, repo_dir: Path
) -> None:
    repo = await open_repo(repo_dir)
    try:
        latest = (await repo.restore_points(VM))[-1]
        chunks = [c for c in (await repo.manifest(latest, "vda")).chunks if c]
        victim = chunks[-1]
        blob = bytearray(await repo.read_chunk(victim))
        blob[len(blob) // 2] ^= 0xFF
        await repo.driver.put(chunk_key(victim), bytes(blob))
    finally:
        await repo.close()
    for body in (
        {"mode": "sample", "samplePercent": 100, "vmName": VM},
        {"mode": "full", "serverId": "local"},
    ):
        job = await wait_job(api, await start(api, "verify", body))
        assert job["state"] == "failure", job
        assert victim in job["message"]
        damaged = [p for p in job["result"]["points"] if p["state"] == "damaged"]
        assert damaged and all(victim in [c["id"] for c in p["damagedChunks"]] for p in damaged)
        assert latest.timestamp in [p["timestamp"] for p in damaged]
        events = await failure_events(api, job["id"])
        assert any(victim in text and latest.timestamp in text for text in events), events
    repo = await open_repo(repo_dir)
    try:
        done = await read_verification(repo, VM, latest.timestamp)
        assert (done.state, done.damaged_chunks) == ("damaged", [victim])
    finally:
        await repo.close()
    # Points verified less than a day ago are skipped.
    skipped = await succeeded(api, await start(api, "verify", {"outdatedAfterDays": 1}))
    assert skipped["result"]["pointsChecked"] == 0 and skipped["result"]["pointsSkipped"] == 7
    STATE["victim"] = (victim, latest.timestamp)


async def test_a_quarantined_chunk_is_stored_again_and_heals_the_point(
    api: httpx.AsyncClient, repo_dir: Path
) -> None:
    """Verify moved the corrupt chunk aside (``.bad``): the next backup with its data (the
    VM's disk is the damaged point's, restored last) stores it again instead of
    deduplicating against it, and the old point verifies ok again."""
    victim, timestamp = STATE["victim"]
    repo = await open_repo(repo_dir)
    try:
        assert not await repo.has_chunk(victim)
        assert await repo.driver.exists(quarantine_key(victim))
    finally:
        await repo.close()
    backup = await succeeded(api, await start_backup(api, VM))
    # The real reason of the full read: the newest point failed verify.
    assert "read in full: the newest restore point" in backup["message"], backup["message"]
    assert "failed verify" in backup["message"], backup["message"]
    stored = re.search(r"(\d+) stored", backup["message"])
    assert stored and int(stored.group(1)) >= 1, backup["message"]
    repo = await open_repo(repo_dir)
    try:
        await repo.load_chunk(victim)  # stored again, and good
    finally:
        await repo.close()
    verify = await succeeded(api, await start(api, "verify", {"mode": "full", "vmName": VM}))
    healed = [p for p in verify["result"]["points"] if p["timestamp"] == timestamp]
    assert healed and healed[0]["state"] == "ok", verify["result"]
    assert verify["result"]["pointsDamaged"] == 0
    # The next GC removes the quarantined copy: its chunk is stored again.
    gc = await succeeded(api, await start(api, "gc", {"graceSeconds": 0}))
    assert gc["result"]["quarantinedRemoved"] == 1, gc["result"]
    repo = await open_repo(repo_dir)
    try:
        assert not await repo.driver.exists(quarantine_key(victim))
        assert await repo.has_chunk(victim)
    finally:
        await repo.close()


async def test_stats_per_destination_and_vm(api: httpx.AsyncClient) -> None:
    resp = await api.get("/api/v1/destinations/fs/stats")
    assert resp.status_code == 200, resp.text
    stats = resp.json()
    assert stats["points"] == 8 and stats["chunkCount"] > 0
    assert stats["logicalBytes"] > stats["storedBytes"] > 0  # points share chunks
    assert stats["dedupFactor"] == round(stats["logicalBytes"] / stats["storedBytes"], 3)
    by_vm = {v["vmName"]: v for v in stats["vms"]}
    assert set(by_vm) == {VM, OTHER} and by_vm[VM]["points"] == 7
    assert by_vm[VM]["logicalBytes"] + by_vm[OTHER]["logicalBytes"] == stats["logicalBytes"]


async def test_a_cancelled_gc_releases_the_destination(
    api: httpx.AsyncClient, vms: tuple[SmallVm, SmallVm], repo_dir: Path
) -> None:
    """Last: it adds points. The VM runs again after the restores."""
    start_vm = await api.post("/servers/local/actions", json={"action": "start", "vmName": VM})
    assert start_vm.status_code == 200, start_vm.text
    backup_id = await start_backup(api, VM)
    gc_id = await start(api, "gc", {"graceSeconds": 0})
    await wait_message(api, gc_id, "waiting for 1 running backup")
    assert (await api.post(f"/jobs/{gc_id}/cancel")).status_code == 200
    gc = await wait_job(api, gc_id)
    assert gc["state"] == "canceled", gc
    repo = await open_repo(repo_dir)
    try:
        assert [i.key async for i in repo.driver.list_info("locks/gc-")] == []
    finally:
        await repo.close()
    await succeeded(api, backup_id)
    # The gate is open again: a backup runs without waiting for anything.
    backup = await succeeded(api, await start_backup(api, VM))
    assert "waiting for garbage collection" not in str(backup)


async def test_a_record_that_cannot_be_read_stops_gc_and_is_named(
    api: httpx.AsyncClient, repo_dir: Path
) -> None:
    repo = await open_repo(repo_dir)
    try:
        point = (await repo.restore_points(OTHER))[-1]
        key = record_key(point.vm_name, point.timestamp)
        record = await repo.driver.get(key)
        await repo.driver.put(key, b'{"x":')
        kept = {c async for c in repo.all_chunk_ids()}
    finally:
        await repo.close()
    try:
        gc = await wait_job(api, await start(api, "gc", {"graceSeconds": 0}))
        assert gc["state"] == "failure" and key in gc["message"], gc
        stats = (await api.get("/api/v1/destinations/fs/stats")).json()
        assert point.xml_path in stats["unreadablePoints"], stats
        listed = await api.get("/api/v1/restore-points", params={"destinationId": "fs"})
        assert listed.status_code == 200, listed.text
        one = await api.get(f"/api/v1/restore-points/{point_id('fs', OTHER, point.timestamp)}")
        assert one.status_code == 409 and "cannot be read" in one.text, one.text
        repo = await open_repo(repo_dir)
        try:
            assert {c async for c in repo.all_chunk_ids()} >= kept
        finally:
            await repo.close()
    finally:
        repo = await open_repo(repo_dir)
        try:
            await repo.driver.put(key, record)
        finally:
            await repo.close()


async def test_gc_and_prune_claim_the_destination_and_a_skipped_prune_is_shown(
    api: httpx.AsyncClient, repo_dir: Path
) -> None:
    """A GC and a prune submitted together: one runs, the other gets 409 naming it
    (never a prune job that fails). An automatic prune skipped because a GC holds the
    destination says so in the backup job's message."""
    for _ in range(3):
        gc_resp, prune_resp = await asyncio.gather(
            api.post("/api/v1/destinations/fs/gc", json={"dryRun": True}),
            api.post("/api/v1/destinations/fs/prune", json={"vmName": VM, "keepLast": 100}),
        )
        codes = (gc_resp.status_code, prune_resp.status_code)
        assert codes in {(202, 409), (409, 200)}, (gc_resp.text, prune_resp.text)
        if codes == (202, 409):
            winner = str(gc_resp.json()["id"])
            assert winner in prune_resp.text
        else:
            winner = str(prune_resp.json()["jobId"])
            assert winner in gc_resp.text
        await succeeded(api, winner)
    cfg = local_config(repo_dir)
    cfg["destinations"][0]["retention"] = {"keepLast": 100}
    assert (await api.post("/config", json=cfg)).status_code == 200
    try:
        backup_id = await start_backup(api, VM)
        await asyncio.sleep(0.5)
        gc_id = await start(api, "gc", {"graceSeconds": 0})
        await wait_message(api, gc_id, "waiting for 1 running backup")
        # Queued or running, the GC holds the destination: a manual prune gets 409.
        prune = await api.post(
            "/api/v1/destinations/fs/prune", json={"vmName": VM, "keepLast": 100}
        )
        assert prune.status_code == 409 and gc_id in prune.text, prune.text
        await succeeded(api, backup_id)
        await succeeded(api, gc_id)
        backup = (await api.get(f"/jobs/{backup_id}")).json()
        assert "retention prune skipped" in backup["message"], backup
        assert gc_id in backup["message"], backup
    finally:
        assert (await api.post("/config", json=local_config(repo_dir))).status_code == 200
