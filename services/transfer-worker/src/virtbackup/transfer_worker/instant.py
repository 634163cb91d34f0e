"""Instant access: this worker serves one disk of a restore point over NBD, read-only.

``vb.cmd.worker.serve-export`` (one worker of the queue group takes it) names a
``starting`` record of ``VB_EXPORTS`` (see ``virtbackup.contracts.v1.exports``). The
worker opens the destination's repository, reads the point's manifest of that disk,
makes the export's certificates (``instant_pki``: a CA of its own, the server's and the
user's client certificate), starts an :class:`~virtbackup.nbd.server.NbdServer` on
``VIRTBACKUP_INSTANT_BIND`` (a port of ``VIRTBACKUP_INSTANT_PORTS``, or any free one),
then marks the record ``active`` by compare-and-swap. A record changed meanwhile (the
export was stopped while starting) makes it close again and answer ``Conflict``.

Reads are decoded on demand: each chunk the manifest names is read from the destination,
checked against its hash and decompressed (decrypted) on the worker's thread pool; the
last :data:`CACHE_CHUNKS` decoded chunks are kept (least recently used out), and a chunk
that several requests want at once is read once. All-zero chunks are never read: they
are holes in reads and ``hole,zero`` in ``base:allocation``.

An export ends, closing its listener and every connection:

* at ``expiresAt`` (the record becomes ``expired``);
* when its record says ``stopping`` (written by the orchestrator's stop: the record
  becomes ``stopped``), or any ended state, or is deleted; the worker follows the bucket;
* when the worker stops (the record becomes ``failed``, naming the worker). A worker
  that is killed cannot say so: the orchestrator finds its heartbeat in ``VB_WORKERS``
  gone and lists the export as ``failed``; a worker that starts again under the same
  name marks its predecessor's exports ``failed`` when it loads the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import random
import socket
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import WorkerCmd
from virtbackup.contracts.v1.exports import (
    LIVE_EXPORT_STATES,
    ExportCreated,
    ExportServeRequest,
    ExportState,
    ExportTls,
    InstantExport,
)
from virtbackup.nbd import STATE_HOLE, STATE_ZERO, Extent
from virtbackup.nbd.server import Export, NbdServer, Segment, SourceError
from virtbackup.nbd.tls import server_context
from virtbackup.repository.destinations import open_repository
from virtbackup.repository.records import DiskManifest
from virtbackup.repository.repository import CorruptChunkError, Repository, RepositoryError
from virtbackup.runtime.agent_config import (
    find_destination,
    read_agent_config,
    update_gdrive_settings,
)
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.commands import Commands
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound, Unavailable
from virtbackup.runtime.service import ServiceContext
from virtbackup.runtime.vault import resolve_destination, service_box
from virtbackup.storage.errors import NotFoundError, StorageError
from virtbackup.storage.google_auth import GoogleTokens
from virtbackup.transfer_worker.instant_pki import ClientKeyError, issue_export_credentials

log = logging.getLogger(__name__)

#: Decoded chunks kept per export (4 MiB each with the default chunk size).
CACHE_CHUNKS: Final = 8
#: Compare-and-swap attempts on a record before giving up.
MAX_CAS_ATTEMPTS: Final = 50

_decoder = msgspec.json.Decoder(InstantExport)
_encoder = msgspec.json.Encoder()


def parse_time(value: str) -> dt.datetime:
    """An ISO 8601 time of a record (``...Z``) as an aware datetime."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def parse_ports(spec: str) -> list[int]:
    """``VIRTBACKUP_INSTANT_PORTS``: ``first-last`` (or one port) as a list; ``[]`` for
    any free port. ValueError for anything else."""
    spec = spec.strip()
    if not spec:
        return []
    first, _, last = spec.partition("-")
    low, high = int(first), int(last or first)
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"VIRTBACKUP_INSTANT_PORTS: bad range {spec!r}")
    return list(range(low, high + 1))


