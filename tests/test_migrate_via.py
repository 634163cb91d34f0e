"""Warm migration through a backup destination (``destination.via_destination_id``):
backups of the running VM to a filesystem destination while its guest writes, a last
offline one after the source stopped, and a restore of that point onto the target.

The target is the one tests/test_migrate.py uses: the system libvirt reached over SSH
on loopback (a root sshd of its own), configured as server ``remote`` with a
``restoreDirectories`` of its own, under another VM name. Real libvirtd/QEMU, sshd and
services; the tests share one VM and build on each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import MODULES, System, local_config, running_system, ssh_server, wait_listed

from virtbackup.testing.sshd import SshdServer, sshd_server
from virtbackup.testing.vms import SmallVm, create_vm, guest_write, remove_vm, vm_directory
from virtbackup.virt import Connection, NotFound, get_domain

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
PID = os.getpid()
VM = f"vbt-via-{PID}"
MOVED = f"vbt-viat-{PID}"
CANCELED = f"vbt-viac-{PID}"
FAILED = f"vbt-viaf-{PID}"
ORPHANED = f"vbt-viao-{PID}"
OTHER = f"vbt-viaot-{PID}"
STOPPED = f"vbt-vias-{PID}"
TWIN = f"vbt-viatw-{PID}"
#: Seconds each sync pass waits before its backup (debug hold): a cancel lands there.
SYNC_HOLD = 2
#: Seconds a restore waits once its exports are up (debug hold): the system stops there.
PREPARED_HOLD = 4


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(
        tmp_path_factory.mktemp("migvia"),
        orchestrators=1,
        workers=2,
        VIRTBACKUP_DEBUG="1",
        VIRTBACKUP_DEBUG_HOLDS=json.dumps(
            {"migrate-via:syncing": SYNC_HOLD, "restore:prepared": PREPARED_HOLD}
        ),
    ) as system:
        yield system


@pytest.fixture(scope="module")
def remote() -> Iterator[SshdServer]:
    with sshd_server(root=True) as server:
        yield server


@pytest.fixture(scope="module")
def target_dir() -> Iterator[Path]:
    path = vm_directory(prefix="vbtest-viat-")
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
async def api(
    system: System, repo_dir: Path, vm_dir: Path, remote: SshdServer, target_dir: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """The agent API, with servers ``local`` and ``remote``, destination ``fs``, a
    disabled destination ``off`` and one that cannot be written (``broken``)."""
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=60
    ) as client:
        cfg = local_config(repo_dir)
        # A policy that would prune the migration's points after each of its backups.
        cfg["destinations"][0]["retention"] = {"keepLast": 1}
        blocker = vm_dir / "not-a-directory"
        blocker.write_text("")
        cfg["destinations"] += [
            {"id": "off", "driverId": "filesystem", "enabled": False,
             "params": {"path": str(repo_dir)}},
            # No folder can be made under a regular file: not usable.
            {"id": "broken", "driverId": "filesystem", "params": {"path": str(blocker / "repo")}},
        ]  # fmt: skip
        cfg["servers"].append(
            ssh_server("remote", remote.host, remote.port, remote.username,
                       remote.private_key, target_dir)
        )  # fmt: skip
        resp = await client.post("/config", json=cfg)
        assert resp.status_code == 200, resp.text
        await wait_listed(client, "remote")
        yield client


@pytest.fixture(scope="module")
async def hs(system: System, api: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.hypersdk_url, headers=system.auth(), timeout=60
    ) as client:
        yield client


@pytest.fixture(scope="module")
async def vm(conn: Connection, vm_dir: Path) -> AsyncIterator[SmallVm]:
    """A running VM with one 64 MiB qcow2 disk, 40 MiB of it written."""
    made = await create_vm(conn, VM, vm_dir, [64 * MiB], start=False)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 40M", str(made.disks[0])],
        check=True,
        capture_output=True,
    )
    await conn.call((await conn.lookup(VM)).create, timeout=60)
    try:
        yield made
    finally:
        for name in (VM, MOVED, CANCELED, FAILED, ORPHANED, OTHER, TWIN, STOPPED):
            await remove_vm(conn, name)


def submission(target_vm: str, target_dir: Path, via: Any = "fs", **options: Any) -> dict[str, Any]:
    return {
        "vm_path": f"local/{VM}",
        "source": {"type": "libvirt", "server_id": "local"},
        "destination": {"type": "kvm", "server_id": "remote", "via_destination_id": via},
        "options": {
            "vm_name": target_vm,
            "target_directory": str(target_dir),
            "shutdown_timeout_seconds": 1,
            **options,
        },
    }


async def follow(hs: httpx.AsyncClient, job_id: str) -> tuple[dict[str, Any], list[str]]:
    """Poll the job until it ends; its final view and the stages seen on the way."""
    deadline = time.monotonic() + 180
    stages: list[str] = []
    while True:
        job = (await hs.get(f"/jobs/{job_id}")).json()
        stage = job["progress"]["stage"]
        if not stages or stages[-1] != stage:
            stages.append(stage)
        if job["status"] in {"completed", "failed", "cancelled"}:
            return job, stages
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.1)


async def power(conn: Connection, name: str) -> str:
    return str((await get_domain(conn, name)).power_state)


async def start(conn: Connection, name: str) -> None:
    if await power(conn, name) != "running":
        await conn.call((await conn.lookup(name)).create, timeout=60)


async def points(api: httpx.AsyncClient) -> list[str]:
    resp = await api.get("/api/v1/restore-points", params={"destinationId": "fs", "vmName": VM})
    assert resp.status_code == 200, resp.text
    return [p["timestamp"] for p in resp.json()]


def target_files(target_dir: Path, name: str) -> list[str]:
    return [p.name for p in target_dir.iterdir() if name in p.name]


async def test_bad_input_creates_nothing(
    hs: httpx.AsyncClient, api: httpx.AsyncClient, vm: SmallVm, target_dir: Path
) -> None:
    before = (await hs.post("/jobs/query", json={"all": True})).json()["total"]

    async def refused(body: dict[str, Any], status: int, needle: str) -> None:
        resp = await hs.post("/jobs/submit", json=body)
        assert resp.status_code == status, resp.text
        assert needle in resp.json()["error"], resp.text

    field = "destination.via_destination_id"
    await refused(submission(MOVED, target_dir, via="ghost"), 404, field)
    await refused(submission(MOVED, target_dir, via=7), 400, field)
    await refused(submission(MOVED, target_dir, via="off"), 400, "disabled")
    await refused(submission(MOVED, target_dir, via="broken"), 400, field)
    # The direct migration's refusals hold too.
    await refused(submission(MOVED, target_dir, max_passes=0), 400, "options.max_passes")
    await refused(submission(MOVED, target_dir, remove_source=True), 400, "options.remove_source")
    unknown_net = {"default": f"vbt-no-such-net-{PID}"}
    body = submission(MOVED, target_dir, network_mapping=unknown_net)
    await refused(body, 400, "options.network_mapping.default")
    native = {"serverId": "local", "vmName": VM, "targetServerId": "remote",
              "targetVmName": MOVED, "targetDirectory": str(target_dir),
              "viaDestinationId": "ghost"}  # fmt: skip
    resp = await api.post("/api/v1/migrations", json=native)
    assert resp.status_code == 404 and field in resp.text, resp.text
    assert (await hs.post("/jobs/query", json={"all": True})).json()["total"] == before
    assert await points(api) == []
    assert target_files(target_dir, MOVED) == []


async def test_going_through_a_destination_takes_backup_run(
    system: System, api: httpx.AsyncClient, hs: httpx.AsyncClient, vm: SmallVm, target_dir: Path
) -> None:
    """An API token with what a direct migration takes (``restore:run``,
    ``vms:control``) but not ``backup:run`` may not migrate through a destination."""
    name, password = f"vbt-mover-{PID}", "Correct-Horse-Battery-9"
    resp = await api.post(
        "/api/v1/admin/sys/users",
        json={"username": name, "password": password, "roles": ["admin"], "nickname": "Mover"},
    )
    assert resp.status_code == 201, resp.text
    user_id = resp.json()["id"]
    async with httpx.AsyncClient(base_url=system.url, verify=False, timeout=30) as client:
        resp = await client.post(
            "/api/v1/admin/auth/login",
            json={"username": name, "password": password, "captcha_id": "", "captcha_code": ""},
        )
        assert resp.status_code == 200, resp.text
        session = {"Authorization": f"Bearer {resp.json()['access_token']}"}
        resp = await client.post(
            f"/api/v1/admin/sys/users/{user_id}/tokens",
            json={"name": "mover", "permissions": ["restore:run", "vms:control"]},
            headers=session,
        )
        assert resp.status_code == 201, resp.text
        scoped = {"Authorization": f"Bearer {resp.json()['token']}"}
        body = {"serverId": "local", "vmName": VM, "targetServerId": "remote",
                "targetVmName": VM, "targetDirectory": str(target_dir)}  # fmt: skip
        via = await client.post("/api/v1/migrations", json={**body, "viaDestinationId": "fs"},
                                headers=scoped)  # fmt: skip
        assert via.status_code == 403 and "backup:run" in via.text, via.text
        # The direct one is let through (and refused for its target name: 409).
        direct = await client.post("/api/v1/migrations", json=body, headers=scoped)
        assert direct.status_code == 409, direct.text
    resp = await hs.post("/jobs/submit", json=submission(MOVED, target_dir), headers=scoped)
    assert resp.status_code == 403 and "backup:run" in resp.text, resp.text


async def test_migrate_through_a_destination_while_it_writes(
    hs: httpx.AsyncClient,
    api: httpx.AsyncClient,
    vm: SmallVm,
    conn: Connection,
    target_dir: Path,
) -> None:
    writes = {"n": 0}

    async def writer() -> None:
        # The guest keeps writing until the source is stopped at the cut-over.
        offset = 0
        while True:
            try:
                await guest_write(conn, VM, "vda", offset, MiB, pattern=0x11 + writes["n"] % 200)
            except Exception:
                return
            writes["n"] += 1
            offset = (offset + 3 * MiB) % (60 * MiB)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(writer())
    try:
        resp = await hs.post("/jobs/submit", json=submission(MOVED, target_dir))
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["job_id"]
        job, stages = await follow(hs, job_id)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert job["status"] == "completed", job
    assert job["definition"]["destination"] == {
        "type": "kvm", "server_id": "remote", "via_destination_id": "fs",
    }  # fmt: skip
    for stage in ("copying", "syncing", "completed"):
        assert stage in stages, stages
    assert writes["n"] > 0
    assert await power(conn, VM) == "shutoff"
    assert await power(conn, MOVED) == "running"
    result = (await api.get(f"/jobs/{job_id}")).json()["result"]
    print("migration via fs:", result, flush=True)
    passes = result["passes"]
    assert len(passes) >= 3 and passes[-1]["offline"] is True  # full, sync(s), offline
    assert passes[0]["kind"] == "full" and passes[1]["kind"] == "incremental", passes
    assert result["downtimeSeconds"] > 0, result
    # The progress of a completed migration: every byte its backups read, of as many.
    copied = result["bytesCopied"]
    assert copied == sum(p["bytes"] for p in passes) > 0, result
    assert job["progress"]["percent_complete"] == 100, job
    assert (job["progress"]["current_bytes"], job["progress"]["total_bytes"]) == (copied, copied)
    record = (await api.get(f"/jobs/{job_id}")).json()
    assert (record["bytesTransferred"], record["totalBytes"]) == (copied, copied), record
    # Each pass is a backup job of its own, and each point stays an ordinary one.
    made = [p["timestamp"] for p in passes]
    assert result["points"] == made
    assert sorted(await points(api)) == sorted(made)
    for p in passes:
        backup = (await api.get(f"/jobs/{p['jobId']}")).json()
        assert backup["type"] == "backup" and backup["state"] == "success", backup
    # Retention is left to the VM's next backup: the migration holds the VM's folder.
    listed = (await hs.post("/jobs/query", json={"all": True})).json()["jobs"]
    assert not [j for j in listed if j["definition"]["type"] == "prune"], listed
    restore = (await api.get(f"/jobs/{result['restoreJobId']}")).json()
    assert restore["type"] == "restore" and restore["state"] == "success", restore
    moved = target_dir / f"{MOVED}-vda.qcow2"
    assert moved.exists(), list(target_dir.iterdir())
    compared = subprocess.run(
        ["qemu-img", "compare", "-U", str(vm.disks[0]), str(moved)],
        capture_output=True,
        text=True,
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert moved.stat().st_blocks * 512 < 64 * MiB  # thin


async def test_cancel_while_syncing_leaves_the_source_running(
    hs: httpx.AsyncClient, api: httpx.AsyncClient, vm: SmallVm, conn: Connection, target_dir: Path
) -> None:
    await start(conn, VM)
    before = await points(api)
    resp = await hs.post("/jobs/submit", json=submission(CANCELED, target_dir))
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["job_id"]
    deadline = time.monotonic() + 60
    while (await hs.get(f"/jobs/{job_id}")).json()["progress"]["stage"] != "syncing":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    cancel = await hs.post("/jobs/cancel", json={"job_ids": [job_id]})
    assert cancel.status_code == 200, cancel.text
    job, _ = await follow(hs, job_id)
    assert job["status"] == "cancelled", job
    assert "stay in destination fs" in job["message"], job
    assert await power(conn, VM) == "running"
    after = await points(api)
    assert len(after) == len(before) + 1  # the first pass's point, kept
    with pytest.raises(NotFound):
        await get_domain(conn, CANCELED)
    assert target_files(target_dir, CANCELED) == []


async def test_two_migrations_cannot_go_to_one_target_name(
    hs: httpx.AsyncClient, vm: SmallVm, conn: Connection, target_dir: Path
) -> None:
    """Through a destination, the target's name was held only by the restore at the
    cut-over: a second migration to it got 201 and failed after its downtime. It is
    held from the submit to the end, as a direct migration's is (that one's restore
    runs under it: the migration above completed)."""
    await start(conn, VM)
    await create_vm(conn, OTHER, vm.directory, [MiB])
    try:
        first = await hs.post("/jobs/submit", json=submission(TWIN, target_dir))
        assert first.status_code == 201, first.text
        first_id = first.json()["job_id"]
        other = {**submission(TWIN, target_dir), "vm_path": f"local/{OTHER}"}
        second = await hs.post("/jobs/submit", json=other)
        assert second.status_code == 409, second.text
        error = second.json()["error"]
        assert error.startswith(f"options.vm_name: vm {TWIN} on server remote"), error
        assert first_id in error, error
        # A direct migration to that name is refused as well.
        direct = {**other, "destination": {"type": "kvm", "server_id": "remote"}}
        refused = await hs.post("/jobs/submit", json=direct)
        assert refused.status_code == 409 and first_id in refused.text, refused.text
        await hs.post("/jobs/cancel", json={"job_ids": [first_id]})
        job, _ = await follow(hs, first_id)
        assert job["status"] == "cancelled", job
        # Released with the job's end: the name can be migrated to again.
        again = await hs.post("/jobs/submit", json=other)
        assert again.status_code == 201, again.text
        await hs.post("/jobs/cancel", json={"job_ids": [again.json()["job_id"]]})
        job, _ = await follow(hs, again.json()["job_id"])
        assert job["status"] == "cancelled", job
    finally:
        await remove_vm(conn, OTHER)
    assert await power(conn, VM) == "running"
    with pytest.raises(NotFound):
        await get_domain(conn, TWIN)
    assert target_files(target_dir, TWIN) == []


async def test_a_failure_at_cutover_starts_the_source_again(
    hs: httpx.AsyncClient, vm: SmallVm, conn: Connection, target_dir: Path
) -> None:
    await start(conn, VM)
    body = submission(FAILED, target_dir, debug_fault="cutover", max_passes=1)
    resp = await hs.post("/jobs/submit", json=body)
    assert resp.status_code == 201, resp.text
    job, stages = await follow(hs, resp.json()["job_id"])
    assert job["status"] == "failed", job
    assert "cutover" in stages, stages
    assert "started again" in job["error"], job
    assert await power(conn, VM) == "running"
    with pytest.raises(NotFound):
        await get_domain(conn, FAILED)
    assert target_files(target_dir, FAILED) == []


async def test_a_migration_whose_orchestrator_stopped_is_undone(
    hs: httpx.AsyncClient, system: System, vm: SmallVm, conn: Connection, target_dir: Path
) -> None:
    """The orchestrator stops while the job syncs; the one started again ends it and its
    backup job from their records: the source running, the target clean."""
    await start(conn, VM)
    resp = await hs.post("/jobs/submit", json=submission(ORPHANED, target_dir))
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["job_id"]
    deadline = time.monotonic() + 60
    while (await hs.get(f"/jobs/{job_id}")).json()["progress"]["stage"] != "syncing":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    system.stop("job-orchestrator")  # SIGTERM: it gives up the jobs' leases
    system.start("job-orchestrator")
    deadline = time.monotonic() + 90
    while True:
        resp = await hs.get(f"/jobs/{job_id}")
        if resp.status_code == 200 and resp.json()["status"] in {"failed", "cancelled"}:
            job = resp.json()
            break
        assert time.monotonic() < deadline, resp.text
        await asyncio.sleep(0.3)
    assert job["status"] == "failed" and "stopped while" in job["error"], job
    assert "stay in destination fs" in job["error"], job
    listed = (await hs.post("/jobs/query", json={"all": True})).json()["jobs"]
    assert not [j for j in listed if j["status"] in {"pending", "running"}], listed
    assert await power(conn, VM) == "running"
    with pytest.raises(NotFound):
        await get_domain(conn, ORPHANED)
    assert target_files(target_dir, ORPHANED) == []


def restore_exports_of(job_id: str) -> list[str]:
    """What restore job ``job_id`` has on this host (the target's): its ``qemu-nbd``
    processes, its export directories and its temporary images."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if (
                proc.name.isdigit()
                and f".vbrestore-{job_id}".encode() in (proc / "cmdline").read_bytes()
            ):
                found.append(f"qemu-nbd {proc.name}")
    for private in Path("/tmp").glob("vbrestore.*"):
        with contextlib.suppress(OSError):
            if job_id in (private / "owner").read_text():
                found.append(str(private))
    return found


