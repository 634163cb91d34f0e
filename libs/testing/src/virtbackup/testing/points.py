"""Small restore points written straight into a filesystem repository.

A real repository (``virtbackup.repository``) with real chunks, for tests and
benchmarks that need a restore point without backing up a VM (sanity jobs, job
history, tracing).
"""

from __future__ import annotations

import os
from pathlib import Path

from virtbackup.repository.format import manifest_key
from virtbackup.repository.records import DiskManifest, DiskRecord, RestorePoint
from virtbackup.repository.repository import Repository
from virtbackup.storage.filesystem import FilesystemDriver


async def write_point(destination: Path, vm: str = "vm1", chunks: int = 3) -> str:
    """A complete, unencrypted restore point of ``vm`` (one disk ``vda`` of ``chunks``
    distinct random chunks) in the filesystem destination at ``destination`` (the
    directory a destination's ``path`` names; it must exist). Returns its ``xmlPath``."""
    repo = await Repository.open_or_create(FilesystemDriver(destination / "VirtBackup"))
    try:
        ids: list[str | None] = []
        for _ in range(chunks):
            data = os.urandom(64 << 10) * 16
            chunk_id = repo.chunk_id(data)
            await repo.store_chunk(chunk_id, repo.encode_chunk(chunk_id, data))
            ids.append(chunk_id)
        ts = await repo.new_timestamp(vm)
        size = chunks * repo.chunk_size
        manifest = DiskManifest(
            target="vda", size=size, chunk_size=repo.chunk_size, format="qcow2",
            source_path=f"/x/{vm}-vda.qcow2", chunks=ids,
        )  # fmt: skip
        point = RestorePoint(
            vm_name=vm, timestamp=ts, source_server_id="local", source_server_name="Local",
            kind="full", created_at="2026-01-30T12:00:00Z",
            disks=[DiskRecord(
                target="vda", basename=f"{vm}-vda.qcow2", path=f"/x/{vm}-vda.qcow2",
                format="qcow2", size=size, manifest=manifest_key(vm, ts, "vda"),
            )],
        )  # fmt: skip
        await repo.commit(point, [manifest], f"<domain><name>{vm}</name></domain>")
        return point.xml_path
    finally:
        await repo.close()
