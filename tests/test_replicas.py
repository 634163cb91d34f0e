"""Two job-orchestrator replicas against a real VM: one VM, one job; a replica killed
mid-job; and a cancel aimed at each phase of a backup and of a restore.

The system runs in debug mode with holds (``VIRTBACKUP_DEBUG_HOLDS``): a job waits two
seconds when it starts transferring, before it commits and once committing, so that a
cancel can be aimed at "reading", "every unit done" and "committing" without a race.
In every case the job's final state must be what happened to the disk and to the
restore points.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, local_config, running_system, same, snapshot, wait_job

from virtbackup.testing.nats import connect
from virtbackup.testing.vms import SmallVm, guest_write, made_vm, vm_directory
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
VM = f"vbt-repl-{os.getpid()}"
HOLD = 2.0


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    holds = {"after:transferring": HOLD, "before:committing": HOLD, "after:committing": HOLD}
    with running_system(
        tmp_path_factory.mktemp("replicas"),
        workers=1,
        orchestrators=2,
        VIRTBACKUP_DEBUG="true",
        VIRTBACKUP_DEBUG_HOLDS=json.dumps(holds),
    ) as system:
        yield system


@pytest.fixture(scope="module")
async def vm(conn: Connection) -> AsyncIterator[SmallVm]:
    async with made_vm(conn, VM, [64 * MiB]) as small:
        yield small


@pytest.fixture(scope="module")
async def api(two: System) -> AsyncIterator[httpx.AsyncClient]:
    repo = vm_directory(prefix="vbtest-repl-repo-")
    async with httpx.AsyncClient(
        base_url=two.url, headers=two.auth(), verify=False, timeout=60
    ) as client:
        cfg = local_config(repo)
        assert (await client.post("/config", json=cfg)).status_code == 200
        yield client


async def points(api: httpx.AsyncClient) -> list[str]:
    resp = await api.get("/restore/entries", params={"destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    return sorted(e["xmlPath"] for e in resp.json() if e["vmName"] == VM)


async def power(api: httpx.AsyncClient, action: str) -> None:
    resp = await api.post("/servers/local/actions", json={"action": action, "vmName": VM})
    assert resp.status_code in {200, 409}, resp.text


async def until_job(
    api: httpx.AsyncClient, job_id: str, test: Any, timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = await api.get(f"/jobs/{job_id}")
        if resp.status_code == 503:  # a replica just died: retry, as a client would
            assert time.monotonic() < deadline, resp.text
            await asyncio.sleep(0.1)
            continue
        assert resp.status_code == 200, resp.text
        job: dict[str, Any] = resp.json()
        if test(job):
            return job
        assert job["state"] in {"queued", "running"}, job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)


async def no_overlay(api: httpx.AsyncClient) -> None:
    """The libvirt backup job has ended (nothing left behind on the host)."""
    deadline = time.monotonic() + 15
    while True:
        vms = {v["vm"]["name"]: v for v in (await api.get("/servers/local/vms")).json()}
        if not vms[VM]["hasOverlay"]:
            return
        assert time.monotonic() < deadline, vms[VM]
        await asyncio.sleep(0.3)


#: Where a cancel is aimed: a predicate on the job, and whether the job must still be
#: cancellable there.
PHASES: dict[str, tuple[Any, bool]] = {
    "queued": (lambda j: True, True),
    "reading": (lambda j: j["phase"] == "transferring", True),
    "units-done": (
        lambda j: (
            j["phase"] == "transferring"
            and j["totalUnits"] > 0
            and j["completedUnits"] == j["totalUnits"]
        ),
        True,
    ),
    "committing": (lambda j: j["phase"] == "committing", False),
}


async def cancel_at(api: httpx.AsyncClient, job_id: str, phase: str) -> dict[str, Any]:
    """Cancel the job at ``phase``; returns its final record after checking the answer."""
    test, cancellable = PHASES[phase]
    await until_job(api, job_id, test)
    resp = await api.post(f"/jobs/{job_id}/cancel")
    if cancellable:
        assert resp.status_code == 200, resp.text
    else:
        assert resp.status_code == 409, resp.text
        assert "point of no return" in resp.json()["error"]
    job = await wait_job(api, job_id, timeout=90)
    assert job["state"] == ("canceled" if cancellable else "success"), job
    return job


async def test_one_vm_one_job_across_replicas_and_a_cancel_at_each_backup_phase(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection
) -> None:
    await power(api, "start")
    await guest_write(conn, VM, "vda", 0, 8 * MiB, pattern=0x3C)
    before = await points(api)

    # Submitted at once: the gateway spreads them over both replicas; one runs.
    answers = await asyncio.gather(
        *(api.post("/servers/local/backup", json={"vmName": VM}) for _ in range(6))
    )
    started = [a.json()["jobId"] for a in answers if a.status_code == 200]
    assert len(started) == 1, [a.text for a in answers]
    for refused in (a for a in answers if a.status_code != 200):
        assert refused.status_code == 409
        assert started[0] in refused.json()["error"]
    await cancel_at(api, started[0], "queued")
    await no_overlay(api)
    assert await points(api) == before

    for phase in ("reading", "units-done"):
        resp = await api.post("/servers/local/backup", json={"vmName": VM})
        assert resp.status_code == 200, resp.text
        await cancel_at(api, resp.json()["jobId"], phase)
        await no_overlay(api)
        assert await points(api) == before, phase

    resp = await api.post("/servers/local/backup", json={"vmName": VM})
    job = await cancel_at(api, resp.json()["jobId"], "committing")
    after = await points(api)
    assert len(after) == len(before) + 1
    # The VM's first point: the cancelled backups before it committed nothing.
    assert job["message"].startswith("full backup"), job["message"]


async def test_a_cancel_at_each_restore_phase_leaves_the_disk_as_the_state_says(
    api: httpx.AsyncClient, vm: SmallVm, conn: Connection, tmp_path: Path
) -> None:
    point = (await points(api))[-1]
    (tmp_path / "point").mkdir()
    (tmp_path / "now").mkdir()
    await power(api, "forceOff")
    at_point = snapshot(vm, tmp_path / "point")
    await power(api, "start")
    await guest_write(conn, VM, "vda", 0, 8 * MiB, pattern=0x81)
    await power(api, "forceOff")
    now = snapshot(vm, tmp_path / "now")
    assert not same(vm.disks[0], at_point[0])

    body = {"xmlPath": point, "decision": "overwrite", "destinationId": "fs"}
    for phase in ("queued", "reading", "units-done"):
        resp = await api.post("/servers/local/restore/start", json=body)
        assert resp.status_code == 200, resp.text
        await cancel_at(api, resp.json()["jobId"], phase)
        assert same(vm.disks[0], now[0]), f"a restore cancelled at {phase} changed the disk"
        leftovers = [p.name for p in vm.disks[0].parent.iterdir() if ".vbrestore-" in p.name]
        assert leftovers == [], leftovers

    resp = await api.post("/servers/local/restore/start", json=body)
    await cancel_at(api, resp.json()["jobId"], "committing")
    assert same(vm.disks[0], at_point[0])


async def test_a_replica_killed_mid_backup_leaves_no_point_and_the_next_backup_works(
    api: httpx.AsyncClient, vm: SmallVm, two: System
) -> None:
    await power(api, "start")
    before = await points(api)
    two.stop("transfer-worker")  # the units wait in VB_WORK
    try:
        resp = await api.post("/servers/local/backup", json={"vmName": VM})
        assert resp.status_code == 200, resp.text
        job_id = resp.json()["jobId"]
        job = await until_job(api, job_id, lambda j: j["totalUnits"] > 0)
        instance = job["owner"].split("/")[0]
        owner = next(
            name
            for name, proc in two.procs.items()
            if name.startswith("job-orchestrator") and instance.endswith(f"-{proc.pid}")
        )
        two.procs[owner].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        final = await wait_job(api, job_id, timeout=60)
        took = time.monotonic() - killed
        assert final["state"] == "failure", final
        assert "stopped while transferring" in final["message"], final
        assert final["owner"] != job["owner"]
        assert took < 30, f"the job was ended {took:.1f} s after its replica died"
        # Its queued units were purged: a worker starting now finds nothing of it.
        nc = await connect(two.nats)
        try:
            info = await nc.jetstream().stream_info(
                "VB_WORK", subjects_filter=f"vb.work.transfer.{job_id}"
            )
            assert info.state.messages == 0
        finally:
            await nc.drain()
    finally:
        two.start("transfer-worker")
    await no_overlay(api)
    assert await points(api) == before
    resp = await api.post("/servers/local/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    assert (await wait_job(api, resp.json()["jobId"], timeout=90))["state"] == "success"
    assert len(await points(api)) == len(before) + 1
    two.start(owner)
    two.wait_ready()
