"""SFTP driver specifics, against a real OpenSSH sshd on loopback."""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from virtbackup.runtime.ports import free_port
from virtbackup.storage import (
    InvalidParamsError,
    NotFoundError,
    PermanentError,
    RetryPolicy,
    TransientError,
    open_driver,
    retry,
    test_connection,
)
from virtbackup.storage.keys import TEMP_PREFIX
from virtbackup.storage.sftp import SftpDriver
from virtbackup.testing.sshd import SshdServer

MIB = 1024 * 1024


def sftp(sshd: SshdServer, base: str | None = None, **params: object) -> SftpDriver:
    driver = open_driver("sftp", sshd.params(base or sshd.make_base(f"s-{secrets.token_hex(4)}"),
                                             **params))  # fmt: skip
    assert isinstance(driver, SftpDriver)
    return driver


async def test_password_login_and_probe_message(sshd: SshdServer) -> None:
    async with sftp(sshd) as driver:
        assert await test_connection(driver) == "SFTP connection successful (read/write OK)."


async def test_private_key_login(sshd: SshdServer) -> None:
    base = sshd.make_base(f"k-{secrets.token_hex(4)}")
    async with open_driver("sftp", sshd.params(base, key=True)) as driver:
        await driver.put("a/b", b"by key")
        assert await driver.get("a/b") == b"by key"
    # Everything lives in the VirtBackup folder inside basePath.
    assert (Path(base) / "VirtBackup" / "a" / "b").read_bytes() == b"by key"


async def test_pem_private_key_login(sshd: SshdServer) -> None:
    pem = asyncssh.import_private_key(sshd.private_key).export_private_key("pkcs8-pem").decode()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----")
    params = sshd.params(sshd.make_base(f"p-{secrets.token_hex(4)}"), key=True, privateKey=pem)
    async with open_driver("sftp", params) as driver:
        await driver.put("x", b"pem")
        assert await driver.get("x") == b"pem"


async def test_wrong_password_is_permanent_and_quick(sshd: SshdServer) -> None:
    driver = sftp(sshd, password="not-the-password")
    started = time.monotonic()
    with pytest.raises(PermanentError, match="authentication failed") as info:
        await driver.put("x", b"x")
    assert time.monotonic() - started < 10
    assert sshd.username in str(info.value)
    with pytest.raises(PermanentError, match="authentication failed"):
        await test_connection(driver)
    await driver.close()


async def test_unreadable_private_key_is_a_parameter_error(sshd: SshdServer) -> None:
    with pytest.raises(InvalidParamsError, match="privateKey"):
        open_driver("sftp", sshd.params("/tmp", key=True, privateKey="not a key"))


async def test_neither_password_nor_key_is_a_parameter_error(sshd: SshdServer) -> None:
    with pytest.raises(InvalidParamsError, match="password or a privateKey"):
        open_driver("sftp", {"host": sshd.host, "port": sshd.port, "username": "u"})


async def test_host_key_pinning(sshd: SshdServer) -> None:
    fingerprint = asyncssh.import_public_key(sshd.host_key).get_fingerprint("sha256")
    for pinned in (sshd.host_key, f"[{sshd.host}]:{sshd.port} {sshd.host_key}", fingerprint):
        async with sftp(sshd, hostKey=pinned) as driver:
            await driver.put("k", b"pinned")
            assert await driver.get("k") == b"pinned"
    other_key = asyncssh.generate_private_key("ssh-ed25519")
    other = other_key.export_public_key().decode()
    async with sftp(sshd, hostKey=other) as driver:
        with pytest.raises(PermanentError, match="does not match the pinned hostKey") as info:
            await driver.put("k", b"x")
    # Both fingerprints, so that an operator can tell a changed key from an attack.
    assert f"pinned {other_key.get_fingerprint('sha256')}" in str(info.value)
    assert f"presented {fingerprint}" in str(info.value)


async def test_a_destination_without_a_pinned_host_key_is_refused(sshd: SshdServer) -> None:
    with pytest.raises(InvalidParamsError, match="not pinned"):
        open_driver("sftp", sshd.params("/tmp", hostKey=""))


