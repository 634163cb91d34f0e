"""Per-VM state files (UEFI NVRAM, writable loaders, TPM state): backing them up and
putting them back, between the job-orchestrator and the inventory.

Backup: ``STATE_SNAPSHOT`` copies the VM's state aside on its host (the state at this
moment) and lists it; ``STATE_READ`` reads the copies in pieces of at most
:data:`MAX_PIECE` bytes; ``STATE_RELEASE`` removes the copies.

Restore: ``STATE_PREPARE`` finds where the domain XML that will be defined keeps each
role's state and builds the saved trees beside it under temporary names
(``<path>.vbrestore-<job>``), with owners and modes, files empty; ``STATE_WRITE`` fills
the files in pieces; ``RESTORE_FINISH`` moves them into place with the disks (or removes
them).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from virtbackup.contracts.v1.common import Message, ServerId, VmName
from virtbackup.contracts.v1.readable import described

#: The most bytes one ``STATE_READ`` or ``STATE_WRITE`` carries. On the wire they are
#: base64 in JSON (4/3 of the size): about 342 KiB, well under NATS' default maximum
#: payload of 1 MiB, which neither the embedded nor the deployed nats-server changes.
MAX_PIECE: Final = 256 * 1024

#: A job id as it may appear in a path on a host.
JOB_ID_PATTERN: Final = described(
    r"^[A-Za-z0-9_-]+(?![\s\S])", "a job id (letters, digits, '_' and '-')"
)
JobId = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=JOB_ID_PATTERN)]
Offset = Annotated[int, msgspec.Meta(ge=0)]
PieceLength = Annotated[int, msgspec.Meta(ge=0, le=MAX_PIECE)]
Piece = Annotated[bytes, msgspec.Meta(max_length=MAX_PIECE)]
Mode = Annotated[int, msgspec.Meta(ge=0, le=0o7777)]
Path = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=4096,
        pattern=described(r"^/", "an absolute path (starting with '/')"),
    ),
]


class StateSnapshotRequest(Message, frozen=True, kw_only=True):
    """Copy the VM's state files aside for ``job_id`` (a new copy replaces an earlier
    one of the job) and list them."""

    server_id: ServerId
    vm_name: VmName
    job_id: JobId


class StateFile(Message, frozen=True, kw_only=True):
    """One file or directory of a VM's state.

    ``role`` is the kind of state (``nvram``, ``loader``, ``tpm``); ``path`` where it is
    on the host; ``relative`` its path below the role's location (``""`` for the
    location itself, e.g. ``tpm2/tpm2-00.permall`` in a TPM's directory); ``mode`` the
    permission bits; ``owner`` and ``group`` names (numbers where the host has none);
    ``size`` bytes (0 for a directory). ``source`` is the copy to read (snapshots only).
    """

    role: str
    path: str
    relative: str = ""
    kind: Literal["file", "dir"] = "file"
    size: int = 0
    mode: Mode
    owner: str
    group: str
    source: str = ""


class StateSnapshot(Message, frozen=True, kw_only=True):
    """The VM's state files, locations first then what is below them; empty when the VM
    has none (or libvirt has not created it yet)."""

    files: list[StateFile] = msgspec.field(default_factory=list)


class StateReadRequest(Message, frozen=True, kw_only=True):
    """Read bytes ``[offset, offset + length)`` of a snapshot copy (``StateFile.source``
    of this job's snapshot; anything else is a bad request)."""

    server_id: ServerId
    job_id: JobId
    path: Path
    offset: Offset = 0
    length: PieceLength = MAX_PIECE


class StatePiece(Message, frozen=True, kw_only=True):
    """The bytes read: fewer than asked only at the end of the file."""

    data: bytes


class StateReleaseRequest(Message, frozen=True, kw_only=True):
    """Remove the job's snapshot copies (idempotent)."""

    server_id: ServerId
    job_id: JobId


class StatePrepareRequest(Message, frozen=True, kw_only=True):
    """Build the saved state files beside where ``domain_xml`` (the XML the restore
    defines) keeps each role's state: ``files`` as a backup's snapshot listed them
    (``path`` and ``source`` are ignored: the target is found by role). Roles the XML
    does not reference are skipped. With ``vm_name`` other than the XML's name, the XML
    is first rewritten for that name as the restore's commit will define it (a new UUID
    and NVRAM path derived from ``job_id``)."""

    server_id: ServerId
    job_id: JobId
    domain_xml: str
    files: list[StateFile]
    vm_name: str = ""
    #: The UUID the restored domain gets (``RestoreFinishRequest.uuid``; empty: as
    #: the finish derives it).
    uuid: str = ""
    #: Build only roles whose place is empty (a restore that only defines the domain
    #: puts back missing state, never replaces state that is there); the others are
    #: named in ``StatePrepared.kept``.
    only_missing: bool = False


class StagedState(Message, frozen=True, kw_only=True):
    """A role's state built under ``temp_path``, to be moved to ``path`` (a file or a
    directory, ``kind``) when the restore commits."""

    role: str
    path: str
    temp_path: str
    kind: Literal["file", "dir"] = "file"
    #: Whether the commit replaces state found at ``path`` (false: it moves the staged
    #: tree there only while nothing is there, else removes it).
    replace: bool = True


class StatePrepared(Message, frozen=True, kw_only=True):
    staged: list[StagedState] = msgspec.field(default_factory=list)
    #: Roles of the saved state that the domain XML does not reference (not restored).
    skipped: list[str] = msgspec.field(default_factory=list)
    #: Roles left as they are on the host (``only_missing``: their place holds state).
    kept: list[str] = msgspec.field(default_factory=list)


class StateWriteRequest(Message, frozen=True, kw_only=True):
    """Write ``data`` at ``offset`` into a file of a staged tree of this job (below a
    ``StagedState.temp_path``; anything else is a bad request)."""

    server_id: ServerId
    job_id: JobId
    path: Path
    offset: Offset = 0
    data: Piece
