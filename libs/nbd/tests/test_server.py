"""The read-only NBD server against real clients: nbdinfo, nbdcopy, qemu-img (libnbd and
QEMU, both through TLS with client certificates) and our own client, plus raw bytes on a
socket for what those clients never send."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtbackup.nbd import (
    BASE_ALLOCATION,
    NbdClient,
    NbdCommandError,
    NbdConnectionError,
    NbdHandshakeError,
)
from virtbackup.nbd import protocol as p
from virtbackup.nbd.extents import Extent
from virtbackup.nbd.server import TLS_REQUIRED, Export, NbdServer, Segment, SourceError
from virtbackup.nbd.tls import client_context_from_dir, server_context

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB


class MemorySource:
    """An export held in memory; 64 KiB blocks of zeros are reported as zero."""

    def __init__(self, data: bytes, *, fail_at: int | None = None) -> None:
        self.data = data
        self.fail_at = fail_at
        self.reads = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def _zero(self, block: int) -> bool:
        piece = self.data[block * BLOCK : (block + 1) * BLOCK]
        return piece.count(0) == len(piece)

    async def read(self, offset: int, length: int) -> Sequence[Segment]:
        self.reads += 1
        if self.fail_at is not None and offset <= self.fail_at < offset + length:
            raise SourceError(f"chunk at {self.fail_at} is missing")
        out: list[Segment] = []
        pos, end = offset, offset + length
        while pos < end:
            block = pos // BLOCK
            stop = min(end, (block + 1) * BLOCK)
            data = None if self._zero(block) else self.data[pos:stop]
            if out and data is None and out[-1].data is None:
                last = out[-1]
                out[-1] = Segment(last.offset, last.length + stop - pos, None)
            else:
                out.append(Segment(pos, stop - pos, data))
            pos = stop
        return out

    def allocation(self, offset: int, length: int) -> Sequence[Extent]:
        out = []
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        for block in range(first, last + 1):
            start = block * BLOCK
            size = min(BLOCK, self.size - start)
            flags = p.STATE_HOLE | p.STATE_ZERO if self._zero(block) else 0
            out.append(Extent(start, size, flags))
        return out


def content() -> bytes:
    """8 MiB + 5 bytes: data, a zero run, more data, a zero tail (an odd size on purpose)."""
    data = bytearray(8 * MiB + 5)
    data[0 : 3 * MiB] = hashlib.sha256(b"a").digest() * (3 * MiB // 32)
    data[5 * MiB + 100 : 6 * MiB] = b"\x5a" * (MiB - 100)
    data[-5:] = b"tail!"
    return bytes(data)


@dataclass(frozen=True)
class Creds:
    """A server certificate and three client directories (QEMU's layout): the allowed
    client, another client of the same CA, and a client of another CA."""

    server_cert: bytes
    server_key: bytes
    ca_cert: bytes
    allowed: Path
    other: Path
    foreign: Path
    allowed_der: bytes


def _write_dir(path: Path, ca: bytes, cert: bytes, key: bytes) -> Path:
    path.mkdir(mode=0o700)
    (path / "ca-cert.pem").write_bytes(ca)
    (path / "client-cert.pem").write_bytes(cert)
    (path / "client-key.pem").write_bytes(key)
    (path / "client-key.pem").chmod(0o600)
    return path


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    from virtbackup.virt.pki import Authority

    base = tmp_path_factory.mktemp("server-pki")
    ca = Authority.create("test export CA")
    server = ca.issue_server(["127.0.0.1", "localhost"])
    allowed = ca.issue_client("allowed")
    other = ca.issue_client("other")
    stranger = Authority.create("another CA").issue_client("stranger")
    return Creds(
        server_cert=server.cert_pem,
        server_key=server.key_pem,
        ca_cert=ca.cert_pem,
        allowed=_write_dir(base / "allowed", ca.cert_pem, allowed.cert_pem, allowed.key_pem),
        other=_write_dir(base / "other", ca.cert_pem, other.cert_pem, other.key_pem),
        foreign=_write_dir(base / "foreign", ca.cert_pem, stranger.cert_pem, stranger.key_pem),
        allowed_der=ssl.PEM_cert_to_DER_cert(allowed.cert_pem.decode()),
    )


@dataclass
class Running:
    server: NbdServer
    source: MemorySource
    port: int
    raw: Path

    def uri(self, directory: Path | None, export: str = "disk") -> str:
        base = f"nbds://127.0.0.1:{self.port}/{export}"
        return f"{base}?tls-certificates={directory}" if directory else base


@pytest.fixture
async def running(creds: Creds, tmp_path: Path) -> AsyncIterator[Running]:
    data = content()
    raw = tmp_path / "expected.raw"
    raw.write_bytes(data)
    source = MemorySource(data)
    tls = server_context(
        cert_pem=creds.server_cert, key_pem=creds.server_key, client_ca_pem=creds.ca_cert
    )
    fingerprint = hashlib.sha256(creds.allowed_der).digest()
    server = NbdServer(
        [Export("disk", source, "restore point test vda")],
        tls=tls,
        allow_peer=lambda der: hashlib.sha256(der).digest() == fingerprint,
    )
    _, port = await server.start("127.0.0.1", 0)
    try:
        yield Running(server, source, port, raw)
    finally:
        await server.close()


async def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A client program, run without blocking the event loop the server runs on."""
    return await asyncio.to_thread(
        subprocess.run, list(args), capture_output=True, text=True, timeout=timeout
    )


def qemu_nbd_opts(port: int, directory: Path, export: str = "disk") -> list[str]:
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={directory},endpoint=client",
        "--image-opts",
        f"driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},"
        f"file.export={export},file.tls-creds=tls0",
    ]


