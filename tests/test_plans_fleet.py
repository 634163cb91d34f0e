"""Plans at fleet scale (issue 20): a project naming a few hundred simulated servers
(libvirt's ``test:///`` driver in the inventory, no QEMU) is imported and previewed within
bounded time, and a preview larger than one bus message is read a page at a time by the
gateway instead of failing (503) on NATS's payload limit."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest
from harness import System, api_client

from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.common import Reply
from virtbackup.contracts.v1.inventory import DISKS_MANY_MAX, VmsDisks, VmsDisksRequest
from virtbackup.testing.nats import connect

SERVERS = 300
VMS = 10
PID = os.getpid()
#: NATS's default ``max_payload`` (the test server's): one bus message.
BUS_MESSAGE = 1024 * 1024


def server_id(n: int) -> str:
    return f"fl{PID}-{n:04d}"


def vm_name(n: int, i: int) -> str:
    return f"fleet-vm-{PID}-{n:04d}-{i:02d}"


def driver_xml(path: Path, names: list[str]) -> None:
    """A test-driver node with ``names``, each VM with two disks (so that a preview of
    every VM is well over one bus message)."""
    disks = "".join(
        f'<disk type="file" device="disk"><source file="/sim/{{name}}-{dev}.qcow2"/>'
        f'<target dev="{dev}" bus="virtio"/></disk>'
        for dev in ("vda", "vdb")
    )
    domains = "".join(
        f'<domain type="test"><name>{name}</name><memory unit="MiB">64</memory>'
        '<vcpu>1</vcpu><os><type arch="x86_64">hvm</type></os><devices>'
        f"{disks.format(name=name)}</devices></domain>"
        for name in names
    )
    path.write_text(f"<node>{domains}</node>")


def project_yaml(project_id: str) -> str:
    selectors = "\n".join(
        f'      - {{server: {server_id(n)}, vm: "fleet-vm-*"}}' for n in range(SERVERS)
    )
    return (
        f"id: {project_id}\nname: Fleet\npipelines:\n  - id: all\n    vms:\n{selectors}\n"
        '    destination: fs\n    schedule: {cron: "0 1 * * *", timezone: UTC, enabled: false}\n'
        "    options: {cacheMaxAgeSeconds: 3600}\n"
    )


@pytest.fixture(scope="module")
async def api(
    system: System, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    work = tmp_path_factory.mktemp("planfleet")
    (work / "repo").mkdir(mode=0o700)
    servers = []
    for n in range(SERVERS):
        xml = work / f"sim-{n:04d}.xml"
        driver_xml(xml, [vm_name(n, i) for i in range(VMS)])
        servers.append({"id": server_id(n), "name": f"Sim {n}", "uri": f"test://{xml}"})
    config = {
        "servers": servers,
        "destinations": [
            {"id": "fs", "driverId": "filesystem", "params": {"path": str(work / "repo")}}
        ],
        "backupDestinationId": "fs",
    }
    async with api_client(system, config, timeout=90) as client:
        gate = asyncio.Semaphore(16)
        deadline = time.monotonic() + 60

        async def listed(n: int) -> None:
            async with gate:
                while True:
                    resp = await client.get(f"/servers/{server_id(n)}/vms")
                    if resp.status_code == 200 and len(resp.json()) == VMS:
                        return
                    assert time.monotonic() < deadline, f"{server_id(n)} never listed"
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(listed(n) for n in range(SERVERS)))
        yield client
        await client.delete(f"/api/v1/projects/fleet{PID}")
        resp = await client.post("/config", json={**config, "servers": servers[:1]})
        assert resp.status_code == 200, resp.text


async def test_a_project_of_hundreds_of_servers_is_imported_and_previewed(
    api: httpx.AsyncClient,
) -> None:
    started = time.monotonic()
    resp = await api.post("/api/v1/projects/import", json={"yaml": project_yaml(f"fleet{PID}")})
    took = time.monotonic() - started
    assert resp.status_code == 201, resp.text[:500]
    assert len(resp.json()["schedule_ids"]) == SERVERS
    assert took < 30, f"the import of {SERVERS} servers took {took:.1f} s"

    preview = f"/api/v1/pipelines/fleet{PID}.all/dry-run-preview"
    for body in ({"execution_mode": "offline_cached"}, {}):
        started = time.monotonic()
        resp = await api.post(preview, json=body)
        took = time.monotonic() - started
        assert resp.status_code == 200, resp.text[:500]
        vms = resp.json()["vms"]
        assert len(vms) == SERVERS * VMS, body
        names = {(v["server_id"], v["vm_name"]) for v in vms}
        assert names == {(server_id(n), vm_name(n, i)) for n in range(SERVERS) for i in range(VMS)}
        assert [(v["server_id"], v["vm_name"]) for v in vms] == sorted(names)
        assert took < 30, f"the preview {body} of {SERVERS * VMS} VMs took {took:.1f} s"

    # The online preview (each VM's two disks, full: no point yet) is larger than one bus
    # message: it was read page by page, not refused by NATS's payload limit.
    assert len(resp.content) > BUS_MESSAGE, len(resp.content)
    assert all(v["mode"] == "full" and len(v["disks"]) == 2 for v in vms)
    assert resp.json()["estimated_bytes"] == sum(v["estimated_bytes"] for v in vms)


async def test_a_preview_narrowed_to_some_vms_and_its_dry_run(api: httpx.AsyncClient) -> None:
    """``vms`` narrows the preview (and a VM the plan does not have is a 400 naming
    ``$.vms[i]``); a dry-run run-selection answers the paged preview too, and the
    source refs are read page by page as well."""
    wanted = [f"{server_id(7)}/{vm_name(7, 3)}", f"{server_id(250)}/{vm_name(250, 0)}"]
    resp = await api.post(
        f"/api/v1/pipelines/fleet{PID}.all/dry-run-preview",
        json={"vms": wanted, "execution_mode": "offline_cached"},
    )
    assert resp.status_code == 200, resp.text[:500]
    assert [f"{v['server_id']}/{v['vm_name']}" for v in resp.json()["vms"]] == wanted

    resp = await api.post(
        f"/api/v1/pipelines/fleet{PID}.all/dry-run-preview",
        json={"vms": [wanted[0], f"{server_id(7)}/nope"]},
    )
    assert resp.status_code == 400, resp.text[:500]
    assert "$.vms[1]" in resp.text

    resp = await api.post(
        f"/api/v1/pipelines/fleet{PID}.all/run-selection",
        json={"dry_run": True, "execution_mode": "offline_cached"},
    )
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["dry_run"] is True and resp.json()["run_id"] is None
    assert len(resp.json()["preview"]["vms"]) == SERVERS * VMS

    resp = await api.get(
        f"/api/v1/pipelines/fleet{PID}.all/source-refs",
        params={"execution_mode": "offline_cached"},
    )
    assert resp.status_code == 200, resp.text[:500]
    refs = resp.json()["vms"]
    assert len(refs) == SERVERS * VMS and all(r["points"] == [] for r in refs)


async def test_disks_many_answers_each_vm_or_its_fault(
    api: httpx.AsyncClient, system: System
) -> None:
    """``vb.cmd.inventory.disks-many``: each VM's disks in the order asked, a VM the
    server does not have as its own ``not_found`` fault (the others still answered), and
    a request naming more VMs than ``DISKS_MANY_MAX`` refused as bad."""
    nc = await connect(system.nats)
    try:
        ask = VmsDisksRequest(
            server_id=server_id(3), vm_names=[vm_name(3, 1), "nope", vm_name(3, 0)]
        )
        msg = await nc.request(InventoryCmd.DISKS_MANY, msgspec.json.encode(ask), timeout=30)
        reply = msgspec.json.decode(msg.data, type=Reply[VmsDisks])
        assert reply.result is not None, reply
        got = reply.result.vms
        assert [v.vm_name for v in got] == [vm_name(3, 1), "nope", vm_name(3, 0)]
        assert [d.target for d in got[0].disks] == ["vda", "vdb"] and got[0].fault is None
        assert got[1].fault is not None and got[1].fault.code == "not_found", got[1]
        too_many = {
            "serverId": server_id(3),
            "vmNames": [f"vm{i}" for i in range(DISKS_MANY_MAX + 1)],
        }
        msg = await nc.request(InventoryCmd.DISKS_MANY, msgspec.json.encode(too_many), timeout=30)
        refused = msgspec.json.decode(msg.data, type=Reply[VmsDisks])
        assert refused.error is not None and refused.error.code == "bad_request", refused
        assert "vmNames" in refused.error.message
    finally:
        await nc.drain()