def advertised_host(bind: str, host: str | None) -> str:
    """The host clients dial: ``host`` when set, else the bind address unless it is a
    wildcard, else this machine's name."""
    if host:
        return host
    if bind in ("", "0.0.0.0", "::"):
        return socket.getfqdn()
    return bind


# --- the bytes of an export ----------------------------------------------------------


class ChunkCache:
    """Decoded chunks of one repository, the last ``capacity`` used kept in memory.

    A chunk being loaded is loaded once for every request that wants it (a task of its
    own, so that a request that goes away does not cancel the others' load)."""

    def __init__(self, repo: Repository, executor: Executor, capacity: int = CACHE_CHUNKS):
        self.repo = repo
        self.executor = executor
        self.capacity = capacity
        self._chunks: OrderedDict[str, bytes] = OrderedDict()
        self._loading: dict[str, asyncio.Task[bytes]] = {}
        #: Chunks read from the destination (for tests and logs).
        self.loads = 0

    async def get(self, chunk_id: str) -> bytes:
        """The plaintext of ``chunk_id``. Raises SourceError when it is missing, corrupt
        or the destination cannot be read."""
        data = self._chunks.get(chunk_id)
        if data is not None:
            self._chunks.move_to_end(chunk_id)
            return data
        task = self._loading.get(chunk_id)
        if task is None:
            task = asyncio.create_task(self._load(chunk_id), name=f"chunk-{chunk_id[:12]}")
            self._loading[chunk_id] = task
            task.add_done_callback(lambda _: self._loading.pop(chunk_id, None))
        return await asyncio.shield(task)

    async def _load(self, chunk_id: str) -> bytes:
        self.loads += 1
        loop = asyncio.get_running_loop()
        try:
            blob = await self.repo.read_chunk(chunk_id)
            data = await loop.run_in_executor(self.executor, self.repo.decode_chunk, chunk_id, blob)
        except NotFoundError:
            raise SourceError(f"chunk {chunk_id} is missing from the destination") from None
        except (CorruptChunkError, RepositoryError, StorageError, ValueError) as exc:
            raise SourceError(f"chunk {chunk_id}: {exc}") from None
        self._chunks[chunk_id] = data
        while len(self._chunks) > self.capacity:
            self._chunks.popitem(last=False)
        return data

    def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        self._chunks.clear()


class ManifestSource:
    """A disk of a restore point as an NBD export source (``ExportSource``)."""

    def __init__(self, manifest: DiskManifest, cache: ChunkCache) -> None:
        self.manifest = manifest
        self.cache = cache

    @property
    def size(self) -> int:
        return self.manifest.size

    async def read(self, offset: int, length: int) -> Sequence[Segment]:
        size, cs, chunks = self.manifest.size, self.manifest.chunk_size, self.manifest.chunks
        end = offset + length
        first, last = offset // cs, (end - 1) // cs
        wanted = {cid for cid in chunks[first : last + 1] if cid is not None}
        ids = list(wanted)
        loaded = dict(
            zip(ids, await asyncio.gather(*(self.cache.get(i) for i in ids)), strict=True)
        )
        out: list[Segment] = []
        for index in range(first, last + 1):
            start = index * cs
            lo, hi = max(offset, start), min(end, start + cs)
            cid = chunks[index] if index < len(chunks) else None
            if cid is None:
                if out and out[-1].data is None:
                    prev = out[-1]
                    out[-1] = Segment(prev.offset, prev.length + hi - lo, None)
                else:
                    out.append(Segment(lo, hi - lo, None))
                continue
            data = loaded[cid]
            if len(data) != min(cs, size - start):
                raise SourceError(f"chunk {cid} holds {len(data)} bytes, expected another size")
            out.append(Segment(lo, hi - lo, memoryview(data)[lo - start : hi - start]))
        return out

    def allocation(self, offset: int, length: int) -> Sequence[Extent]:
        cs, chunks = self.manifest.chunk_size, self.manifest.chunks
        first, last = offset // cs, (offset + length - 1) // cs
        out = []
        for index in range(first, last + 1):
            start = index * cs
            zero = index >= len(chunks) or chunks[index] is None
            flags = STATE_HOLE | STATE_ZERO if zero else 0
            out.append(Extent(start, min(cs, self.manifest.size - start), flags))
        return out


