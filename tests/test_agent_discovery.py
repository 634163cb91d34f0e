"""What ``virtbackup agent`` reports of its host's VMs (the heartbeat's
``discoveredDomains``), against the real libvirtd.

A busy host defines and undefines VMs all the time: one undefined between the listing
and the reading of its disks must be left out, not make the whole listing fail (the
#17 trial saw its agent's heartbeats report no VM at all whenever another VM of the
host went away, so its own VMs were "not on this agent's host").
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from virtbackup.cli.agent import process
from virtbackup.testing.vms import create_vm, remove_vm, vm_directory
from virtbackup.virt import Connection, list_domains
from virtbackup.virt.domains import DomainInfo, PowerState

PID = os.getpid()
VM = f"vbtest-discovery-{PID}"
GONE = f"vbtest-discovery-gone-{PID}"
MiB = 1 << 20


@pytest.fixture
async def vm(conn: Connection) -> AsyncIterator[str]:
    directory = vm_directory()
    await create_vm(conn, VM, directory, [MiB], start=False)
    try:
        yield VM
    finally:
        await remove_vm(conn, VM, delete_directory=directory)


async def test_a_vm_undefined_while_listing_is_left_out(
    vm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def listing_then_one_goes(conn: Connection) -> list[DomainInfo]:
        # The listing named a VM that is undefined before its disks are read.
        gone = DomainInfo(name=GONE, uuid="", id=None, power_state=PowerState.SHUTOFF)
        return [*await list_domains(conn), gone]

    monkeypatch.setattr(process, "list_domains", listing_then_one_goes)
    found: list[dict[str, Any]] = await process.discovered("qemu:///system")
    names = {d["name"] for d in found}
    assert vm in names and GONE not in names, names
    mine = next(d for d in found if d["name"] == vm)
    assert mine["state"] == "shutoff" and [d["target"] for d in mine["disks"]] == ["vda"]
