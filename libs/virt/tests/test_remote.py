"""The remote paths, through an OpenSSH server on loopback that reaches this libvirtd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncssh
import pytest

from virtbackup.runtime.ports import free_port
from virtbackup.testing.nbdtools import nbd_map
from virtbackup.testing.sshd import SshdServer, sshd_server
from virtbackup.testing.vms import MiB, SmallVm, create_vm, remove_vm, wait_for_event
from virtbackup.virt import (
    Connection,
    ConnectionLost,
    LifecycleEvent,
    LifecycleKind,
    LifecycleWatcher,
    Reconnected,
    SshHost,
    TcpServer,
    Unreachable,
    VirtTimeout,
    WatchEvent,
    begin_backup,
    check_chain,
    end_backup,
    find_leftovers,
    list_disks,
    list_domains,
    open_connection,
    open_ssh_connection,
    perform_action,
    ssh_uri,
    subscribe_lifecycle,
)

pytestmark = pytest.mark.libvirt


@pytest.fixture(scope="module")
def sshd(libvirtd: None) -> Iterator[SshdServer]:
    """An sshd logging in root, in front of this machine's libvirtd: a remote hypervisor."""
    with sshd_server(root=True) as server:
        yield server


@pytest.fixture(scope="module")
async def vm(
    conn: Connection, vm_dir: Path, vm_name: Callable[[str], str]
) -> AsyncIterator[SmallVm]:
    small = await create_vm(conn, vm_name("remote"), vm_dir, [8 * MiB])
    try:
        yield small
    finally:
        await remove_vm(conn, small.name)


@pytest.fixture
async def ssh(sshd: SshdServer) -> AsyncIterator[asyncssh.SSHClientConnection]:
    client = await sshd.connect()
    try:
        yield client
    finally:
        client.close()
        await client.wait_closed()


async def test_forwarded_socket_reaches_libvirt_and_runs_host_commands(
    ssh: asyncssh.SSHClientConnection, vm: SmallVm, vm_dir: Path
) -> None:
    remote = await open_ssh_connection(ssh)
    try:
        assert remote.uri.startswith("qemu+unix:///system?socket=")
        assert isinstance(remote.host, SshHost)
        assert vm.name in [d.name for d in await list_domains(remote)]
        assert [d.capacity for d in await list_disks(remote, vm.name)] == [8 * MiB]
        job = await begin_backup(
            remote,
            vm.name,
            server=TcpServer("127.0.0.1", free_port()),
            scratch_dir=str(vm_dir),
            checkpoint="remote-1",
        )
        try:
            assert sum(e.length for e in nbd_map(job.uri("vda"))) == 8 * MiB
            # Scratch files are listed over ssh.
            found = await find_leftovers(remote, vm.name, scratch_dir=str(vm_dir))
            assert len(found.scratch_files) == 1
        finally:
            await end_backup(remote, job)
        assert (await check_chain(remote, vm.name, "remote-1")).intact
        assert not (await find_leftovers(remote, vm.name, scratch_dir=str(vm_dir))).has_overlay
        socket_path = remote.uri.split("socket=", 1)[1]
    finally:
        await remote.close()
    assert not Path(socket_path).parent.exists()
    # Closing libvirt left the ssh connection usable.
    assert (await ssh.run("true")).exit_status == 0