# --- records -----------------------------------------------------------------------


async def read_record(kv: KeyValue, export_id: str) -> tuple[InstantExport, int] | None:
    """The record and its revision; None when there is none (or it was deleted)."""
    try:
        entry = await kv.get(export_id)
    except KeyNotFoundError:
        return None
    if entry.value is None:
        return None
    return _decoder.decode(entry.value), entry.revision or 0


async def change_record(
    kv: KeyValue, export_id: str, change: Callable[[InstantExport], InstantExport | None]
) -> InstantExport | None:
    """Apply ``change`` by compare-and-swap; it returns None to leave the record alone.
    Returns what was written (or None: nothing was)."""
    for _ in range(MAX_CAS_ATTEMPTS):
        found = await read_record(kv, export_id)
        if found is None:
            return None
        record, revision = found
        updated = change(record)
        if updated is None:
            return None
        try:
            await kv.update(export_id, _encoder.encode(updated), last=revision)
        except KeyWrongLastSequenceError:
            continue
        return updated
    raise RuntimeError(f"export {export_id}: {MAX_CAS_ATTEMPTS} concurrent updates in a row")


def ended(record: InstantExport, state: ExportState, message: str) -> InstantExport | None:
    """``record`` ended in ``state`` (None when it has already ended)."""
    if record.state not in LIVE_EXPORT_STATES:
        return None
    return msgspec.structs.replace(
        record,
        state=state,
        message=message,
        ended_at=utcnow_iso(),
    )


# --- serving -----------------------------------------------------------------------


@dataclass(eq=False)
class Served:
    """An export this worker serves."""

    id: str
    server: NbdServer
    repo: Repository
    cache: ChunkCache
    expiry: asyncio.Task[None] | None = None


