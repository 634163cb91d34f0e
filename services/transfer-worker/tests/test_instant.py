"""Instant access in the worker: a manifest read through the chunk cache from a real
filesystem repository, the per-export certificates, and both behind the NBD server."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from virtbackup.nbd import BASE_ALLOCATION, NbdClient, NbdConnectionError
from virtbackup.nbd.server import Export, NbdServer, SourceError
from virtbackup.nbd.tls import client_context, server_context
from virtbackup.repository.format import chunk_key
from virtbackup.repository.records import DiskManifest
from virtbackup.repository.repository import Repository
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.transfer_worker.instant import (
    ChunkCache,
    ManifestSource,
    only_certificate,
    parse_ports,
)
from virtbackup.transfer_worker.instant_pki import ClientKeyError, issue_export_credentials

CHUNK = 64 * 1024


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


@pytest.fixture
async def repo(tmp_path: Path) -> AsyncIterator[Repository]:
    repository = await Repository.open_or_create(
        FilesystemDriver(tmp_path / "repo"), chunk_size=CHUNK
    )
    try:
        yield repository
    finally:
        await repository.close()


async def store(repo: Repository, data: bytes) -> str:
    chunk_id = repo.chunk_id(data)
    await repo.store_chunk(chunk_id, repo.encode_chunk(chunk_id, data))
    return chunk_id


async def disk(repo: Repository) -> tuple[bytes, DiskManifest]:
    """A disk of 3.5 chunks: random, zeros, the first chunk again, a short random tail."""
    first, tail = os.urandom(CHUNK), os.urandom(CHUNK // 2)
    content = first + bytes(CHUNK) + first + tail
    ids = [await store(repo, first), None, await store(repo, first), await store(repo, tail)]
    manifest = DiskManifest(
        target="vda", size=len(content), chunk_size=CHUNK, format="raw", source_path="", chunks=ids
    )
    return content, manifest


async def gather(source: ManifestSource, offset: int, length: int) -> bytes:
    out = b""
    for seg in await source.read(offset, length):
        assert seg.offset == offset + len(out)
        out += bytes(seg.length) if seg.data is None else bytes(seg.data)
    return out


async def test_a_manifest_reads_as_its_disk_through_the_cache(
    repo: Repository, executor: ThreadPoolExecutor
) -> None:
    content, manifest = await disk(repo)
    cache = ChunkCache(repo, executor, capacity=1)
    source = ManifestSource(manifest, cache)
    assert source.size == len(content)
    # Every boundary: inside a chunk, across the zero chunk, up to the short tail.
    for offset, length in ((0, 10), (CHUNK - 5, 10), (CHUNK // 2, 2 * CHUNK), (0, len(content))):
        assert await gather(source, offset, length) == content[offset : offset + length]
    segments = await source.read(CHUNK - 1, CHUNK + 2)
    assert [(s.offset, s.length, s.data is None) for s in segments] == [
        (CHUNK - 1, 1, False),
        (CHUNK, CHUNK, True),
        (2 * CHUNK, 1, False),
    ]
    assert [(e.offset, e.length, e.flags) for e in source.allocation(0, len(content))] == [
        (0, CHUNK, 0),
        (CHUNK, CHUNK, 3),
        (2 * CHUNK, CHUNK, 0),
        (3 * CHUNK, CHUNK // 2, 0),
    ]
    # Concurrent requests for one chunk read it once; the least recently used goes.
    cache = ChunkCache(repo, executor, capacity=1)
    first = manifest.chunks[0]
    assert first is not None
    await asyncio.gather(*(cache.get(first) for _ in range(8)))
    assert cache.loads == 1
    await cache.get(first)
    assert cache.loads == 1
    tail = manifest.chunks[3]
    assert tail is not None
    await cache.get(tail)
    await cache.get(first)
    assert cache.loads == 3


async def test_a_missing_or_damaged_chunk_is_a_source_error(
    repo: Repository, executor: ThreadPoolExecutor, tmp_path: Path
) -> None:
    content, manifest = await disk(repo)
    source = ManifestSource(manifest, ChunkCache(repo, executor))
    tail = manifest.chunks[3]
    assert tail is not None
    path = tmp_path / "repo" / "VirtBackup" / chunk_key(tail)
    if not path.exists():
        path = next((tmp_path / "repo").rglob(tail))
    path.write_bytes(b"\x00garbage")
    with pytest.raises(SourceError, match=tail):
        await source.read(3 * CHUNK, 10)
    path.unlink()
    with pytest.raises(SourceError, match="missing"):
        await source.read(3 * CHUNK, 10)
    assert await gather(source, 0, 10) == content[:10]


def _client_key() -> tuple[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return public.decode(), private


async def test_each_export_lets_in_only_its_own_certificate(
    repo: Repository, executor: ThreadPoolExecutor, tmp_path: Path
) -> None:
    content, manifest = await disk(repo)
    until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    clients = {}
    servers = []
    for name in ("one", "two"):
        public, private = _client_key()
        creds = issue_export_credentials(
            export_id=name, client_public_key=public, server_names=["127.0.0.1"], not_after=until
        )
        cert = x509.load_pem_x509_certificate(creds.client_cert_pem)
        assert cert.not_valid_after_utc <= until + dt.timedelta(minutes=6)
        folder = tmp_path / name
        folder.mkdir()
        for file, data in (
            ("ca.pem", creds.ca_cert_pem),
            ("cert.pem", creds.client_cert_pem),
            ("key.pem", private),
        ):
            (folder / file).write_bytes(data)
        tls = server_context(
            cert_pem=creds.server_cert_pem,
            key_pem=creds.server_key_pem,
            client_ca_pem=creds.ca_cert_pem,
        )
        server = NbdServer(
            [Export("vda", ManifestSource(manifest, ChunkCache(repo, executor)))],
            tls=tls,
            allow_peer=only_certificate(creds.client_fingerprint),
        )
        port = (await server.start("127.0.0.1", 0))[1]
        servers.append(server)
        clients[name] = (port, folder)
    try:
        port_one, one = clients["one"]
        _, two = clients["two"]
        own = client_context(ca=one / "ca.pem", cert=one / "cert.pem", key=one / "key.pem")
        async with await NbdClient.connect(
            host="127.0.0.1", port=port_one, export="vda", tls=own, meta_contexts=[BASE_ALLOCATION]
        ) as nbd:
            assert await nbd.read(0, len(content)) == content
            assert [e.is_zero for e in await nbd.block_status()] == [False, True, False]
        # Export two's certificate, trusting one's CA: refused by one's server.
        other = client_context(ca=one / "ca.pem", cert=two / "cert.pem", key=two / "key.pem")
        with pytest.raises(NbdConnectionError):
            await NbdClient.connect(
                host="127.0.0.1", port=port_one, export="vda", tls=other, timeout=10
            )
    finally:
        for server in servers:
            await server.close()


def test_unusable_client_keys_are_refused() -> None:
    until = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    weak_pem = weak.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    for bad in ("not a key", weak_pem, ""):
        with pytest.raises(ClientKeyError, match="clientPublicKey"):
            issue_export_credentials(
                export_id="x", client_public_key=bad, server_names=["h"], not_after=until
            )


def test_port_ranges() -> None:
    assert parse_ports("") == []
    assert parse_ports("10900-10902") == [10900, 10901, 10902]
    assert parse_ports("10809") == [10809]
    for bad in ("10-5", "0-3", "a-b", "70000"):
        with pytest.raises(ValueError):  # noqa: PT011 - int() or the range check
            parse_ports(bad)
