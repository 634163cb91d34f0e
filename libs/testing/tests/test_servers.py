"""The test servers themselves: they stop and start again on the same port, and clean up."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import asyncssh
import pytest

from virtbackup.storage import open_driver
from virtbackup.testing.seaweedfs import seaweedfs_server
from virtbackup.testing.servers import port_open
from virtbackup.testing.sshd import TEST_USER, sshd_server


async def test_sftp_sshd_restarts_on_its_port_and_cleans_up() -> None:
    with sshd_server() as sshd:
        directory, port = sshd.dir, sshd.port
        assert (directory / "sshd.pid").exists()
        assert sshd.username == TEST_USER
        async with open_driver("sftp", sshd.params(sshd.make_base("restart"))) as driver:
            await driver.put("k", b"v")
            await asyncio.to_thread(sshd.stop)
            assert not sshd.running
            assert not port_open(port)
            assert sshd.session_pids() == []
            await asyncio.to_thread(sshd.start)
            assert sshd.running
            assert sshd.port == port
            assert await driver.get("k") == b"v"
    assert not port_open(port)
    assert not directory.exists()


async def test_root_sshd_runs_commands_and_pins_its_host_key() -> None:
    with sshd_server(root=True) as host:
        assert host.username == "root"
        assert host.password is None
        with pytest.raises(ValueError, match="key only"):
            host.params("/tmp")
        assert host.known_hosts.read_text().startswith(f"[{host.host}]:{host.port} ssh-ed25519 ")
        client = await host.connect()  # checks the host key against known_hosts
        try:
            result = await client.run("id -u", check=True)
            assert str(result.stdout).strip() == "0"
            assert host.session_pids()
        finally:
            client.close()
            await client.wait_closed()
        with tempfile.TemporaryDirectory() as empty:
            (Path(empty) / "known_hosts").write_text("")
            with pytest.raises(asyncssh.HostKeyNotVerifiable):
                await asyncssh.connect(
                    host.host,
                    port=host.port,
                    username="root",
                    client_keys=[str(host.client_key)],
                    known_hosts=str(Path(empty) / "known_hosts"),
                    agent_path=None,
                )


async def test_seaweed_restarts_on_its_port_and_cleans_up() -> None:
    with seaweedfs_server(bucket="ctx-bucket") as seaweed:
        directory, port = seaweed.dir, seaweed.s3_port
        assert seaweed.client().bucket_exists("ctx-bucket")
        async with open_driver("s3", seaweed.params(prefix="restart")) as driver:
            await driver.put("k", b"v")
            await asyncio.to_thread(seaweed.stop)
            assert not seaweed.running
            assert not port_open(port)
            await asyncio.to_thread(seaweed.start)
            assert seaweed.running
            assert seaweed.s3_port == port
            assert await driver.get("k") == b"v"
    assert not port_open(port)
    assert not directory.exists()
    assert not list(Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{seaweed.s3_grpc_port}.sock"))
