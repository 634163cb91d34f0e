"""Domains against the real libvirtd: list, XML, disks, actions, errors, events, CD-ROM."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from virtbackup.testing.images import create_image
from virtbackup.testing.vms import MiB, SmallVm, build_vm_xml, create_vm, remove_vm, wait_for_event
from virtbackup.virt import (
    Conflict,
    Connection,
    ConnectionLost,
    DomainAction,
    LifecycleEvent,
    LifecycleKind,
    NotFound,
    PowerState,
    Unreachable,
    VirtTimeout,
    WatchEvent,
    define_domain,
    domain_xml,
    eject_cdrom,
    get_domain,
    list_disks,
    list_domains,
    open_connection,
    perform_action,
    subscribe_lifecycle,
    undefine_domain,
)

pytestmark = pytest.mark.libvirt


@pytest.fixture(scope="module")
async def vm(
    conn: Connection, vm_dir: Path, vm_name: Callable[[str], str]
) -> AsyncIterator[SmallVm]:
    small = await create_vm(conn, vm_name("domains"), vm_dir, [16 * MiB, 8 * MiB], with_cdrom=True)
    try:
        yield small
    finally:
        await remove_vm(conn, small.name)


@pytest.fixture
async def events(conn: Connection) -> AsyncIterator[asyncio.Queue[WatchEvent]]:
    queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
    sub = await subscribe_lifecycle(conn, queue)
    try:
        yield queue
    finally:
        await sub.cancel()


def lifecycle(name: str, kind: LifecycleKind) -> Callable[[WatchEvent], bool]:
    return lambda e: isinstance(e, LifecycleEvent) and e.domain == name and e.event is kind


async def test_list_shows_running_vm_with_uuid_and_id(conn: Connection, vm: SmallVm) -> None:
    listed = {d.name: d for d in await list_domains(conn)}
    info = listed[vm.name]
    assert info.power_state is PowerState.RUNNING
    assert info.power_state == "running"
    assert info.id is not None
    assert info.id > 0
    assert len(info.uuid) == 36
    assert await get_domain(conn, vm.name) == info


async def test_disks_skip_cdrom_and_report_capacity(conn: Connection, vm: SmallVm) -> None:
    disks = await list_disks(conn, vm.name)
    assert [(d.target, d.format, d.capacity) for d in disks] == [
        ("vda", "qcow2", 16 * MiB),
        ("vdb", "qcow2", 8 * MiB),
    ]
    assert [d.source for d in disks] == [str(p) for p in vm.disks]
    assert [d.alias for d in disks] == ["virtio-disk0", "virtio-disk1"]
    xml = await domain_xml(conn, vm.name)
    assert "<target dev='sda' bus='sata'/>" in xml


async def test_unknown_domain_is_not_found(conn: Connection) -> None:
    with pytest.raises(NotFound, match="no-such-vm"):
        await get_domain(conn, "no-such-vm")
    with pytest.raises(NotFound):
        await perform_action(conn, "no-such-vm", "start")


async def test_starting_a_running_vm_is_a_conflict_with_libvirts_reason(
    conn: Connection, vm: SmallVm
) -> None:
    with pytest.raises(Conflict) as info:
        await perform_action(conn, vm.name, DomainAction.START)
    assert "already running" in str(info.value)
    assert info.value.libvirt_message is not None
    assert "already running" in info.value.libvirt_message


async def test_unknown_action_is_rejected(conn: Connection, vm: SmallVm) -> None:
    with pytest.raises(ValueError, match="explode"):
        await perform_action(conn, vm.name, "explode")


async def test_every_action_and_the_state_it_leads_to(
    conn: Connection,
    vm: SmallVm,
    events: asyncio.Queue[WatchEvent],
) -> None:
    # forceOff: immediate power-off, with a stopped/destroyed event within a second.
    started = time.time()
    after = await perform_action(conn, vm.name, "forceOff")
    assert after.power_state is PowerState.SHUTOFF
    assert after.id is None
    stopped = await wait_for_event(events, lifecycle(vm.name, LifecycleKind.STOPPED), 1.0)
    assert isinstance(stopped, LifecycleEvent)
    assert stopped.detail == "destroyed"
    assert stopped.timestamp - started < 5

    # Actions that need a running domain are conflicts on a stopped one.
    for action in ("forceOff", "reboot", "shutdown", "forceReset"):
        with pytest.raises(Conflict, match="not running"):
            await perform_action(conn, vm.name, action)

    # start: running, with a started/booted event within a second.
    after = await perform_action(conn, vm.name, "start")
    assert after.power_state is PowerState.RUNNING
    booted = await wait_for_event(events, lifecycle(vm.name, LifecycleKind.STARTED), 1.0)
    assert isinstance(booted, LifecycleEvent)
    assert booted.detail == "booted"

    # forceReset: a hardware reset keeps the domain running (same id).
    before_id = after.id
    after = await perform_action(conn, vm.name, "forceReset")
    assert after.power_state is PowerState.RUNNING
    assert after.id == before_id

    # reboot and shutdown are ACPI requests; a guest without an OS ignores them, so the
    # domain is still running afterwards (with an OS it would reboot / power off).
    after = await perform_action(conn, vm.name, "reboot")
    assert after.power_state is PowerState.RUNNING
    after = await perform_action(conn, vm.name, "shutdown")
    assert after.power_state is PowerState.RUNNING
    await asyncio.sleep(1.5)
    info = await get_domain(conn, vm.name)
    assert info.power_state is PowerState.RUNNING
    assert info.id == before_id


async def test_eject_cdrom_removes_the_medium_live_and_persistently(
    conn: Connection, vm: SmallVm
) -> None:
    assert vm.cdrom is not None
    assert str(vm.cdrom) in await domain_xml(conn, vm.name)
    assert await eject_cdrom(conn, vm.name) == ["sda"]
    assert str(vm.cdrom) not in await domain_xml(conn, vm.name)
    assert str(vm.cdrom) not in await domain_xml(conn, vm.name, inactive=True)
    assert await eject_cdrom(conn, vm.name) == []
    with pytest.raises(NotFound):
        await eject_cdrom(conn, vm.name, "sdz")
    # The disks are untouched.
    assert [d.target for d in await list_disks(conn, vm.name)] == ["vda", "vdb"]


async def test_define_and_undefine_with_events(
    conn: Connection,
    vm_dir: Path,
    vm_name: Callable[[str], str],
    events: asyncio.Queue[WatchEvent],
) -> None:
    name = vm_name("defined")
    image = create_image(vm_dir / f"{name}.qcow2", 4 * MiB)
    xml = build_vm_xml(name, [image])
    try:
        info = await define_domain(conn, xml)
        assert info.name == name
        assert info.power_state is PowerState.SHUTOFF
        assert info.id is None
        defined = await wait_for_event(events, lifecycle(name, LifecycleKind.DEFINED), 1.0)
        assert isinstance(defined, LifecycleEvent)
        assert defined.detail == "added"
        assert defined.uuid == info.uuid
        # Same name, no uuid in the XML: a different domain with a taken name.
        with pytest.raises(Conflict, match="already exists"):
            await define_domain(conn, xml)
        await undefine_domain(conn, name)
        gone = await wait_for_event(events, lifecycle(name, LifecycleKind.UNDEFINED), 1.0)
        assert isinstance(gone, LifecycleEvent)
        with pytest.raises(NotFound):
            await get_domain(conn, name)
    finally:
        await remove_vm(conn, name)


async def test_unreachable_socket_raises_unreachable(libvirtd: None, tmp_path: Path) -> None:
    with pytest.raises(Unreachable):
        await open_connection(f"qemu+unix:///system?socket={tmp_path}/none", open_timeout=10)


async def test_calls_are_bounded_by_their_timeout(conn: Connection) -> None:
    started = time.monotonic()
    with pytest.raises(VirtTimeout):
        await conn.call(time.sleep, 2, timeout=0.2)
    assert time.monotonic() - started < 1.5
    assert await conn.is_alive()


async def test_close_reports_no_connection_lost_to_subscribers(libvirtd: None) -> None:
    """Our own close() is not a loss: the close callback is unregistered first."""
    own = await open_connection()
    queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
    await subscribe_lifecycle(own, queue)
    await own.close()
    await asyncio.sleep(0.3)
    assert not any(isinstance(queue.get_nowait(), ConnectionLost) for _ in range(queue.qsize()))
    with pytest.raises(Exception, match="closed"):
        await list_domains(own)
