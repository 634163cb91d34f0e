"""A plan chain end to end across the parts of issue 16: a project imported from YAML
with two VMs (real libvirt/QEMU) and a chain whose backup step writes a filesystem
destination ``fs`` and an encrypted S3 destination ``s3`` (SeaweedFS) from one read of
each VM (the fan-out backup), then verifies, then copies each VM's newest S3 point to a
third destination ``fs2``.

The run reads each VM once (each backup job's bytes read are those of one read), the
verify and copy steps succeed, every step ran exactly once though two orchestrator
replicas advance the run, and the points of every destination restore bit-identical.
The tests build on each other, in order.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, running_system, same, snapshot, wait_job

from virtbackup.repository.format import DEFAULT_CHUNK_SIZE
from virtbackup.testing.seaweedfs import SeaweedServer
from virtbackup.testing.vms import SmallVm, create_vm, guest_write, remove_vm, vm_directory
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
CHUNK = DEFAULT_CHUNK_SIZE  # the repository's (the geometry below is in its chunks)
PID = os.getpid()
VM_A = f"vbt-chain-a-{PID}"
VM_B = f"vbt-chain-b-{PID}"
GLOB = f"vbt-chain-?-{PID}"
PROJECT = f"c{PID}"
CHAIN = f"{PROJECT}.both-then-copy"
STATE: dict[str, Any] = {}

YAML = f"""\
id: {PROJECT}
name: Chains end to end
pipelines:
  - id: both
    vms:
      - server: local
        vm: "{GLOB}"
    destination: fs
chains:
  - id: both-then-copy
    steps:
      - type: backup
        pipeline: both
        destinations: [fs, s3]
      - type: verify
        mode: full
      - type: copy
        destination: s3
        target: fs2
