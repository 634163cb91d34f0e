"""Simulated servers (``uri`` ``test:///<file>.xml``, libvirt's test driver in the
inventory's process): their VMs are listed and can be stopped and started, and anything
that needs QEMU or a disk is refused with a message saying why."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from harness import System, api_client, wait_job

VM = f"simvm-{os.getpid()}"


def driver_xml(path: Path, names: list[str]) -> None:
    domains = "".join(
        f'<domain type="test"><name>{name}</name><memory unit="MiB">64</memory>'
        '<vcpu>1</vcpu><os><type arch="x86_64">hvm</type></os><devices>'
        f'<disk type="file" device="disk"><source file="/sim/{name}.qcow2"/>'
        '<target dev="vda" bus="virtio"/></disk></devices></domain>'
        for name in names
    )
    path.write_text(f"<node>{domains}</node>")


@pytest.fixture(scope="module")
async def api(
    system: System, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    work = tmp_path_factory.mktemp("simsrv")
    (work / "repo").mkdir()
    driver_xml(work / "sim.xml", [VM, f"{VM}-b"])
    config = {
        "servers": [{"id": "sim", "name": "Simulated", "uri": f"test://{work / 'sim.xml'}"}],
        "destinations": [
            {"id": "fs", "driverId": "filesystem", "params": {"path": str(work / "repo")}}
        ],
        "backupDestinationId": "fs",
    }
    async with api_client(system, config) as client:
        yield client


async def test_a_simulated_server_lists_its_vms_and_their_disks(api: httpx.AsyncClient) -> None:
    resp = await api.get("/servers/sim/vms")
    assert resp.status_code == 200, resp.text
    assert sorted(v["vm"]["name"] for v in resp.json()) == sorted([VM, f"{VM}-b"])


async def test_a_simulated_vm_has_cpus_memory_and_disk_sizes(system: System) -> None:
    """The HyperSDK list reads each VM's info: the disk sizes are the test driver's own
    (its disks have no file: no ``qemu-img`` runs for a simulated server)."""
    async with httpx.AsyncClient(
        base_url=system.hypersdk_url, headers=system.auth(), timeout=30
    ) as hyper:
        resp = await hyper.get("/vms/list", params={"server_id": "sim"})
    assert resp.status_code == 200, resp.text
    vm = {v["name"]: v for v in resp.json()["vms"]}[VM]
    assert (vm["num_cpu"], vm["memory_mb"]) == (1, 64)
    assert vm["storage"] > 0


async def test_a_simulated_vm_stops_and_starts(api: httpx.AsyncClient) -> None:
    for action, state in (("forceOff", "shutoff"), ("start", "running")):
        resp = await api.post("/servers/sim/actions", json={"vmName": VM, "action": action})
        assert resp.status_code == 200, resp.text
        resp = await api.get("/servers/sim/vms")
        assert {v["vm"]["name"]: v["vm"]["powerState"] for v in resp.json()}[VM] == state


async def test_a_backup_of_a_simulated_vm_fails_saying_why(api: httpx.AsyncClient) -> None:
    resp = await api.post("/servers/sim/backup", json={"vmName": VM, "destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"], timeout=60)
    assert job["state"] == "failure", job
    assert "server sim is simulated" in job["message"] and "no QEMU" in job["message"], job


async def test_a_simulated_server_with_a_host_is_refused(api: httpx.AsyncClient) -> None:
    resp = await api.get("/config")
    config = resp.json()
    config["servers"][0]["host"] = "kvm1"
    resp = await api.post("/config", json=config)
    assert resp.status_code == 400, resp.text
    assert "servers[0].host" in resp.text and "simulated server" in resp.text