async def test_missing_base_path_is_permanent(sshd: SshdServer) -> None:
    missing = str(sshd.data_dir / "no-such-dir")
    async with sftp(sshd, base=missing) as driver:
        with pytest.raises(PermanentError, match="does not exist"):
            await driver.put("k", b"x")
        # Reads say so too, as the filesystem driver's do: an unmounted disk on the
        # server is no empty repository.
        with pytest.raises(PermanentError, match=r"does not exist .*is its disk mounted"):
            [k async for k in driver.list()]
        with pytest.raises(PermanentError, match="does not exist"):
            await driver.get("repository.json")
        with pytest.raises(PermanentError, match="does not exist"):
            await driver.stat("k")
    assert not await asyncio.to_thread(os.path.exists, missing)


async def test_a_missing_object_under_an_existing_base_is_not_found(sshd: SshdServer) -> None:
    async with sftp(sshd) as driver:
        assert [k async for k in driver.list()] == []
        with pytest.raises(NotFoundError):
            await driver.get("repository.json")


async def test_deleting_the_last_objects_removes_their_empty_folders(sshd: SshdServer) -> None:
    base = sshd.make_base(f"rm-{secrets.token_hex(4)}")
    root = Path(base) / "VirtBackup"
    async with sftp(sshd, base=base) as driver:
        await driver.put("vms/web1/t1/backup.json", b"r")
        await driver.put("vms/web1/t2/backup.json", b"r")
        await driver.delete("vms/web1/t1/backup.json")
        assert not (root / "vms" / "web1" / "t1").exists()
        assert (root / "vms" / "web1" / "t2").is_dir()
        await driver.delete_many(["vms/web1/t2/backup.json"])
        assert os.listdir(root) == []  # every folder left empty went; the root stays
        await driver.put("vms/web1/t3/backup.json", b"r")
        assert [k async for k in driver.list("vms/")] == ["vms/web1/t3/backup.json"]


async def test_permission_denied_is_permanent(sshd: SshdServer) -> None:
    base = sshd.make_base(f"ro-{secrets.token_hex(4)}")
    os.chown(base, 0, 0)  # owned by root now: the test user cannot create VirtBackup
    async with sftp(sshd, base=base) as driver:
        with pytest.raises(PermanentError):
            await driver.put("k", b"x")


async def test_connection_refused_is_transient(sshd: SshdServer) -> None:
    port = free_port()
    driver = SftpDriver(
        host="127.0.0.1", port=port, username="u", password="p", root="/tmp/x/VirtBackup"
    )
    started = time.monotonic()
    with pytest.raises(TransientError, match="failed"):
        await driver.get("k")
    assert time.monotonic() - started < 5
    await driver.close()


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP server on loopback that accepts and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_silent_server_times_out_as_transient(silent_port: int) -> None:
    driver = SftpDriver(
        host="127.0.0.1",
        port=silent_port,
        username="u",
        password="p",
        root="/tmp/x/VirtBackup",
        connect_timeout=1.0,
    )
    started = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        await driver.put("k", b"x")
    assert time.monotonic() - started < 4
    await driver.close()


async def test_stuck_server_times_out_and_the_connection_is_replaced(sshd: SshdServer) -> None:
    base = sshd.make_base(f"st-{secrets.token_hex(4)}")
    params = sshd.params(base)
    driver = SftpDriver(
        host=params["host"],
        port=params["port"],
        username=params["username"],
        password=params["password"],
        root=f"{base}/VirtBackup",
        op_timeout=1.0,
    )
    async with driver:
        await driver.put("k", b"v")
        stuck = driver._session
        assert sshd.session_pids()
        sshd.pause()  # the server stops answering, the TCP connection stays up
        try:
            started = time.monotonic()
            with pytest.raises(TransientError, match="timed out"):
                await driver.get("k")
            assert time.monotonic() - started < 5
        finally:
            sshd.resume()
        assert await driver.get("k") == b"v"
        assert driver._session is not None
        assert driver._session is not stuck


async def test_reconnects_after_the_connection_dropped_while_idle(sshd: SshdServer) -> None:
    async with sftp(sshd) as driver:
        await driver.put("before", b"1")
        await asyncio.to_thread(sshd.stop)
        await asyncio.to_thread(sshd.start)
        # The old connection is dead; the next request reopens it without an error.
        assert await driver.get("before") == b"1"
        await driver.put("after", b"2")
        assert sorted([k async for k in driver.list()]) == ["after", "before"]