@dataclass
class InstantExports:
    """The exports this worker serves, and the bucket it follows to end them."""

    ctx: ServiceContext
    #: This worker's key in ``VB_WORKERS`` (see the service's heartbeat).
    worker: str
    executor: Executor | None = None
    served: dict[str, Served] = field(default_factory=dict)
    #: Exports being started now (each holds a slot of ``instant_max_per_worker``).
    starting: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def kv(self) -> KeyValue:
        return self.ctx.bucket(buckets.EXPORTS)

    # -- starting ---------------------------------------------------------------------

    async def serve(self, req: ExportServeRequest) -> ExportCreated:
        """Serve the ``starting`` export ``req.id``; see the module docstring.

        NotFound: no such record, or its point or disk is gone from the destination.
        Conflict: the record is not ``starting`` (stopped meanwhile) or has expired, or
        this worker serves (or starts) ``instant_max_per_worker`` exports already (the
        record stays ``starting``: another worker may take it). BadRequest: the client
        public key is unusable. Unavailable: the destination or the listening address
        cannot be used now."""
        cap = self.ctx.settings.instant_max_per_worker
        async with self._lock:
            if len(self.served) + self.starting >= cap:
                raise Conflict(
                    f"transfer worker {self.worker} serves its cap of {cap} instant-access "
                    "exports (VIRTBACKUP_INSTANT_MAX_PER_WORKER): stop one, or wait for one "
                    "to expire"
                )
            self.starting += 1
        try:
            return await self._serve(req)
        finally:
            async with self._lock:
                self.starting -= 1

    async def _serve(self, req: ExportServeRequest) -> ExportCreated:
        found = await read_record(self.kv, req.id)
        if found is None:
            raise NotFound(f"export {req.id} not found")
        record, _ = found
        if record.state != "starting":
            raise Conflict(f"export {req.id} is {record.state}, not starting")
        expires = parse_time(record.expires_at)
        if expires <= dt.datetime.now(dt.UTC):
            raise Conflict(f"export {req.id} expired before it started")
        bind = self.ctx.settings.instant_bind
        host = advertised_host(bind, self.ctx.settings.instant_host)
        names = [host]
        if bind not in ("", "0.0.0.0", "::") and bind != host:
            names.append(bind)
        try:
            creds = issue_export_credentials(
                export_id=record.id,
                client_public_key=req.client_public_key,
                server_names=names,
                not_after=expires,
            )
        except ClientKeyError as exc:
            raise BadRequest(str(exc)) from None
        repo, manifest = await self._open(record)
        cache = ChunkCache(repo, self._executor())
        served: Served | None = None
        try:
            description = (
                f"VirtBackup restore point {record.vm_name} {record.timestamp}, disk "
                f"{record.disk} (read-only, until {record.expires_at})"
            )
            export = Export(record.disk, ManifestSource(manifest, cache), description)
            tls = server_context(
                cert_pem=creds.server_cert_pem,
                key_pem=creds.server_key_pem,
                client_ca_pem=creds.ca_cert_pem,
            )
            fingerprint = creds.client_fingerprint
            server = NbdServer([export], tls=tls, allow_peer=only_certificate(fingerprint))
            port = await self._listen(server)
            served = Served(record.id, server, repo, cache)
            url = f"nbds://{_url_host(host)}:{port}/{quote(record.disk, safe='')}"

            def activate(current: InstantExport) -> InstantExport | None:
                if current.state != "starting":
                    return None
                return msgspec.structs.replace(
                    current,
                    state="active",
                    size=manifest.size,
                    nbd_url=url,
                    export_name=record.disk,
                    worker=self.worker,
                    worker_started_at=self.ctx.started_at,
                    client_fingerprint=fingerprint,
                )

            active = await change_record(self.kv, record.id, activate)
            if active is None:
                raise Conflict(f"export {record.id} was stopped while it started")
            async with self._lock:
                self.served[record.id] = served
                served.expiry = asyncio.create_task(
                    self._expire(record.id, expires), name=f"export-expiry-{record.id}"
                )
        except BaseException:
            if served is not None:
                await served.server.close()
            cache.close()
            with contextlib.suppress(StorageError):
                await repo.close()
            raise
        log.info(
            "serving export %s (%s %s %s) at %s until %s",
            record.id,
            record.vm_name,
            record.timestamp,
            record.disk,
            url,
            record.expires_at,
        )
        return ExportCreated(
            export=active,
            tls=ExportTls(
                ca_cert=creds.ca_cert_pem.decode(), client_cert=creds.client_cert_pem.decode()
            ),
        )

    def _executor(self) -> Executor:
        if self.executor is None:
            raise Unavailable("the transfer worker is starting; try again")
        return self.executor

    async def _open(self, record: InstantExport) -> tuple[Repository, DiskManifest]:
        cfg, _ = await read_agent_config(self.ctx.bucket(buckets.CONFIG))
        dest = find_destination(cfg, record.destination_id)
        where = f"destination {dest.id!r}"
        dest, google = await resolve_destination(self.ctx.bus, service_box(self.ctx), dest)
        try:
            repo = await open_repository(
                dest, cfg, create=False, on_refresh=self._store_tokens, google=google
            )
        except (StorageError, RepositoryError) as exc:
            raise Unavailable(f"{where} cannot be read: {exc}") from None
        try:
            point = await repo.restore_point(record.xml_path)
            return repo, await repo.manifest(point, record.disk)
        except NotFoundError:
            await repo.close()
            raise NotFound(
                f"restore point {record.xml_path} or its disk {record.disk} is gone from {where}"
            ) from None
        except (StorageError, RepositoryError, ValueError) as exc:
            await repo.close()
            raise Unavailable(f"{where}: {exc}") from None

    async def _store_tokens(self, tokens: GoogleTokens) -> None:
        await update_gdrive_settings(self.ctx.bucket(buckets.CONFIG), tokens.apply_to)

    async def _listen(self, server: NbdServer) -> int:
        settings = self.ctx.settings
        try:
            ports = parse_ports(settings.instant_ports)
        except ValueError as exc:
            raise Unavailable(str(exc)) from None
        if not ports:
            try:
                return (await server.start(settings.instant_bind, 0))[1]
            except OSError as exc:
                raise Unavailable(f"cannot listen on {settings.instant_bind}: {exc}") from None
        random.shuffle(ports)
        for port in ports:
            try:
                return (await server.start(settings.instant_bind, port))[1]
            except OSError:
                continue
        raise Unavailable(
            f"no free port in VIRTBACKUP_INSTANT_PORTS={settings.instant_ports} on "
            f"{settings.instant_bind}"
        )

    # -- ending -------------------------------------------------------------------------

    async def _close(self, export_id: str) -> bool:
        """Stop serving ``export_id`` (listener and connections); False if not served."""
        async with self._lock:
            served = self.served.pop(export_id, None)
        if served is None:
            return False
        if served.expiry is not None and served.expiry is not asyncio.current_task():
            served.expiry.cancel()
        await served.server.close()
        served.cache.close()
        with contextlib.suppress(StorageError):
            await served.repo.close()
        log.info("export %s closed", export_id)
        return True

    async def _expire(self, export_id: str, at: dt.datetime) -> None:
        delay = (at - dt.datetime.now(dt.UTC)).total_seconds()
        await asyncio.sleep(max(delay, 0.0))
        await self._close(export_id)
        await change_record(
            self.kv, export_id, lambda r: ended(r, "expired", "its lifetime is over")
        )

    async def follow(self) -> None:
        """Follow ``VB_EXPORTS`` for the life of the service (see the module docstring);
        a lost watch is opened again."""
        while not self.ctx.stopping.is_set():
            try:
                watcher = await self.kv.watchall()
                loaded = False
                try:
                    while True:
                        entry = await watcher.updates(timeout=None)  # type: ignore[no-untyped-call]
                        if entry is None:
                            loaded = True
                            continue
                        await self._on_entry(entry, loaded)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("following VB_EXPORTS failed; again in 1 s")
                await asyncio.sleep(1.0)

    async def _on_entry(self, entry: KeyValue.Entry, loaded: bool) -> None:
        export_id = entry.key
        if entry.operation in {"DEL", "PURGE"} or entry.value is None:
            await self._close(export_id)
            return
        try:
            record = _decoder.decode(entry.value)
        except msgspec.DecodeError:
            log.warning("undecodable export record %s", export_id)
            return
        if export_id in self.served:
            if record.state == "stopping":
                await self._close(export_id)
                await change_record(
                    self.kv, export_id, lambda r: ended(r, "stopped", "stopped on request")
                )
            elif record.state not in LIVE_EXPORT_STATES:
                await self._close(export_id)
        elif (
            not loaded
            and record.worker == self.worker
            and record.worker_started_at != self.ctx.started_at
            and record.state in LIVE_EXPORT_STATES
        ):
            # Served by an earlier process of this name, which is gone.
            await change_record(
                self.kv,
                export_id,
                lambda r: (
                    ended(r, "failed", f"the transfer worker {r.worker} stopped")
                    if r.worker_started_at == record.worker_started_at
                    else None
                ),
            )

    async def close_all(self) -> None:
        """Stop serving everything (the worker stops): each record becomes ``failed``."""
        for export_id in list(self.served):
            await self._close(export_id)
            with contextlib.suppress(Exception):
                await change_record(
                    self.kv,
                    export_id,
                    lambda r: ended(r, "failed", f"the transfer worker {self.worker} stopped"),
                )


def only_certificate(fingerprint: str) -> Callable[[bytes], bool]:
    """A peer check that lets in the one certificate whose SHA-256 (of its DER form, hex)
    is ``fingerprint``."""

    def allowed(der: bytes) -> bool:
        return hmac.compare_digest(hashlib.sha256(der).hexdigest(), fingerprint)

    return allowed


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


commands: Commands[InstantExports] = Commands()


@commands.handler(WorkerCmd.SERVE_EXPORT, ExportServeRequest)
async def serve_export(ix: InstantExports, req: ExportServeRequest) -> ExportCreated:
    """Serve a ``starting`` export (see :meth:`InstantExports.serve`)."""
    return await ix.serve(req)
