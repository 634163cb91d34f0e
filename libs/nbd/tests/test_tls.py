"""TLS with client certificates against qemu-nbd (``--tls-creds``, ``verify-peer=on``)."""

from __future__ import annotations

import asyncio
import gc
import ssl
import subprocess
from typing import Any

import pytest

from virtbackup.nbd import BASE_ALLOCATION, NbdClient, NbdConnectionError, NbdHandshakeError
from virtbackup.nbd.pool import NbdPool
from virtbackup.nbd.tls import client_context, client_context_from_dir

MiB = 1024 * 1024


def tls_uri(server: Any) -> str:
    return f"nbds://127.0.0.1:{server.port}/{server.export}"


async def test_read_write_and_block_status_over_tls(qemu: Any, pki: Any) -> None:
    image = qemu.image(64 * MiB, [(0x5A, 3 * MiB, 5 * MiB)])
    server = qemu.serve(image, tls_dir=pki.server_dir)
    tls = client_context_from_dir(pki.client_dir)
    async with await NbdClient.connect_uri(
        tls_uri(server), tls=tls, meta_contexts=[BASE_ALLOCATION]
    ) as nbd:
        assert nbd.size == 64 * MiB
        assert await nbd.read(3 * MiB - 2, 4) == b"\0\0ZZ"
        # A large read pipelined in pieces lands straight in the caller's buffer.
        buf = bytearray(32 * MiB)
        await nbd.readinto(0, buf)
        assert buf == bytes(3 * MiB) + b"\x5a" * 5 * MiB + bytes(24 * MiB)
        data = bytes(range(256)) * (4 * MiB // 256)
        await nbd.write(40 * MiB, data)
        await nbd.flush()
        assert await nbd.read(40 * MiB, len(data)) == data
        extents = await nbd.block_status()
        assert [(e.offset, e.is_zero) for e in extents][:2] == [(0, True), (3 * MiB, False)]
    assert qemu.qemu_io_read(image, 0x5A, 3 * MiB, 5 * MiB)
    # A pool of TLS connections, through the same context.
    pool = await NbdPool.connect_uri(tls_uri(server), 3, tls=tls)
    async with pool:
        assert await pool.read(40 * MiB, len(data)) == data


async def test_plain_client_is_refused(qemu: Any, pki: Any) -> None:
    server = qemu.serve(qemu.image(MiB), tls_dir=pki.server_dir)
    with pytest.raises(NbdHandshakeError, match="TLS"):
        await NbdClient.connect_uri(server.uri)
    # nbdinfo, a second plain client, is refused as well.
    plain = subprocess.run(["nbdinfo", server.uri], capture_output=True, text=True)
    assert plain.returncode != 0


async def test_client_certificate_of_another_ca_is_refused(qemu: Any, pki: Any) -> None:
    server = qemu.serve(qemu.image(MiB), tls_dir=pki.server_dir)
    # TLS 1.3: the server refuses the certificate after the client's side of the TLS
    # handshake is done; the NBD options that follow it then fail.
    foreign = client_context_from_dir(pki.foreign_client_dir)
    with pytest.raises(NbdConnectionError):
        await NbdClient.connect_uri(tls_uri(server), tls=foreign, timeout=10)
    # A client without any certificate is refused too.
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(cafile=str(pki.client_dir / "ca-cert.pem"))
    with pytest.raises(NbdConnectionError):
        await NbdClient.connect_uri(tls_uri(server), tls=anonymous, timeout=10)
    # The right certificate still works: the server was not disturbed.
    ours = client_context(
        ca=pki.client_dir / "ca-cert.pem",
        cert=pki.client_dir / "client-cert.pem",
        key=pki.client_dir / "client-key.pem",
    )
    async with await NbdClient.connect_uri(tls_uri(server), tls=ours) as nbd:
        assert await nbd.read(0, 512) == bytes(512)


async def test_server_of_another_name_is_refused(qemu: Any, pki: Any) -> None:
    server = qemu.serve(qemu.image(MiB), tls_dir=pki.server_dir)
    tls = client_context_from_dir(pki.client_dir)
    with pytest.raises(NbdConnectionError, match=r"(?i)certificate|hostname"):
        await NbdClient.connect(
            host="127.0.0.1", port=server.port, export="export", tls=tls, tls_hostname="kvm9"
        )


def test_tls_uri_needs_a_context() -> None:
    with pytest.raises(ValueError, match="TLS"):
        asyncio.run(NbdClient.connect_uri("nbds://127.0.0.1:1/x"))


async def test_a_tls_connection_outlives_a_garbage_collection(qemu: Any, pki: Any) -> None:
    """The handshake's stream writer closes its transport when it is collected: the
    connection must keep it (this lost every TLS connection after the first GC)."""
    server = qemu.serve(qemu.image(8 * MiB), tls_dir=pki.server_dir)
    async with await NbdClient.connect_uri(
        tls_uri(server), tls=client_context_from_dir(pki.client_dir)
    ) as nbd:
        gc.collect()
        await asyncio.sleep(0.1)
        await nbd.write(0, b"\x11" * MiB)
        assert await nbd.read(0, MiB) == b"\x11" * MiB