async def test_server_stopped_is_transient_then_retry_recovers(sshd: SshdServer) -> None:
    async with sftp(sshd) as driver:
        await driver.put("chunks/00/before", b"kept")
        await asyncio.to_thread(sshd.stop)
        try:
            with pytest.raises(TransientError):
                await driver.put("chunks/00/during", b"x")
            with pytest.raises(TransientError):
                await driver.get("chunks/00/before")
            retries: list[int] = []

            async def restart_soon() -> None:
                await asyncio.sleep(0.5)
                await asyncio.to_thread(sshd.start)

            restarter = asyncio.ensure_future(restart_soon())
            await retry(
                lambda: driver.put("chunks/00/during", b"written after restart"),
                RetryPolicy(attempts=20, initial_delay=0.1, max_delay=1.0, deadline=30),
                on_retry=lambda attempt, exc, delay: retries.append(attempt),
            )
            await restarter
        finally:
            await asyncio.to_thread(sshd.start)
        assert retries, "the first attempts should have failed while sshd was down"
        assert await driver.get("chunks/00/during") == b"written after restart"
        assert await driver.get("chunks/00/before") == b"kept"


async def test_connection_dropped_midway_leaves_only_an_unlisted_temp_file(
    sshd: SshdServer,
) -> None:
    base = sshd.make_base(f"f-{secrets.token_hex(4)}")
    directory = Path(base) / "VirtBackup" / "d"
    async with sftp(sshd, base=base) as driver:
        await driver.put("d/small", b"s")
        data = secrets.token_bytes(64 * MIB)
        task = asyncio.ensure_future(driver.put("d/big", data))

        def partial_temp_files() -> list[Path]:
            return [
                p
                for p in directory.iterdir()
                if p.name.startswith(TEMP_PREFIX) and p.stat().st_size
            ]

        for _ in range(5000):  # poll until the temp file has data (at most ~10 s)
            if partial_temp_files() or task.done():
                break
            await asyncio.sleep(0.002)
        assert not task.done(), "the write finished before it could be interrupted"
        for pid in sshd.session_pids():  # the server side of the connection dies mid-file
            os.kill(pid, signal.SIGKILL)
        # The driver notices the dropped connection, reconnects once and writes again.
        await task
        leftovers = partial_temp_files()
        assert leftovers, "the interrupted attempt should have left its partial temp file"
        assert all(p.stat().st_size < len(data) for p in leftovers)
        assert sorted([k async for k in driver.list()]) == ["d/big", "d/small"]
        assert await driver.get("d/big") == data


async def test_several_channels_share_the_load(sshd: SshdServer) -> None:
    async with sftp(sshd) as driver:
        blobs = {f"c/{i}": secrets.token_bytes(64 * 1024) for i in range(32)}
        await asyncio.gather(*(driver.put(k, v) for k, v in blobs.items()))
        session = driver._session
        assert session is not None
        assert len(session.clients) == driver.channels == 4
        assert await asyncio.gather(*(driver.get(k) for k in blobs)) == list(blobs.values())


async def test_closed_driver_refuses_work(sshd: SshdServer) -> None:
    driver = sftp(sshd)
    await driver.put("k", b"v")
    await driver.close()
    await driver.close()
    with pytest.raises(PermanentError, match="closed"):
        await driver.get("k")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as nobody")
async def test_repository_is_readable_by_the_ssh_user_only(sshd: SshdServer) -> None:
    base = Path(sshd.make_base(f"m-{secrets.token_hex(4)}"))
    async with sftp(sshd, base=str(base)) as driver:
        await driver.put("chunks/ab/abcdef", secrets.token_bytes(4096))
    root = base / "VirtBackup"
    for directory in (root, root / "chunks", root / "chunks" / "ab"):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    chunk = root / "chunks" / "ab" / "abcdef"
    assert chunk.stat().st_mode & 0o777 == 0o600
    assert chunk.stat().st_uid == pwd.getpwnam(sshd.username).pw_uid
    read = subprocess.run(
        ["runuser", "-u", "nobody", "--", "head", "-c1", str(chunk)], capture_output=True
    )
    assert read.returncode != 0
    assert b"Permission denied" in read.stderr