async def wait_ended(hs: httpx.AsyncClient, job_id: str, timeout: float = 90) -> dict[str, Any]:
    """The job's view once it has failed or been cancelled (the gateway may be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            resp = await hs.get(f"/jobs/{job_id}")
            if resp.status_code == 200 and resp.json()["status"] in {"failed", "cancelled"}:
                return dict(resp.json())
        assert time.monotonic() < deadline, f"job {job_id} did not end"
        await asyncio.sleep(0.3)


async def test_restore_exports_of_a_stopped_system_are_stopped_when_it_starts(
    hs: httpx.AsyncClient,
    api: httpx.AsyncClient,
    system: System,
    vm: SmallVm,
    conn: Connection,
    target_dir: Path,
) -> None:
    """The whole system stops while the migration's restore writes the target (its
    qemu-nbd exports up), and starts again with the inventory last: the orchestrator
    ends the jobs but cannot reach the inventory to stop the exports. The inventory,
    once it connects to the target, stops them and removes their images: nothing of
    that restore is left."""
    await start(conn, VM)
    resp = await hs.post("/jobs/submit", json=submission(STOPPED, target_dir, max_passes=1))
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["job_id"]
    deadline = time.monotonic() + 90
    restore_id = ""
    while True:  # until the restore's exports are up (it then waits: PREPARED_HOLD)
        result = (await api.get(f"/jobs/{job_id}")).json()["result"]
        restore_id = result.get("restoreJobId") or ""
        if restore_id and (await api.get(f"/jobs/{restore_id}")).json()["params"].get("prepared"):
            break
        assert time.monotonic() < deadline, result
        await asyncio.sleep(0.1)
    assert restore_exports_of(restore_id), "the restore's exports are not up"
    assert target_files(target_dir, f".vbrestore-{restore_id}")
    system.stop_all()
    # The orchestrator ends the jobs (the gateway shows them) while no inventory runs;
    # not wait_ready: the gateway's health waits for every service's answer.
    system.start("job-orchestrator")
    system.start("gateway")
    try:
        restore = await wait_ended(hs, restore_id)
        assert restore["status"] == "failed", restore
        migration = await wait_ended(hs, job_id)
        assert migration["status"] == "failed", migration
        assert restore_exports_of(restore_id), "ended by the orchestrator after all"
    finally:
        for name in [*MODULES, "transfer-worker-2"]:
            if name not in system.procs:
                system.start(name)
        system.wait_ready()
    deadline = time.monotonic() + 90
    while restore_exports_of(restore_id) or target_files(target_dir, STOPPED):
        assert time.monotonic() < deadline, (
            restore_exports_of(restore_id), target_files(target_dir, STOPPED)
        )  # fmt: skip
        await asyncio.sleep(0.5)
    with pytest.raises(NotFound):
        await get_domain(conn, STOPPED)
    # The inventory was not there to start the source again: the message says so.
    assert f"the source vm {VM} could NOT be started again" in migration["error"], migration
    await start(conn, VM)
