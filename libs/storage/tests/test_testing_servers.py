"""The test servers themselves: they stop and start again on the same port, cleanly."""

from __future__ import annotations

import asyncio
from pathlib import Path

from virtbackup.storage import open_driver
from virtbackup.storage.testing import (
    SeaweedServer,
    SshdServer,
    port_open,
    seaweedfs_server,
    sshd_server,
)


async def test_sshd_stop_and_start_on_the_same_port(sshd: SshdServer) -> None:
    port = sshd.port
    base = sshd.make_base("restart")
    async with open_driver("sftp", sshd.params(base)) as driver:
        await driver.put("k", b"v")
        await asyncio.to_thread(sshd.stop)
        assert not sshd.running
        assert not port_open(port)
        assert sshd.session_pids() == []
        await asyncio.to_thread(sshd.start)
        assert sshd.running
        assert sshd.port == port
        assert port_open(port)
        assert await driver.get("k") == b"v"


async def test_seaweed_stop_and_start_on_the_same_port(seaweed: SeaweedServer) -> None:
    port = seaweed.s3_port
    async with open_driver("s3", seaweed.params(prefix="restart")) as driver:
        await driver.put("k", b"v")
        await asyncio.to_thread(seaweed.stop)
        assert not seaweed.running
        assert not port_open(port)
        await asyncio.to_thread(seaweed.start)
        assert seaweed.running
        assert seaweed.s3_port == port
        assert await driver.get("k") == b"v"


def test_sshd_context_manager_cleans_up() -> None:
    with sshd_server() as server:
        directory = server.dir
        port = server.port
        assert port_open(port)
        assert (directory / "sshd.pid").exists()
    assert not port_open(port)
    assert not directory.exists()


def test_seaweed_context_manager_cleans_up() -> None:
    with seaweedfs_server(bucket="ctx-bucket") as server:
        directory = server.dir
        port = server.s3_port
        assert server.client().bucket_exists("ctx-bucket")
    assert not port_open(port)
    assert not directory.exists()
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{server.s3_grpc_port}.sock"))