async def test_nbdinfo_sees_a_read_only_export_with_its_map(creds: Creds, running: Running) -> None:
    done = await run("nbdinfo", "--json", running.uri(creds.allowed))
    assert done.returncode == 0, done.stderr
    export = json.loads(done.stdout)["exports"][0]
    assert export["export-name"] == "disk"
    assert export["description"] == "restore point test vda"
    assert export["export-size"] == len(content())
    assert export["is_read_only"] is True
    assert export["can_multi_conn"] is True
    assert export["can_flush"] is True
    assert export["can_zero"] is False
    assert export["block_size_minimum"] == 1
    assert export["block_size_maximum"] == 32 * MiB
    assert BASE_ALLOCATION in export["contexts"]

    mapped = await run("nbdinfo", "--map", "--json", running.uri(creds.allowed))
    assert mapped.returncode == 0, mapped.stderr
    extents = [(e["offset"], e["length"], e["type"]) for e in json.loads(mapped.stdout)]
    assert extents == [
        (0, 3 * MiB, 0),
        (3 * MiB, 2 * MiB, 3),
        (5 * MiB, MiB, 0),
        (6 * MiB, 2 * MiB, 3),
        (8 * MiB, 5, 0),
    ]

    listed = await run("nbdinfo", "--list", "--json", running.uri(creds.allowed, export=""))
    assert listed.returncode == 0, listed.stderr
    assert [e["export-name"] for e in json.loads(listed.stdout)["exports"]] == ["disk"]


