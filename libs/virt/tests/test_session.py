"""Another user's ``qemu:///session`` daemon over SSH: the socket asked of the host, the
daemon started when it is not running, its backup TLS folder in the user's qemu.conf."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from virtbackup.testing.session_host import SESSION_USER, SessionHost, run_as
from virtbackup.virt import SshHost, list_domains, open_ssh_connection
from virtbackup.virt.nbd_tls import read_backup_tls_config

pytestmark = pytest.mark.libvirt


@pytest.fixture
async def ssh(session_host: SessionHost) -> AsyncIterator[asyncssh.SSHClientConnection]:
    client = await session_host.sshd.connect()
    try:
        yield client
    finally:
        client.close()


async def test_the_session_daemon_is_started_when_it_is_not_running(
    session_host: SessionHost, ssh: asyncssh.SSHClientConnection
) -> None:
    session_host.stop_daemon()
    conn = await open_ssh_connection(ssh, session=True, open_timeout=30)
    try:
        assert conn.session is not None and conn.session.started
        assert str(await conn.call(conn.raw.getURI)).startswith("qemu+unix:///session?")
        await list_domains(conn)
        # Its processes are the user's, not root's.
        daemons = run_as(["sh", "-c", 'pgrep -u "$(id -u)" -x libvirtd'])
        assert daemons.returncode == 0 and daemons.stdout.strip(), daemons
        again = await open_ssh_connection(ssh, session=True)
        try:
            assert again.session is not None and not again.session.started
            assert again.session.socket == conn.session.socket
        finally:
            await again.close()
    finally:
        await conn.close()


async def test_the_backup_tls_folder_is_the_users(
    session_host: SessionHost, ssh: asyncssh.SSHClientConnection
) -> None:
    conn = await open_ssh_connection(ssh, session=True)
    try:
        daemon = conn.session
        assert daemon is not None
        home = os.path.expanduser(f"~{SESSION_USER}")
        assert daemon.home == home and daemon.tls_dir.startswith(home + "/")
        config = await read_backup_tls_config(SshHost(ssh), daemon.qemu_conf)
        assert config.directory == daemon.tls_dir and config.verify and config.qemu_user is None
        for path in (daemon.tls_dir, daemon.scratch_dir):
            st = os.stat(path)
            assert st.st_uid == session_host.user.pw_uid and st.st_mode & 0o077 == 0, path
    finally:
        await conn.close()


async def test_a_daemon_without_the_tls_setting_is_restarted_with_it(
    session_host: SessionHost, ssh: asyncssh.SSHClientConnection
) -> None:
    daemon = session_host.ensure_daemon()
    conf = Path(daemon.qemu_conf)
    kept = conf.read_text()
    conf.write_text(
        "".join(line for line in kept.splitlines(True) if "backup_tls_x509_cert_dir" not in line)
    )
    pid_file = Path(daemon.socket).parent / "libvirtd.pid"
    before = pid_file.read_text().strip()
    conn = await open_ssh_connection(ssh, session=True, open_timeout=30)
    try:
        assert conn.session is not None and conn.session.restarted
        assert pid_file.read_text().strip() != before
        assert f'backup_tls_x509_cert_dir = "{daemon.tls_dir}"' in conf.read_text()
        await list_domains(conn)
    finally:
        await conn.close()