"""


@pytest.fixture(scope="module")
def second_dir() -> Iterator[Path]:
    path = vm_directory(prefix="vbtest-repo2-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def sysm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    # Two orchestrator replicas: both advance the run, compare-and-swap decides.
    with running_system(tmp_path_factory.mktemp("chains"), workers=1, orchestrators=2) as system:
        yield system


@pytest.fixture(scope="module")
async def vms(conn: Connection) -> AsyncIterator[dict[str, SmallVm]]:
    directory = vm_directory()
    made = {name: await create_vm(conn, name, directory, [64 * MiB]) for name in (VM_A, VM_B)}
    try:
        yield made
    finally:
        await remove_vm(conn, VM_A)
        await remove_vm(conn, VM_B, delete_directory=directory)


@pytest.fixture(scope="module")
async def api(
    sysm: System, repo_dir: Path, second_dir: Path, seaweed: SeaweedServer
) -> AsyncIterator[httpx.AsyncClient]:
    config = {
        "servers": [{"id": "local", "name": "This host", "host": ""}],
        "destinations": [
            {"id": "fs", "name": "fs", "driverId": "filesystem", "params": {"path": str(repo_dir)}},
            {
                "id": "s3",
                "name": "s3",
                "driverId": "s3",
                "params": seaweed.params(prefix=f"chain-{PID}"),
                "encryption": {"passphrase": "chain secret"},
            },
            {
                "id": "fs2",
                "name": "fs2",
                "driverId": "filesystem",
                "params": {"path": str(second_dir)},
            },
        ],
        "backupDestinationId": "fs",
    }
    async with httpx.AsyncClient(
        base_url=sysm.url, headers=sysm.auth(), verify=False, timeout=120
    ) as client:
        resp = await client.post("/config", json=config)
        assert resp.status_code == 200, resp.text
        yield client


async def wait_run(api: httpx.AsyncClient, run_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = await api.get(f"/api/v1/plan-runs/{run_id}")
        assert resp.status_code == 200, resp.text
        run: dict[str, Any] = resp.json()
        if run["state"] != "running":
            return run
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.3)


async def points(api: httpx.AsyncClient, dest: str, vm: str) -> list[dict[str, Any]]:
    resp = await api.get("/api/v1/restore-points", params={"destinationId": dest, "vmName": vm})
    assert resp.status_code == 200, resp.text
    return sorted(resp.json(), key=lambda p: p["timestamp"])


async def test_a_chain_backs_up_to_two_destinations_at_once_verifies_and_copies(
    api: httpx.AsyncClient,
    vms: dict[str, SmallVm],
    conn: Connection,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    resp = await api.post("/api/v1/projects/import", json={"yaml": YAML})
    assert resp.status_code == 201, resp.text
    assert [c["chain_db_id"] for c in resp.json()["chains"]] == [CHAIN]
    # Two chunks of VM A and three of VM B hold data: what one read of each reads.
    await guest_write(conn, VM_A, "vda", 0, CHUNK, pattern=0x11)
    await guest_write(conn, VM_A, "vda", 5 * CHUNK + 4096, MiB, pattern=0x12)
    await guest_write(conn, VM_B, "vda", 2 * CHUNK, 2 * CHUNK, pattern=0x21)
    await guest_write(conn, VM_B, "vda", 11 * CHUNK, 8192, pattern=0x22)
    chunks = {VM_A: 2, VM_B: 3}
    STATE["snaps"] = {
        name: snapshot(vm, tmp_path_factory.mktemp(f"snap-{name}"))[0] for name, vm in vms.items()
    }

    resp = await api.post(f"/api/v1/pipeline-chains/{CHAIN}/run", json={})
    assert resp.status_code == 200, resp.text
    run_id = resp.json()["run_id"]
    run = await wait_run(api, run_id)
    assert run["state"] == "success", run
    assert [(s["type"], s["state"]) for s in run["steps"]] == [
        ("backup", "success"),
        ("verify", "success"),
        ("copy", "success"),
    ], run
    backup, verify, copy = run["steps"]
    for step in run["steps"]:
        # One job per VM, and the verify step's per VM and destination written.
        assert len(step["job_ids"]) == (4 if step["type"] == "verify" else 2), step
        assert step["message"] == "", step

    # Every step ran exactly once, though both replicas advance the run.
    every = (await api.get("/jobs")).json()
    for kind, step in (("backup", backup), ("verify", verify), ("copy", copy)):
        assert sorted(j["id"] for j in every if j["type"] == kind) == sorted(step["job_ids"])

    # The backup step: one read of each VM, committed in both destinations.
    by_vm: dict[str, dict[str, Any]] = {}
    for job_id in backup["job_ids"]:
        job = (await api.get(f"/jobs/{job_id}")).json()
        assert job["state"] == "success", job
        assert job["params"]["planRunId"] == run_id, job["params"]
        assert job["params"]["chainDbId"] == CHAIN, job["params"]
        outcome = job["result"]["destinations"]
        assert {d: o["state"] for d, o in outcome.items()} == {
            "fs": "committed",
            "s3": "committed",
        }, outcome
        # Read once: each chunk holding data once, not once per destination.
        assert job["bytesTransferred"] == chunks[job["vmName"]] * CHUNK, job
        by_vm[job["vmName"]] = outcome
    assert set(by_vm) == {VM_A, VM_B}

    # The verify step read the new points of every destination the backup wrote.
    checked: dict[str, int] = {}
    for job_id in verify["job_ids"]:
        job = (await api.get(f"/jobs/{job_id}")).json()
        assert (job["type"], job["state"]) == ("verify", "success"), job
        assert job["result"]["pointsDamaged"] == 0, job
        dest = job["destinationId"]
        checked[dest] = checked.get(dest, 0) + job["result"]["pointsChecked"]
    assert checked == {"fs": 2, "s3": 2}, checked

    # The copy step: each VM's newest S3 point is in fs2 under the same timestamp.
    for job_id in copy["job_ids"]:
        job = (await api.get(f"/jobs/{job_id}")).json()
        assert (job["type"], job["state"], job["destinationId"]) == ("copy", "success", "s3")
    points_by: dict[str, dict[str, dict[str, Any]]] = {}
    for name in (VM_A, VM_B):
        found = {dest: await points(api, dest, name) for dest in ("fs", "s3", "fs2")}
        for dest, listed in found.items():
            assert len(listed) == 1, (name, dest, listed)
            assert listed[0]["kind"] == "full"
        assert found["fs"][0]["timestamp"] == by_vm[name]["fs"]["timestamp"]
        assert found["s3"][0]["timestamp"] == by_vm[name]["s3"]["timestamp"]
        assert found["fs2"][0]["timestamp"] == found["s3"][0]["timestamp"]
        points_by[name] = {dest: listed[0] for dest, listed in found.items()}
    STATE["points"] = points_by


async def test_the_chain_preview_names_every_destination_and_the_real_read(
    api: httpx.AsyncClient, vms: dict[str, SmallVm]
) -> None:
    # After the chain's run both destinations' newest points share a checkpoint: the
    # preview is incremental for both.
    resp = await api.post(f"/api/v1/pipeline-chains/{CHAIN}/dry-run-preview", json={})
    assert resp.status_code == 200, resp.text
    shown_vms = {v["vm_name"]: v for v in resp.json()["vms"]}
    both = shown_vms[VM_A]
    assert [(d["destination_id"], d["mode"]) for d in both["destinations"]] == [
        ("fs", "incremental"),
        ("s3", "incremental"),
    ], both
    # A backup of VM_A to fs alone: its newest point there has a checkpoint s3 lacks, so
    # the next chain run reads VM_A in full for s3, and so reads it in full.
    resp = await api.post("/servers/local/backup", json={"vmName": VM_A, "destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    assert (await wait_job(api, resp.json()["jobId"]))["state"] == "success"
    resp = await api.post(f"/api/v1/pipeline-chains/{CHAIN}/dry-run-preview", json={})
    assert resp.status_code == 200, resp.text
    vm = {v["vm_name"]: v for v in resp.json()["vms"]}[VM_A]
    dests = {d["destination_id"]: d for d in vm["destinations"]}
    assert dests["fs"]["mode"] == "incremental", vm
    assert dests["s3"]["mode"] == "full" and dests["s3"]["reason"], vm
    assert dests["s3"]["estimated_bytes"] == 64 * MiB, vm
    assert vm["estimated_bytes"] == 64 * MiB, vm


async def test_every_destination_restores_bit_identical(
    api: httpx.AsyncClient, vms: dict[str, SmallVm]
) -> None:
    assert "points" in STATE, "needs the test before"
    cases = [(VM_A, "fs"), (VM_A, "s3"), (VM_B, "fs"), (VM_B, "s3"), (VM_B, "fs2")]
    for name, dest in cases:
        point = STATE["points"][name][dest]
        off = await api.post("/servers/local/actions", json={"action": "forceOff", "vmName": name})
        assert off.status_code in {200, 409}, off.text
        resp = await api.post(
            "/servers/local/restore/start",
            json={"xmlPath": point["xmlPath"], "decision": "overwrite", "destinationId": dest},
        )
        assert resp.status_code == 200, resp.text
        done = await wait_job(api, resp.json()["jobId"])
        assert done["state"] == "success", done
        assert same(vms[name].disks[0], STATE["snaps"][name]), f"{name} from {dest} differs"
