"""Manifests and restore point records."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from virtbackup.repository import format as layout


class DiskManifest(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Every chunk of one disk, in order: a chunk id, or ``None`` for an all-zero chunk.

    Chunk ``i`` covers bytes ``[i * chunk_size, min((i + 1) * chunk_size, size))``.
    """

    target: str
    size: int
    chunk_size: int
    format: str
    source_path: str
    chunks: list[str | None]


class DiskRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    target: str
    basename: str
    path: str
    format: str
    size: int
    manifest: str
    stored_chunks: int = 0
    zero_chunks: int = 0


class StateFileRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """One file or directory of the VM's state that is not a disk (UEFI NVRAM, a writable
    loader, the TPM emulator's state), as it was when the backup began.

    ``role`` names the kind of state (``nvram``, ``loader``, ``tpm``): a restore puts it
    where the restored domain XML keeps that role, ``relative`` below it (``""`` for the
    location itself). ``path`` is where it was. ``mode`` is the permission bits as four
    octal digits (``"0600"``); ``owner`` and ``group`` are names (or numbers where the
    host had no name). A file's content is ``chunks`` (repository chunks, in order,
    ``size`` bytes together; every chunk is ``chunkSize`` bytes but the last).
    """

    role: str
    path: str
    relative: str = ""
    kind: Literal["file", "dir"] = "file"
    size: int = 0
    mode: Annotated[str, msgspec.Meta(pattern=r"^[0-7]{4}$")]
    owner: str
    group: str
    chunks: list[str] = msgspec.field(default_factory=list)


class RestorePoint(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``backup.json``: written last, so a restore point exists only once complete."""

    format: int = 1
    vm_name: str
    timestamp: str
    status: Literal["complete"] = "complete"
    source_server_id: str
    source_server_name: str
    kind: Literal["full", "incremental"]
    checkpoint: str | None = None
    parent_checkpoint: str | None = None
    parent_timestamp: str | None = None
    disks: list[DiskRecord]
    created_at: str
    duration_seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    job_id: str | None = None
    #: The VM's state files (absent in points made before they were backed up).
    files: list[StateFileRecord] = msgspec.field(default_factory=list)

    @property
    def xml_path(self) -> str:
        """The agent API's ``xmlPath`` of this point (``vms/<vm>/<timestamp>/domain.xml``)."""
        return layout.xml_path(self.vm_name, self.timestamp)


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size