async def test_lifecycle_watcher_reconnects_after_the_tunnel_dies(
    sshd: SshdServer, vm: SmallVm, conn: Connection
) -> None:
    clients: list[asyncssh.SSHClientConnection] = []

    async def opener() -> Connection:
        client = await sshd.connect()
        clients.append(client)
        remote = await open_ssh_connection(client)
        remote.add_cleanup(lambda: _close_ssh(client))
        return remote

    def event_of(kind: LifecycleKind) -> Callable[[WatchEvent], bool]:
        return lambda e: isinstance(e, LifecycleEvent) and e.domain == vm.name and e.event is kind

    async with LifecycleWatcher(opener, min_delay=0.1) as watcher:
        await perform_action(conn, vm.name, "forceOff")
        await wait_for_event(watcher.queue, event_of(LifecycleKind.STOPPED), 2.0)
        # Kill the tunnel under the libvirt connection: libvirt reports EOF.
        clients[0].abort()
        lost = await wait_for_event(watcher.queue, lambda e: isinstance(e, ConnectionLost), 10.0)
        assert isinstance(lost, ConnectionLost)
        assert lost.reason in ("eof", "error")
        await wait_for_event(watcher.queue, lambda e: isinstance(e, Reconnected), 10.0)
        assert len(clients) == 2
        # Events flow again on the new connection.
        await perform_action(conn, vm.name, "start")
        started = await wait_for_event(watcher.queue, event_of(LifecycleKind.STARTED), 2.0)
        assert isinstance(started, LifecycleEvent)
        assert started.detail == "booted"
    assert watcher.connection is None


async def _close_ssh(client: asyncssh.SSHClientConnection) -> None:
    client.close()
    await client.wait_closed()


async def test_qemu_ssh_uri_with_keyfile(sshd: SshdServer, vm: SmallVm) -> None:
    """libvirt's own ssh transport (the ``ssh`` binary; ``no_verify`` because it only
    consults ``~/.ssh/known_hosts``, where it also records the loopback host key)."""
    uri = ssh_uri(
        sshd.host, user=sshd.username, port=sshd.port, keyfile=str(sshd.client_key), no_verify=True
    )
    remote = await open_connection(uri, open_timeout=30)
    try:
        assert remote.host is None
        assert vm.name in [d.name for d in await list_domains(remote)]
    finally:
        await remote.close()


async def test_qemu_libssh_uri_verifies_known_hosts(sshd: SshdServer, vm: SmallVm) -> None:
    uri = ssh_uri(
        sshd.host,
        user=sshd.username,
        port=sshd.port,
        keyfile=str(sshd.client_key),
        known_hosts=str(sshd.known_hosts),
        transport="libssh",
    )
    remote = await open_connection(uri, open_timeout=30)
    try:
        assert vm.name in [d.name for d in await list_domains(remote)]
    finally:
        await remote.close()


async def test_unknown_host_key_is_unreachable(sshd: SshdServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    uri = ssh_uri(
        sshd.host,
        user=sshd.username,
        port=sshd.port,
        keyfile=str(sshd.client_key),
        known_hosts=str(empty),
        transport="libssh",
    )
    with pytest.raises(Unreachable):
        await open_connection(uri, open_timeout=30)


async def test_closed_port_is_unreachable(libvirtd: None, tmp_path: Path) -> None:
    key = tmp_path / "key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    uri = ssh_uri("127.0.0.1", port=free_port(), keyfile=str(key), no_verify=True)
    started = asyncio.get_running_loop().time()
    with pytest.raises(Unreachable):
        await open_connection(uri, open_timeout=20)
    assert asyncio.get_running_loop().time() - started < 20


async def test_frozen_peer_is_detected_by_keepalive(sshd: SshdServer, vm: SmallVm) -> None:
    """A hypervisor that stops answering (here: its sshd frozen with SIGSTOP) is noticed
    by libvirt's keepalive, reported as a loss, and calls fail instead of hanging."""
    client = await sshd.connect()
    remote = await open_ssh_connection(client, keepalive_interval=1, keepalive_count=1)
    queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
    frozen = sshd.session_pids()
    assert frozen, "the ssh session has sshd processes"
    try:
        await subscribe_lifecycle(remote, queue)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        with pytest.raises((VirtTimeout, Unreachable)):
            await remote.call(remote.raw.getHostname, timeout=1.0)
        lost = await wait_for_event(queue, lambda e: isinstance(e, ConnectionLost), 10.0)
        assert isinstance(lost, ConnectionLost)
        assert lost.reason == "keepalive"
        assert remote.closed_reason == "keepalive"
        with pytest.raises(Unreachable):
            await list_domains(remote)
        assert not await remote.is_alive()
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        await remote.close()
        client.abort()
