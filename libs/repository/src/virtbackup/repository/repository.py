"""A repository on one destination: create/open, chunks, manifests, restore points.

The repository is the only code that knows where things are on a destination (the keys
of ``format``) and how they are encoded (``codec``, ``crypto``): services go through its
methods, never through ``driver`` with a key of their own.

Contract:
* ``store_chunk`` is idempotent and safe to call from many workers at once: the id is
  the (keyed) hash of the plaintext, so every blob stored under an id decodes to the same
  bytes, and the driver's ``put`` replaces atomically. Callers ask ``has_chunk`` first to
  save encoding and uploading a chunk that is already there.
* ``commit`` writes the manifests, the domain XML and finally ``backup.json``; callers
  call it only after every chunk the manifests name has been stored (``put`` is durable
  on return), so a listed restore point never names a missing chunk.
* Reads verify: ``load_chunk`` and ``decode_chunk`` check the chunk's hash against its id.
* Storage errors (``virtbackup.storage.errors``) pass through unchanged: the caller
  decides whether to retry a ``TransientError``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Self

import blake3
import msgspec

from virtbackup.repository import crypto
from virtbackup.repository.codec import (
    FRAME_SIZE,
    FRAMED,
    BlobError,
    compress_body,
    compress_framed,
    decode_blob,
    decode_blob_into,
    encode_blob,
    framed_records,
)
from virtbackup.repository.format import (
    CHUNKS_PREFIX,
    CONFIG_KEY,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_COMPRESSION_LEVEL,
    FORMAT_VERSION,
    FRAMED_FORMAT,
    MAX_COMPRESSION_LEVEL,
    MIN_COMPRESSION_LEVEL,
    MIN_FORMAT_VERSION,
    POINTS_PREFIX,
    Encryption,
    KdfParams,
    RepositoryConfig,
    check_chunk_size,
    check_id,
    chunk_key,
    manifest_key,
    parse_xml_key,
    point_prefix,
    quarantine_key,
    record_key,
    segment_record_key,
    vm_prefix,
    vm_segment,
    xml_path,
)
from virtbackup.repository.records import DiskManifest, RestorePoint, chunk_count
from virtbackup.storage.errors import NotFoundError
from virtbackup.storage.protocol import Driver, FolderRemover

SCRYPT_N = 1 << 15
#: The longest a manifest's JSON may be: this, plus ``MANIFEST_CHUNK_BYTES`` per chunk of
#: its disk's size in the point's record (a chunk id and its quotes and comma are 67
#: bytes; the rest, a target and a source path, fits in 64 KiB).
MANIFEST_BASE_BYTES = 64 << 10
MANIFEST_CHUNK_BYTES = 80
#: The longest a point's domain XML may be (libvirt's are a few KiB).
DOMAIN_XML_MAX_BYTES = 16 << 20


class RepositoryError(Exception):
    """The repository is missing, of an unknown format, or locked by a passphrase."""


class NoRepositoryError(RepositoryError):
    """The destination holds no repository (no ``repository.json``)."""


class CorruptChunkError(RepositoryError):
    def __init__(self, chunk_id: str, reason: str) -> None:
        super().__init__(f"chunk {chunk_id}: {reason}")
        self.chunk_id = chunk_id
        self.reason = reason


@dataclass(frozen=True)
class UnreadableRecord:
    """A restore point record (``backup.json``) that exists but cannot be read."""

    #: Its key (``vms/<segment>/<timestamp>/backup.json``).
    key: str
    reason: str

    @property
    def xml_path(self) -> str:
        """The ``xmlPath`` its point would have (``.../domain.xml`` beside the record)."""
        return self.key.rsplit("/", 1)[0] + "/domain.xml"

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


@dataclass
class PointScan:
    """What ``Repository.scan_points`` found."""

    points: list[RestorePoint] = field(default_factory=list)
    unreadable: list[UnreadableRecord] = field(default_factory=list)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Repository:
    driver: Driver
    config: RepositoryConfig
    sealer: crypto.Sealer | None

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, driver: Driver, passphrase: str | None = None, *, locked: bool = False
    ) -> Repository:
        """Open the repository on ``driver``. ``NoRepositoryError`` if there is none,
        ``RepositoryError`` if its ``repository.json`` is unreadable or of a format this
        code does not know (one newer than ``FORMAT_VERSION``: written by a newer
        VirtBackup, whose chunks this one could misread).

        ``locked`` opens an encrypted repository without its key: restore points can be
        listed (``backup.json`` is plaintext), nothing encrypted can be read.
        """
        try:
            raw = await driver.get(CONFIG_KEY)
        except NotFoundError:
            raise NoRepositoryError("no repository at this destination") from None
        try:
            config = msgspec.json.decode(raw, type=RepositoryConfig)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RepositoryError(f"its {CONFIG_KEY} is unreadable ({exc})") from None
        if config.format > FORMAT_VERSION:
            raise RepositoryError(
                f"repository format {config.format} is newer than this version of"
                f" VirtBackup reads (formats {MIN_FORMAT_VERSION}-{FORMAT_VERSION}):"
                " upgrade VirtBackup to use this repository"
            )
        if config.format < MIN_FORMAT_VERSION:
            raise RepositoryError(f"unsupported repository format {config.format}")
        if locked:
            return cls(driver, config, None)
        return cls(driver, config, _sealer(config, passphrase))

    @classmethod
    async def open_or_create(
        cls,
        driver: Driver,
        passphrase: str | None = None,
        cipher: str = "aes-256-gcm",
        chunk_size: int | None = None,
        compression_level: int | None = None,
    ) -> Repository:
        """Open the repository, creating it on first use (encrypted if a passphrase is
        given) with ``chunk_size`` and the zstd ``compression_level`` (``None``: the
        defaults; both are fixed at creation and ignored for an existing repository).
        ``ValueError`` for a level outside ``MIN_COMPRESSION_LEVEL..MAX_COMPRESSION_LEVEL``
        or a chunk size :func:`check_chunk_size` refuses (0 included)."""
        if chunk_size is not None:
            check_chunk_size(chunk_size)
        level = DEFAULT_COMPRESSION_LEVEL if compression_level is None else compression_level
        if not MIN_COMPRESSION_LEVEL <= level <= MAX_COMPRESSION_LEVEL:
            raise ValueError(
                f"compression level {level}: from {MIN_COMPRESSION_LEVEL}"
                f" to {MAX_COMPRESSION_LEVEL}"
            )
        try:
            return await cls.open(driver, passphrase)
        except NoRepositoryError:
            pass
        encryption = None
        if passphrase:
            salt = os.urandom(16)
            kek = crypto.derive_kek(passphrase, salt, SCRYPT_N, 8, 1)
            data_key = os.urandom(32)
            encryption = Encryption(
                cipher=cipher,
                kdf=KdfParams(salt=base64.b64encode(salt).decode(), n=SCRYPT_N, r=8, p=1),
                wrapped_key=base64.b64encode(crypto.wrap_key(cipher, kek, data_key)).decode(),
            )
        config = RepositoryConfig(
            id=uuid.uuid4().hex,
            created_at=_now(),
            hash="blake3-keyed" if encryption else "blake3",
            encryption=encryption,
            chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
            compression_level=level,
        )
        await driver.put(CONFIG_KEY, msgspec.json.encode(config))
        # Another writer may have created one at the same time: the stored one wins.
        return await cls.open(driver, passphrase)

    async def close(self) -> None:
        """Close the driver (the repository owns it once opened). Idempotent."""
        await self.driver.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def chunk_size(self) -> int:
        """Bytes of plaintext per chunk (the last chunk of a disk may be shorter)."""
        return self.config.chunk_size

    @property
    def compression_level(self) -> int:
        """The zstd level this repository compresses with (``compressionLevel``)."""
        return self.config.compression_level

    @property
    def framed(self) -> bool:
        """Whether chunks written here are framed (one record per ``codec.FRAME_SIZE``: format 2 and
        later) rather than one zstd frame (format 1). Readers decode both."""
        return self.config.format >= FRAMED_FORMAT

    async def upgrade_format(self) -> bool:
        """Raise this repository's format to ``FORMAT_VERSION`` (rewrites
        ``repository.json``; every other field stays): from then on chunks are written
        framed, and VirtBackup versions that read only format 1 refuse to open it.
        Chunks already stored stay as they are (readers decode both encodings). Returns
        whether it changed anything. Idempotent; storage errors propagate."""
        if self.config.format >= FORMAT_VERSION:
            return False
        config = msgspec.structs.replace(self.config, format=FORMAT_VERSION)
        await self.driver.put(CONFIG_KEY, msgspec.json.encode(config))
        self.config = config
        return True

    # -- chunks -----------------------------------------------------------------------

    def chunk_id(self, data: bytes | bytearray | memoryview) -> str:
        """The id of a plaintext chunk (keyed when the repository is encrypted)."""
        if self.sealer:
            return blake3.blake3(data, key=self.sealer.id_key, max_threads=1).hexdigest()
        return blake3.blake3(data, max_threads=1).hexdigest()

    def encode_chunk(self, chunk_id: str, data: bytes | bytearray | memoryview) -> bytes:
        """The blob to store for a plaintext chunk (:meth:`chunk_body`, sealed when
        encrypted).

        CPU-bound and thread-safe: workers call it on a thread pool.
        """
        return self.seal_chunk(chunk_id, self.chunk_body(data))

    def chunk_body(
        self,
        data: bytes | bytearray | memoryview,
        parent: list[memoryview] | None = None,
        keep: frozenset[int] = frozenset(),
    ) -> bytes:
        """The unsealed blob of a plaintext chunk as this repository writes it: framed
        (``codec.compress_framed``, format 2) or one zstd frame (``codec.compress_body``,
        format 1), at its ``compression_level``. ``parent`` and ``keep`` (framed only):
        the records of a parent chunk (:meth:`decode_chunk_records_into`) to copy for
        the frames in ``keep``, whose plaintext the caller knows equal to ``data``'s.
        Thread-safe."""
        if not self.framed:
            return compress_body(data, self.compression_level)
        if parent is None:
            return compress_framed(data, self.compression_level)
        return compress_framed(data, self.compression_level, parent, keep)

    def seal_chunk(self, chunk_id: str, body: bytes) -> bytes:
        """The blob to store for a chunk given its unsealed body (:meth:`chunk_body`, or
        any codec's body of its plaintext): ``encode_chunk`` without the compression,
        for a chunk stored in several repositories. Thread-safe."""
        return self.sealer.seal(body, chunk_id.encode()) if self.sealer else body

    @property
    def id_key(self) -> bytes:
        """What chunk ids depend on besides the content: the keyed hash's key when
        encrypted, else ``b""`` (repositories with equal ``id_key`` name chunks alike)."""
        return self.sealer.id_key if self.sealer else b""

    async def has_chunk(self, chunk_id: str) -> bool:
        """Whether a chunk with this id is stored. ``ValueError`` for a malformed id."""
        return await self.driver.exists(chunk_key(chunk_id))

    async def store_chunk(self, chunk_id: str, blob: bytes) -> None:
        """Store the blob of a chunk (from ``encode_chunk``) under its id.

        Idempotent: storing an id again replaces the blob with one of the same plaintext.
        Durable on return. ``ValueError`` for a malformed id.
        """
        await self.driver.put(chunk_key(chunk_id), blob)

    async def read_chunk(self, chunk_id: str) -> bytes:
        """The stored blob of a chunk, undecoded (``decode_chunk`` turns it into the
        plaintext, on a thread pool if the caller likes).

        ``NotFoundError`` if there is no such chunk; ``ValueError`` for a malformed id.
        """
        return await self.driver.get(chunk_key(chunk_id))

    async def load_chunk(self, chunk_id: str, verify: bool = True) -> bytes:
        """The plaintext of a chunk, checked against its id (``read_chunk`` +
        ``decode_chunk``). ``NotFoundError`` if missing, ``CorruptChunkError`` if bad."""
        return self.decode_chunk(chunk_id, await self.read_chunk(chunk_id), verify)

    def decode_chunk(self, chunk_id: str, blob: bytes, verify: bool = True) -> bytes:
        """The plaintext of a chunk's blob, checked against its id unless ``verify`` is
        false. ``CorruptChunkError`` for a blob that does not decode (truncated, altered,
        wrong key) or whose content does not hash to ``chunk_id``. Thread-safe."""
        try:
            data = decode_blob(blob, self.sealer, chunk_id.encode(), self.chunk_size)
        except (BlobError, crypto.CryptoError) as exc:
            raise CorruptChunkError(chunk_id, str(exc)) from None
        if verify and self.chunk_id(data) != chunk_id:
            raise CorruptChunkError(chunk_id, "content does not match its hash")
        return data

    def decode_chunk_into(
        self, chunk_id: str, blob: bytes, out: bytearray, verify: bool = True
    ) -> int:
        """:meth:`decode_chunk` into the buffer ``out`` (its start): the plaintext's length
        (``codec.decode_blob_into``). ``CorruptChunkError`` as :meth:`decode_chunk`, and
        for a plaintext longer than ``out``. Thread-safe."""
        try:
            size = decode_blob_into(blob, self.sealer, chunk_id.encode(), out)
        except (BlobError, crypto.CryptoError) as exc:
            raise CorruptChunkError(chunk_id, str(exc)) from None
        if verify and self.chunk_id(memoryview(out)[:size]) != chunk_id:
            raise CorruptChunkError(chunk_id, "content does not match its hash")
        return size

    def decode_chunk_records_into(
        self, chunk_id: str, blob: bytes, out: bytearray
    ) -> tuple[int, list[memoryview] | None]:
        """:meth:`decode_chunk_into` (always verified), also returning the blob's records
        when it is framed with ``codec.FRAME_SIZE`` frames (else ``None``): each record
        then provably decodes to its frame of the checked plaintext, so a chunk that
        shares that frame may copy the record (:meth:`chunk_body`) instead of compressing
        it again. ``CorruptChunkError`` as :meth:`decode_chunk_into`. Thread-safe."""
        aad = chunk_id.encode()
        try:
            body = self.sealer.open(blob, aad) if self.sealer else blob
            size = decode_blob_into(body, None, aad, out)
            records = None
            if body[:1] == bytes([FRAMED]):
                frame, found = framed_records(body)
                records = found if frame == FRAME_SIZE else None
        except (BlobError, crypto.CryptoError) as exc:
            raise CorruptChunkError(chunk_id, str(exc)) from None
        if self.chunk_id(memoryview(out)[:size]) != chunk_id:
            raise CorruptChunkError(chunk_id, "content does not match its hash")
        return size, records

    async def quarantine_chunk(self, chunk_id: str) -> bool:
        """Move a chunk that is proven damaged out of the way, to ``quarantine_key``
        (``chunks/ab/<id>.bad``), so that ``has_chunk`` is false and the next backup
        that has its data stores it again (which heals every point naming it: content
        addressing). Returns whether it did.

        Proof: the chunk is read again here and must fail ``decode_chunk``
        (``CorruptChunkError``); a chunk that is missing, or that reads back good (a
        backup stored it again meanwhile, or the first read was bad on the way), is left
        alone (``False``). Drivers have no rename: the blob is copied to the quarantine
        key and read back equal before the chunk's own key is deleted, so a failure at
        any step leaves at least one copy (never none). Storage errors propagate (a
        ``TransientError`` before the delete leaves the chunk where it was).
        ``ValueError`` for a malformed id.
        """
        key = chunk_key(chunk_id)
        try:
            blob = await self.driver.get(key)
        except NotFoundError:
            return False
        try:
            self.decode_chunk(chunk_id, blob)
            return False
        except CorruptChunkError:
            pass
        bad = quarantine_key(chunk_id)
        await self.driver.put(bad, blob)
        if await self.driver.get(bad) != blob:
            raise RepositoryError(f"{bad}: the quarantined copy does not read back equal")
        try:
            current = await self.driver.get(key)
        except NotFoundError:
            return True
        if current != blob:  # replaced meanwhile (store_chunk): keep a good copy
            try:
                self.decode_chunk(chunk_id, current)
                return False
            except CorruptChunkError:
                pass
        with contextlib.suppress(NotFoundError):
            await self.driver.delete(key)
        return True

    async def store_bytes(self, data: bytes | bytearray | memoryview) -> list[str]:
        """Store ``data`` as chunks of ``chunk_size`` bytes (the last may be shorter; none
        for empty data) and return their ids in order. Chunks already stored are not
        written again; each is durable on return. For small files (a VM's state files);
        disks go through the workers."""
        view = memoryview(data)
        ids = []
        for start in range(0, len(view), self.chunk_size):
            piece = view[start : start + self.chunk_size]
            chunk_id = self.chunk_id(piece)
            if not await self.has_chunk(chunk_id):
                await self.store_chunk(chunk_id, self.encode_chunk(chunk_id, piece))
            ids.append(chunk_id)
        return ids

    async def load_bytes(self, chunk_ids: list[str], size: int) -> bytes:
        """The bytes :meth:`store_bytes` stored as ``chunk_ids``, each chunk checked
        against its id. ``NotFoundError`` for a missing chunk, ``CorruptChunkError`` for a
        bad one or when they do not add up to ``size`` bytes."""
        data = b"".join([await self.load_chunk(chunk_id) for chunk_id in chunk_ids])
        if len(data) != size:
            last = chunk_ids[-1] if chunk_ids else "(none)"
            raise CorruptChunkError(last, f"{len(data)} bytes in all, expected {size}")
        return data

    async def all_chunk_ids(self) -> AsyncIterator[str]:
        async for key in self.driver.list(CHUNKS_PREFIX):
            name = key.rsplit("/", 1)[-1]
            try:
                yield check_id(name)
            except ValueError:
                continue

    # -- restore points ---------------------------------------------------------------

    async def commit(
        self, point: RestorePoint, manifests: list[DiskManifest], domain_xml: str
    ) -> None:
        """Write a restore point: manifests and domain XML, then ``backup.json`` last.

        The chunks of ``point.files`` (:meth:`store_bytes`) must be stored before."""
        vm, ts = point.vm_name, point.timestamp
        for manifest in manifests:
            key = manifest_key(vm, ts, manifest.target)
            await self.driver.put(key, self._encode_object(key, msgspec.json.encode(manifest)))
        xml_key = xml_path(vm, ts)
        await self.driver.put(xml_key, self._encode_object(xml_key, domain_xml.encode()))
        await self.driver.put(record_key(vm, ts), msgspec.json.encode(point))

    def _encode_object(self, key: str, data: bytes) -> bytes:
        return encode_blob(data, self.sealer, key.encode(), self.compression_level)

    async def _load_object(self, key: str, limit: int) -> bytes:
        """The plaintext of object ``key``, at most ``limit`` bytes: a blob that claims
        more (a 1 KiB zstd frame can claim 1 TiB, allocated before decoding) is a
        ``RepositoryError``, not a ``MemoryError`` or gigabytes of memory."""
        blob = await self.driver.get(key)
        try:
            return decode_blob(blob, self.sealer, key.encode(), limit)
        except (BlobError, crypto.CryptoError) as exc:
            raise RepositoryError(f"{key}: {exc}") from None

    async def restore_points(self, vm: str | None = None) -> list[RestorePoint]:
        """Every complete, readable restore point, oldest first (``scan_points(vm).points``).

        Records that exist but cannot be read are left out here: code that decides what
        is referenced (garbage collection, statistics, listings) calls ``scan_points`` and
        handles ``unreadable`` itself."""
        return (await self.scan_points(vm)).points

    async def scan_points(self, vm: str | None = None) -> PointScan:
        """Every restore point record (``backup.json``) under ``vms/`` (of ``vm`` only when
        given: none for a name no point can have), split into ``points`` (read, sorted by
        VM name then timestamp) and ``unreadable`` (records that exist but do not decode,
        or name a VM or time whose folder is not the one they are in).

        A missing record (a point not committed yet, or one being deleted: its record
        goes first) is no point at all; a record that exists but cannot be read is one
        whose content is unknown, so callers must assume it names any chunk.

        A record counts only where its own ``vmName`` and ``timestamp`` put it (ASCII case
        aside: a case-insensitive destination may list ``vms/web1/`` for ``Web1``'s
        folder), so that every listed point's ``xml_path`` names that same record, and
        the points of ``Web1`` and ``web1`` sharing one folder stay apart. Storage errors
        other than ``NotFoundError`` propagate.
        """
        scan = PointScan()
        try:
            prefix = vm_prefix(vm) if vm else POINTS_PREFIX
        except ValueError:
            return scan
        async for key in self.driver.list(prefix):
            if not key.endswith("/backup.json"):
                continue
            try:
                raw = await self.driver.get(key)
            except NotFoundError:
                continue
            try:
                point = msgspec.json.decode(raw, type=RestorePoint)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                scan.unreadable.append(UnreadableRecord(key, f"does not decode: {exc}"))
                continue
            try:
                home = record_key(point.vm_name, point.timestamp)
            except ValueError as exc:
                scan.unreadable.append(UnreadableRecord(key, f"names no valid point: {exc}"))
                continue
            if home.lower() != key.lower():
                scan.unreadable.append(
                    UnreadableRecord(
                        key, f"names {point.vm_name} {point.timestamp}, whose record is {home}"
                    )
                )
                continue
            if vm is None or point.vm_name == vm:
                scan.points.append(point)
        scan.points.sort(key=lambda p: (p.vm_name, p.timestamp))
        scan.unreadable.sort(key=lambda u: u.key)
        return scan

    async def restore_point(self, xml_path: str) -> RestorePoint:
        """The restore point named by ``xmlPath``. ``ValueError`` for a path outside the
        repository's layout, ``NotFoundError`` if it does not exist (or is incomplete, or
        its record names another VM or time: ``vms/web1/...`` read on a case-insensitive
        destination may find ``Web1``'s record, and a hashed folder (a long name's) holds
        only the points of the names whose segment it is)."""
        segment, ts = parse_xml_key(xml_path)
        key = segment_record_key(segment, ts)
        raw = await self.driver.get(key)
        try:
            point = msgspec.json.decode(raw, type=RestorePoint)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RepositoryError(f"{key}: {exc}") from None
        try:
            found = (vm_segment(point.vm_name), point.timestamp)
        except ValueError:
            found = None
        if found != (segment, ts):
            raise NotFoundError(key, f"no restore point {xml_path}")
        return point

    async def manifest(self, point: RestorePoint, target: str) -> DiskManifest:
        """The manifest of the point's disk ``target``. ``NotFoundError`` if missing,
        ``RepositoryError`` if it does not decode (or is not a manifest)."""
        key = manifest_key(point.vm_name, point.timestamp, target)
        sizes = [d.size for d in point.disks if d.target == target]
        limit = (
            MANIFEST_BASE_BYTES + MANIFEST_CHUNK_BYTES * chunk_count(max(sizes), self.chunk_size)
            if sizes
            else 0
        )
        raw = await self._load_object(key, limit)
        try:
            return msgspec.json.decode(raw, type=DiskManifest)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RepositoryError(f"{key}: {exc}") from None

    async def domain_xml(self, point: RestorePoint) -> str:
        return (await self._load_object(point.xml_path, DOMAIN_XML_MAX_BYTES)).decode()

    async def delete_point(self, point: RestorePoint) -> list[str]:
        """Delete a restore point; returns the keys removed, in the order they were.

        ``backup.json`` goes first, so the point disappears from every listing at once
        (a point exists exactly while its record does); then its manifests, its
        ``domain.xml``, its sidecars (``point.json``, ``verify.json``) and whatever else
        is left in its folder, and the folder where the destination keeps folders as
        objects of their own (``FolderRemover``: Google Drive; the filesystem and SFTP
        drivers remove emptied folders as they delete). Chunks are never deleted here
        (other points share them; only garbage collection removes chunks). Idempotent: a
        step cut short is finished by deleting again (the folder's objects are found by
        listing it); a point whose record is already gone is cleaned up the same way.
        Checking that nothing needs the point (protected, in use) is the caller's job.
        ``ValueError`` for a name or timestamp no key can hold; storage errors pass
        through.
        """
        vm, ts = point.vm_name, point.timestamp
        record = record_key(vm, ts)
        await self.driver.delete(record)
        keys = [manifest_key(vm, ts, disk.target) for disk in point.disks]
        keys.append(xml_path(vm, ts))
        keys += [f"{point_prefix(vm, ts)}/{name}" for name in ("point.json", "verify.json")]
        for key in keys:
            await self.driver.delete(key)
        folder = f"{point_prefix(vm, ts)}/"
        rest = [key async for key in self.driver.list(folder) if key not in keys]
        if rest:
            await self.driver.delete_many(rest)
        if isinstance(self.driver, FolderRemover):  # Drive: the emptied folder is an object
            await self.driver.remove_empty_folder(folder)
        return [record, *keys, *rest]

    async def new_timestamp(self, vm: str) -> str:
        """Now as a restore point timestamp (``2026-01-30T12-00-00``, UTC), a second later
        while a point of ``vm`` already has it.

        Timestamps have one-second resolution, and two points of a VM must not share one:
        the second commit would replace the first point's record. The caller serialises
        the backups of one VM, so nothing else takes the timestamp meanwhile.
        """
        moment = datetime.now(UTC).replace(microsecond=0)
        while True:
            timestamp = moment.strftime("%Y-%m-%dT%H-%M-%S")
            if not await self.driver.exists(record_key(vm, timestamp)):
                return timestamp
            moment += timedelta(seconds=1)


def _sealer(config: RepositoryConfig, passphrase: str | None) -> crypto.Sealer | None:
    enc = config.encryption
    if enc is None:
        return None
    if not passphrase:
        raise RepositoryError("this repository is encrypted: a passphrase is required")
    kek = crypto.derive_kek(
        passphrase, base64.b64decode(enc.kdf.salt), enc.kdf.n, enc.kdf.r, enc.kdf.p
    )
    try:
        data_key = crypto.unwrap_key(enc.cipher, kek, base64.b64decode(enc.wrapped_key))
    except crypto.CryptoError as exc:
        raise RepositoryError(str(exc)) from None
    return crypto.Sealer(enc.cipher, data_key)
