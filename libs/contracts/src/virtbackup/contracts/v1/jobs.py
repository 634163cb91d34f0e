"""Jobs: the state the job-orchestrator keeps in ``VB_JOBS`` and its commands."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from virtbackup.contracts.v1.common import (
    NAME_MAX_LENGTH,
    VM_NAME_PATTERN,
    Message,
    ServerId,
    VmName,
)
from virtbackup.contracts.v1.readable import described

JobType = Literal["backup", "restore", "sanity", "migration", "prune", "gc", "verify", "copy"]
JobState = Literal["queued", "running", "success", "failure", "canceled"]
#: Where a running job is. ``committing`` is the point of no return: from there on a
#: cancel is refused (409) and the job ends in what its commit did.
JobPhase = Literal["queued", "preparing", "transferring", "committing", "finished"]

TERMINAL_STATES: Final = frozenset({"success", "failure", "canceled"})
ACTIVE_STATES: Final = frozenset({"queued", "running"})


class Job(Message, frozen=True, kw_only=True):
    """A job as the agent API shows it, plus bookkeeping.

    ``bytes_transferred`` counts bytes read from or written to the VM's disks;
    ``physical_bytes`` counts bytes written to or read from the destination.
    """

    id: str
    type: JobType
    state: JobState
    message: str = ""
    total_units: int = 0
    completed_units: int = 0
    bytes_transferred: int = 0
    #: Bytes of the VM's disks the job reads or writes in all (0 until it knows).
    total_bytes: int = 0
    speed_bytes_per_sec: float = 0.0
    physical_bytes: int = 0
    physical_speed_bytes_per_sec: float = 0.0
    eta_seconds: float | None = None
    writer_backlog: int = 0
    server_id: str | None = None
    vm_name: str | None = None
    destination_id: str | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    #: What the job found or made (e.g. a sanity check's damaged chunks).
    result: dict[str, Any] = msgspec.field(default_factory=dict)
    created_at: str
    updated_at: str
    started_at: str | None = None
    finished_at: str | None = None
    phase: JobPhase = "queued"
    #: Set by a cancel; the job's runner stops at its next step and ends ``canceled``.
    cancel_requested: bool = False
    #: The orchestrator instance that runs the job (it holds the job's lease).
    owner: str | None = None


class JobListRequest(Message, frozen=True, kw_only=True):
    """List jobs, newest first, optionally filtered: at most ``limit`` (one page; a reply
    must fit in one bus message), only those older than the job ``before`` names (job
    ids sort by creation time) when it is set. A caller that wants every matching job
    asks again with ``before`` = the last id of a full page, until a page is short."""

    state: JobState | None = None
    type: JobType | None = None
    limit: int = 1000
    before: str | None = None


class JobList(Message, frozen=True, kw_only=True):
    jobs: list[Job]


class JobCounts(Message, frozen=True, kw_only=True):
    """``vb.cmd.job.counts`` (request ``common.Empty``): every job of the job store,
    counted by state (``total`` is their sum)."""

    total: int = 0
    queued: int = 0
    running: int = 0
    success: int = 0
    failure: int = 0
    canceled: int = 0


class JobGetRequest(Message, frozen=True, kw_only=True):
    id: str


class JobCancelRequest(Message, frozen=True, kw_only=True):
    id: str
    reason: str = "cancelled by user"


#: The most destinations one backup writes besides its own (``also_destination_ids``).
ALSO_DESTINATIONS_MAX: Final = 8


class BackupRequest(Message, frozen=True, kw_only=True):
    """``POST /servers/{id}/backup``: back up every disk of a VM.

    ``also_destination_ids``: more destinations written from the same read (the VM's
    disks are read once, each chunk is stored in every destination's own repository);
    the restore point is committed in each destination only once every chunk it names
    is durable there. Unknown ids, duplicates and ``destination_id`` itself are a 400
    naming ``alsoDestinationIds``. See docs/repository-format.md, "One read, several
    destinations", for what a failure of one destination does.
    """

    server_id: ServerId
    vm_name: VmName
    destination_id: str | None = None
    fresh: bool = False
    also_destination_ids: Annotated[list[str], msgspec.Meta(max_length=ALSO_DESTINATIONS_MAX)] = (
        msgspec.field(default_factory=list)
    )


#: A restore point's timestamp (UTC, ``YYYY-MM-DDTHH-MM-SS``, the agent API's form).
PointTimestamp = Annotated[
    str,
    msgspec.Meta(
        pattern=described(
            r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}-[0-9]{2}-[0-9]{2}$",
            "a restore point timestamp (UTC, YYYY-MM-DDTHH-MM-SS)",
        )
    ),
]


class CopyRequest(Message, frozen=True, kw_only=True):
    """``vb.cmd.job.copy`` (``POST /api/v1/destinations/{id}/copy``): copy one restore
    point of ``vm_name`` from destination ``destination_id`` to
    ``target_destination_id``: its manifests, domain XML and record, and every chunk it
    names that the target does not hold (re-compressed and re-encrypted as the target
    repository is). ``server_id``: only points backed up from that server;
    ``timestamp``: that point, else the newest one. Answers the copy job; the point is
    visible in the target only once every chunk it names is durable there.
    """

    destination_id: str
    target_destination_id: str
    vm_name: VmName
    server_id: ServerId | None = None
    timestamp: PointTimestamp | None = None


#: An absolute path on a server: one printable line.
_ABSOLUTE_PATH: Final = described(
    r"^/[^\x00-\x1f\x7f]*(?![\s\S])", "an absolute path (starting with '/', one line)"
)
AbsolutePath = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=_ABSOLUTE_PATH)]
#: A libvirt storage pool name (libvirt's rules for names are those of domains).
PoolName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=NAME_MAX_LENGTH, pattern=VM_NAME_PATTERN)
]


class RestoreRequest(Message, frozen=True, kw_only=True):
    """``POST /servers/{id}/restore/start``: restore a point onto server ``server_id``.

    Without the optional fields every disk goes back to the path the saved XML names,
    as the format and kind (file, block device) it declares, and the domain keeps its
    name. ``vm_name``: restore as a new VM of that name (new UUID and MAC addresses,
    disk files renamed after it); if a VM of that name exists, only ``overwrite``
    replaces it, and only while it is shut off. ``target_directory``: the disks are
    files in that directory (one of the server's ``restoreDirectories``);
    ``storage_pool``: files in that libvirt pool (a directory pool). ``start``: start
    the VM once it is defined.
    """

    server_id: ServerId
    xml_path: str
    decision: Literal["overwrite", "define"]
    destination_id: str | None = None
    vm_name: VmName | None = None
    target_directory: AbsolutePath | None = None
    storage_pool: PoolName | None = None
    start: bool = False
    #: Set by the gateway (never from a client's body) for a server of a remote agent:
    #: the VMs of the agent's host as its last heartbeat reported them (name -> power
    #: state), which the inventory cannot look at; ``None`` otherwise.
    host_domains: dict[str, str] | None = None


class SanityRequest(Message, frozen=True, kw_only=True):
    """``POST /restore/sanity``: re-read a restore point's manifests and chunks."""

    xml_path: str
    timestamp: str | None = None
    destination_id: str | None = None


class RestoreEntriesRequest(Message, frozen=True, kw_only=True):
    destination_id: str | None = None
    driver_id: str | None = None


class RestoreEntry(Message, frozen=True, kw_only=True):
    xml_path: str
    vm_name: str
    timestamp: str
    disk_basenames: list[str]
    missing_disk_basenames: list[str]
    source_server_id: str
    source_server_name: str
    kind: str = "full"
    destination_id: str = ""


class RestoreEntries(Message, frozen=True, kw_only=True):
    entries: list[RestoreEntry]


class PrecheckRequest(Message, frozen=True, kw_only=True):
    """``POST /servers/{id}/restore/precheck``: what restoring a point onto server
    ``server_id`` would find. ``vm_name``, ``target_directory`` and ``storage_pool`` are
    those of ``RestoreRequest`` and checked as it checks them (400 naming the field); the
    answer is for the VM the restore would define (``vm_name``, else the saved name) and
    its disks where the restore would put them."""

    server_id: ServerId
    xml_path: str
    destination_id: str | None = None
    vm_name: VmName | None = None
    target_directory: AbsolutePath | None = None
    storage_pool: PoolName | None = None
    #: As ``RestoreRequest.host_domains``.
    host_domains: dict[str, str] | None = None


class PrecheckResult(Message, frozen=True, kw_only=True):
    """``vm_exists``: a domain of the target name is defined (``vm_running``: and runs);
    ``can_define_only``: every disk is at its planned path with the right size
    (``problems`` says what is not)."""

    vm_exists: bool
    can_define_only: bool
    vm_running: bool = False
    problems: list[str] = msgspec.field(default_factory=list)