async def test_qemu_img_and_nbdcopy_read_exactly_the_content(
    creds: Creds, running: Running, tmp_path: Path
) -> None:
    compared = await run(
        "qemu-img",
        "compare",
        *qemu_nbd_opts(running.port, creds.allowed),
        f"driver=raw,file.filename={running.raw}",
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    converted = tmp_path / "converted.qcow2"
    done = await run(
        "qemu-img",
        "convert",
        "-O",
        "qcow2",
        *qemu_nbd_opts(running.port, creds.allowed),
        str(converted),
    )
    assert done.returncode == 0, done.stderr
    same = await run("qemu-img", "compare", "-F", "raw", str(converted), str(running.raw))
    assert same.returncode == 0, same.stdout
    # Zero ranges were holes on the wire: the copy did not allocate them.
    info = json.loads((await run("qemu-img", "info", "--output=json", str(converted))).stdout)
    assert info["actual-size"] < 6 * MiB

    copied = tmp_path / "copied.raw"
    done = await run("nbdcopy", "--connections=4", running.uri(creds.allowed), str(copied))
    assert done.returncode == 0, done.stderr
    assert copied.read_bytes() == content()


async def test_our_client_reads_and_is_refused_writes(creds: Creds, running: Running) -> None:
    tls = client_context_from_dir(creds.allowed)
    async with await NbdClient.connect_uri(
        running.uri(None), tls=tls, meta_contexts=[BASE_ALLOCATION]
    ) as nbd:
        assert nbd.info.read_only and nbd.info.can_flush and nbd.info.can_multi_conn
        assert nbd.info.block_size is not None and nbd.info.block_size.maximum == 32 * MiB
        buf = bytearray(len(content()))
        await nbd.readinto(0, buf)
        assert buf == content()
        extents = await nbd.block_status(0, 8 * MiB)
        assert [(e.offset, e.is_zero) for e in extents][:3] == [
            (0, False),
            (3 * MiB, True),
            (5 * MiB, False),
        ]
        # Our client refuses to write to a read-only export; the requests go out anyway.
        write = await nbd._start_write(0, memoryview(b"x" * 4096), 0)
        with pytest.raises(NbdCommandError, match="EPERM"):
            await write
        for command in (p.Command.WRITE_ZEROES, p.Command.TRIM):
            with pytest.raises(NbdCommandError, match="EPERM"):
                await nbd._ranged(command, 0, 4096, 0)
        with pytest.raises(NbdCommandError, match="EINVAL"):
            await nbd._ranged(p.Command.CACHE, 0, 4096, 0)
        with pytest.raises(NbdCommandError, match="EINVAL"):
            await nbd.read(len(content()) - 4, 8)
        await nbd.flush()
        # The refused write left the connection usable and the export unchanged.
        assert await nbd.read(0, 32) == content()[:32]
        assert await nbd.read(len(content()) - 5, 5) == b"tail!"
    # Simple replies (no structured replies negotiated): zeros are sent as bytes.
    async with await NbdClient.connect_uri(
        running.uri(None), tls=tls, structured_replies=False
    ) as plain:
        assert await plain.read(3 * MiB - 2, 4) == content()[3 * MiB - 2 : 3 * MiB + 2]


async def test_a_failing_source_fails_the_read_with_eio(creds: Creds, running: Running) -> None:
    running.source.fail_at = 5 * MiB + 200
    async with await NbdClient.connect_uri(
        running.uri(None), tls=client_context_from_dir(creds.allowed)
    ) as nbd:
        with pytest.raises(NbdCommandError, match="EIO"):
            await nbd.read(5 * MiB, MiB)
        assert await nbd.read(0, 16) == content()[:16]


async def test_only_the_export_certificate_is_let_in(creds: Creds, running: Running) -> None:
    # No TLS: our client and nbdinfo are told TLS is required.
    with pytest.raises(NbdHandshakeError, match="TLS"):
        await NbdClient.connect(host="127.0.0.1", port=running.port, export="disk")
    plain = await run("nbdinfo", f"nbd://127.0.0.1:{running.port}/disk")
    assert plain.returncode != 0
    # Signed by the same CA but not this export's certificate; signed by another CA.
    for directory in (creds.other, creds.foreign):
        with pytest.raises(NbdConnectionError):
            await NbdClient.connect_uri(
                running.uri(None), tls=client_context_from_dir(directory), timeout=10
            )
        refused = await run("nbdinfo", running.uri(directory))
        assert refused.returncode != 0, directory
        img = await run("qemu-img", "info", *qemu_nbd_opts(running.port, directory))
        assert img.returncode != 0, directory
    # No certificate at all.
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(cadata=creds.ca_cert.decode())
    with pytest.raises(NbdConnectionError):
        await NbdClient.connect_uri(running.uri(None), tls=anonymous, timeout=10)
    assert running.source.reads == 0
    # The right one still gets in.
    ok = await run("nbdinfo", "--size", running.uri(creds.allowed))
    assert ok.stdout.strip() == str(len(content()))


async def test_close_drops_connections_and_refuses_new_ones(creds: Creds, running: Running) -> None:
    tls = client_context_from_dir(creds.allowed)
    nbd = await NbdClient.connect_uri(running.uri(None), tls=tls)
    assert await nbd.read(0, 16) == content()[:16]
    assert running.server.connections == 1
    await running.server.close()
    with pytest.raises(NbdConnectionError):
        await nbd.read(0, 16)
    await nbd.disconnect()
    with pytest.raises(NbdConnectionError):
        await NbdClient.connect_uri(running.uri(None), tls=tls, timeout=5)
    refused = await run("nbdinfo", running.uri(creds.allowed))
    assert refused.returncode != 0


async def test_unknown_export_is_refused_by_name(creds: Creds, running: Running) -> None:
    with pytest.raises(NbdHandshakeError, match=r"ERR_UNKNOWN.*nope"):
        await NbdClient.connect_uri(
            running.uri(None, export="nope"), tls=client_context_from_dir(creds.allowed)
        )


class RawClient:
    """Bytes on a socket, for what real clients never send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            piece = self.sock.recv(n - len(out))
            if not piece:
                raise ConnectionError("closed")
            out += piece
        return out

    def greet(self) -> None:
        magic, opt, flags = struct_greeting(self.recv(18))
        assert (magic, opt) == (p.NBD_MAGIC, p.IHAVEOPT)
        assert flags & p.HandshakeFlag.FIXED_NEWSTYLE
        self.sock.sendall(p.U32.pack(p.ClientFlag.FIXED_NEWSTYLE | p.ClientFlag.NO_ZEROES))

    def option(self, option: int, data: bytes = b"") -> tuple[int, bytes]:
        self.sock.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)
        magic, echoed, reply, length = p.OPTION_REPLY_HEADER.unpack(self.recv(20))
        assert magic == p.OPTION_REPLY_MAGIC and echoed == option
        return reply, self.recv(length) if length else b""

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionError:
            return True


def struct_greeting(data: bytes) -> tuple[int, int, int]:
    return p.U64.unpack_from(data)[0], p.U64.unpack_from(data, 8)[0], p.U16.unpack_from(data, 16)[0]


def go_body(name: str) -> bytes:
    raw = name.encode()
    return p.U32.pack(len(raw)) + raw + p.U16.pack(0)


async def test_before_tls_only_starttls_and_abort_are_answered(running: Running) -> None:
    def talk() -> None:
        client = RawClient(running.port)
        client.greet()
        for option, body in (
            (p.Option.LIST, b""),
            (p.Option.GO, go_body("disk")),
            (p.Option.INFO, go_body("disk")),
            (p.Option.STRUCTURED_REPLY, b""),
            (99, b""),
        ):
            reply, _ = client.option(option, body)
            assert reply == p.OptionReply.ERR_TLS_REQD, option
        assert client.option(p.Option.ABORT) == (p.OptionReply.ACK, b"")
        assert client.closed()
        # NBD_OPT_EXPORT_NAME cannot be refused: before TLS it ends the connection.
        other = RawClient(running.port)
        other.greet()
        other.sock.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Option.EXPORT_NAME, 4) + b"disk")
        assert other.closed()
        # A client that does not speak fixed newstyle is dropped.
        old = RawClient(running.port)
        old.recv(18)
        old.sock.sendall(p.U32.pack(0))
        assert old.closed()

    await asyncio.to_thread(talk)
    assert running.source.reads == 0


async def test_a_plain_client_is_told_tls_is_required(running: Running) -> None:
    """Real clients without TLS: each option is answered NBD_REP_ERR_TLS_REQD (libnbd
    reports its errno for it, "Operation not supported", and logs the server's message;
    qemu names it), and no byte of the export is read."""
    plain = f"nbd://127.0.0.1:{running.port}/disk"
    for args in (["nbdinfo", plain], ["nbdinfo", "--list", f"nbd://127.0.0.1:{running.port}"]):
        done = await run("env", "LIBNBD_DEBUG=1", *args)
        assert done.returncode != 0
        assert f"server error message: {TLS_REQUIRED}" in done.stderr, done.stderr[-2000:]
    done = await run("qemu-img", "info", plain)
    assert done.returncode != 0
    assert "TLS negotiation required" in done.stderr and TLS_REQUIRED in done.stderr
    assert running.source.reads == 0
