"""Inventory: servers, their VMs, actions, and what the data path needs from a host."""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from virtbackup.contracts.v1.common import Fault, Message, ServerId, VmName
from virtbackup.contracts.v1.state import StagedState

PowerState = Literal["running", "shutoff", "paused", "shutdown", "crashed", "suspended", "unknown"]
VmAction = Literal["start", "reboot", "shutdown", "forceReset", "forceOff"]


class ServerRef(Message, frozen=True, kw_only=True):
    server_id: ServerId


class VmRef(Message, frozen=True, kw_only=True):
    server_id: ServerId
    vm_name: VmName


class Vm(Message, frozen=True, kw_only=True):
    id: str
    name: str
    power_state: PowerState


class VmStatus(Message, frozen=True, kw_only=True):
    """One line of ``GET /servers/{id}/vms``."""

    vm: Vm
    has_overlay: bool = False


class ServerVms(Message, frozen=True, kw_only=True):
    server_id: str
    vms: list[VmStatus]
    reachable: bool
    error: str = ""
    refreshed_at: str = ""


class ServerState(Message, frozen=True, kw_only=True):
    """A configured server as the inventory sees it."""

    id: str
    name: str
    uri: str
    reachable: bool
    error: str = ""
    vm_count: int = 0
    refreshed_at: str = ""


class ServerList(Message, frozen=True, kw_only=True):
    servers: list[ServerState]


class Ok(Message, frozen=True, kw_only=True):
    success: bool = True
    message: str = ""


class CdromRemoved(Ok, frozen=True, kw_only=True):
    """The reply of ``remove-cdrom``: the targets of the CD-ROM drives whose medium was
    removed (empty: the VM had no CD-ROM drive with a medium; nothing changed)."""

    ejected: list[str] = msgspec.field(default_factory=list)


class VmActionRequest(Message, frozen=True, kw_only=True):
    server_id: ServerId
    vm_name: VmName
    action: VmAction


class CleanupResult(Message, frozen=True, kw_only=True):
    """What a cleanup did, one line per step (empty when there was nothing to clean)."""

    success: bool = True
    actions: list[str] = msgspec.field(default_factory=list)


class DiskInfo(Message, frozen=True, kw_only=True):
    target: str
    path: str
    format: str
    capacity: int
    device: str = "disk"


class DiskList(Message, frozen=True, kw_only=True):
    disks: list[DiskInfo]


#: VMs one ``inventory.disks-many`` request may name: a reply of that many VMs' disks
#: (a few hundred bytes each) stays far below a bus message.
DISKS_MANY_MAX: Final = 500


class VmsDisksRequest(Message, frozen=True, kw_only=True):
    """``inventory.disks-many``: the disks of several VMs of one server in one request."""

    server_id: ServerId
    vm_names: Annotated[list[VmName], msgspec.Meta(min_length=1, max_length=DISKS_MANY_MAX)]


class VmDisks(Message, frozen=True, kw_only=True):
    """One VM's disks (devices ``disk`` only, as ``inventory.disks``), or ``fault``: why
    they could not be read (``not_found`` for a VM the server does not have, ...)."""

    vm_name: str
    disks: list[DiskInfo] = msgspec.field(default_factory=list)
    fault: Fault | None = None


class VmsDisks(Message, frozen=True, kw_only=True):
    """The answer to ``inventory.disks-many``: one entry per VM asked, in its order."""

    vms: list[VmDisks]


class VmInfo(Message, frozen=True, kw_only=True):
    name: str
    uuid: str
    power_state: PowerState
    vcpus: int
    memory_mb: int
    disks: list[DiskInfo]
    cdroms: int = 0


class DomainXml(Message, frozen=True, kw_only=True):
    xml: str


class Checkpoint(Message, frozen=True, kw_only=True):
    name: str
    parent: str | None = None
    created_at: int = 0
    disks: list[str] = msgspec.field(default_factory=list)


class CheckpointList(Message, frozen=True, kw_only=True):
    checkpoints: list[Checkpoint]
    chain_intact: bool


class BackupBeginRequest(Message, frozen=True, kw_only=True):
    """Begin a pull-mode backup with a new checkpoint, incremental when possible.

    The NBD export listens on an address of the server that the workers reach, on a free
    port chosen by the inventory.
    """

    server_id: str
    vm_name: str
    #: The checkpoint of the last complete restore point; ``None`` (or a broken chain)
    #: means a full read.
    incremental_from: str | None = None
    quiesce: bool = True
    #: The job the backup belongs to. The inventory tags the libvirt backup job with it,
    #: so that while this job is active (``VB_JOBS``) its backup job and scratch files are
    #: not reported as leftovers (``hasOverlay``), by any inventory replica.
    job_id: str | None = None
    #: A shut-off VM whose disks are all qcow2 files holding ``incremental_from``'s
    #: persistent bitmap is read without starting QEMU: each image is exported read-only
    #: by ``qemu-nbd --bitmap`` (``BackupBegun.export_dir``), its dirty map is that
    #: bitmap, and no new checkpoint is made (``BackupBegun.checkpoint`` is
    #: ``incremental_from``). Any other VM is read as without it (a running one online,
    #: a shut-off one started paused). A migration's last delta asks for it.
    offline_from_bitmaps: bool = False


#: ``Extent.flags`` bits, as NBD's block status reports them. ``base:allocation``:
#: the range is not allocated (``STATE_HOLE``) and/or reads as zeros (``STATE_ZERO``).
STATE_HOLE: Final = 1
STATE_ZERO: Final = 2
#: ``qemu:dirty-bitmap:*``: the range was written since the checkpoint.
STATE_DIRTY: Final = 1


class Extent(Message, frozen=True, kw_only=False, array_like=True):
    """A byte range of a disk with one status: ``[offset, length, flags]`` on the wire.

    Maps are lists of extents sorted by offset, neither overlapping nor leaving gaps,
    covering the disk from 0 to its size; neighbours never have equal flags.
    """

    offset: int
    length: int
    flags: int = 0


class DiskExport(Message, frozen=True, kw_only=True):
    """One disk of a begun backup: its NBD export and what to read from it.

    ``size`` is the export's size in bytes (from NBD). ``allocation`` is the
    ``base:allocation`` map (flags ``STATE_HOLE | STATE_ZERO``); ``dirty`` the map of
    the export's dirty bitmap (``STATE_DIRTY``), present only in an incremental backup
    of a disk with a bitmap (``bitmap_context``). Both are exact, except on disks so
    fragmented that the reply would grow too large for the bus: then ranges are widened
    to whole aligned blocks (a block is dirty or holds data if any byte of it does), so a
    plan from them may read more than needed but never less.
    """

    target: str
    path: str
    nbd_url: str
    size: int
    format: str
    bitmap_context: str | None = None
    allocation: list[Extent]
    dirty: list[Extent] | None = None
    #: Why this disk is read in full in an incremental backup (``dirty`` is ``None``):
    #: e.g. "raw image: no dirty bitmap", "disk vdb is not part of checkpoint ...".
    #: Empty when the disk is read incrementally or the whole backup is a full read
    #: (``BackupBegun.full_reason``).
    full_reason: str = ""


class BackupBegun(Message, frozen=True, kw_only=True):
    server_id: str
    vm_name: str
    checkpoint: str
    parent_checkpoint: str | None
    incremental: bool
    #: Why a requested incremental became a full read (empty otherwise).
    full_reason: str = ""
    disks: list[DiskExport]
    domain_xml: str
    quiesced: bool = False
    #: The VM was shut off: the inventory started it paused (the guest runs no
    #: instruction) to read it, and shuts it off again when the backup ends.
    offline: bool = False
    #: libvirt's id of the running domain (its QEMU process) the backup reads: a new
    #: process (the VM stopped, and maybe started again) has another.
    domain_id: int | None = None
    #: Set when the disks are exported by ``qemu-nbd`` from their persistent bitmaps
    #: (``BackupBeginRequest.offline_from_bitmaps``): the directory on the server holding
    #: the exports' pid files (and sockets), given back in ``BackupEndRequest.export_dir``
    #: to stop them. No libvirt backup job runs then, and the VM stays shut off.
    export_dir: str = ""


class NetworkList(Message, frozen=True, kw_only=True):
    """``vb.cmd.inventory.networks`` (asked with a ``ServerRef``): the names of the
    server's libvirt networks, sorted."""

    names: list[str]


class VmRemoveRequest(Message, frozen=True, kw_only=True):
    """``vb.cmd.inventory.vm-remove``: undefine the shut-off VM ``vm_name`` of the source
    server of migration ``job_id`` once it runs on the target (``options.remove_source``),
    with its checkpoint, snapshot and managed-save metadata, its NVRAM file and its TPM
    state; and, with ``remove_disks``, delete its disk images. Refused (409) unless the
    VM is shut off and its lock in ``VB_LOCKS`` names ``job_id`` (only the migration
    that moved it removes it), and, when ``uuid`` is given, the domain has that UUID.
    Answered with ``VmRemoved``; 404 for an unknown VM."""

    server_id: ServerId
    vm_name: VmName
    job_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    uuid: str = ""
    remove_disks: bool = False


class VmRemoved(Message, frozen=True, kw_only=True):
    """What ``vm-remove`` did: the domain was undefined; ``removed`` lists the image
    files deleted, ``kept`` each disk left in place with why (a block device, a network
    disk, a read-only or shareable one, one another VM of the server uses, one that
    could not be deleted: ``<path>: <reason>``)."""

    removed: list[str] = msgspec.field(default_factory=list)
    kept: list[str] = msgspec.field(default_factory=list)


class CheckpointForgetRequest(Message, frozen=True, kw_only=True):
    """Delete checkpoint ``checkpoint`` of the VM (its dirty bitmaps): the restore point
    that it marked was deleted. Answered with ``Ok``: ``success`` false, with the reason
    in ``message``, when it was left (a backup job runs on the VM, or the VM is held);
    a checkpoint or VM that is gone already is success. ``job_id``: the job asking
    (a migration dropping its own checkpoints): its own hold on the VM is no hold."""

    server_id: ServerId
    vm_name: VmName
    checkpoint: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    job_id: str = ""


class BackupEndRequest(Message, frozen=True, kw_only=True):
    """End the backup job. ``success`` false also deletes the new checkpoint.

    ``domain_id`` and ``offline`` are the begin's answer (``BackupBegun``): with them the
    inventory tells whether the VM stopped during the backup from libvirt itself, and
    shuts a domain the offline backup started paused off again even if its tag is gone.
    """

    server_id: str
    vm_name: str
    checkpoint: str | None = None
    success: bool = True
    domain_id: int | None = None
    offline: bool = False
    #: ``BackupBegun.export_dir``: the ``qemu-nbd`` exports there are stopped and the
    #: directory removed (only a directory of the form such a begin makes, for this VM).
    export_dir: str = ""


#: What a restored disk is on the host: an image file, or a block device (an LVM volume,
#: a partition, a loop device) written in place.
DiskKind = Literal["file", "block"]


class BackupEnded(Ok, frozen=True, kw_only=True):
    """The answer to ``BackupEndRequest`` (an ``Ok``). ``vm_stopped``: the domain stopped
    while the backup ran (its QEMU, and with it the NBD exports, went away): it is not
    running now, or runs as another process than the begin's (``domain_id``). Without a
    ``domain_id`` (a request from before it existed) it is inferred as it was: the
    backup's tag is gone and no backup job is left."""

    vm_stopped: bool = False


class RestoreDisk(Message, frozen=True, kw_only=True):
    """One disk of a restore: ``size`` bytes (the guest's view) restored to ``path`` as
    an image of ``format`` (``raw``, ``qcow2``) that is a ``kind``."""

    target: str
    path: str
    size: int
    format: str = "qcow2"
    kind: DiskKind = "file"


class RestorePrecheckRequest(Message, frozen=True, kw_only=True):
    """Whether restoring ``disks`` as domain ``vm_name`` can work, and where each disk goes.

    With ``domain_xml`` (the XML saved with the point) the inventory also plans the
    restore (``RestorePrecheckResult.disks``): each disk keeps the format and kind the
    XML declares; under a name other than the XML's, disk files are renamed after it;
    with ``target_directory`` or ``storage_pool`` (a pool whose volumes are files)
    they are files there. Planning changes nothing on the host. It raises
    ``BadRequest`` naming ``targetDirectory`` (outside the server's
    ``restoreDirectories``) or ``storagePool`` (no such pool, or not a directory pool),
    and ``Conflict`` for a disk it would not write: a block device that is missing or
    too small, a path that is a device or a directory where a file is due, or (for an
    ``overwrite`` under a new name or into another directory) a file that exists and
    is not a disk of domain ``vm_name``.
    """

    server_id: str
    vm_name: str
    disks: list[RestoreDisk]
    domain_xml: str = ""
    decision: Literal["overwrite", "define"] = "overwrite"
    target_directory: str = ""
    storage_pool: str = ""
    #: The roles of state (``nvram``, ``tpm``...) the point holds: with ``domain_xml``
    #: and ``overwrite``, each place the restored domain keeps one is checked as a disk
    #: path is (a file where a file is due, a directory where a directory is; under a
    #: new name, not another VM's state).
    state_roles: list[str] = msgspec.field(default_factory=list)
    #: The restore job planning (empty before a job exists). With it the existing domain
    #: ``vm_name`` is held for the job: VM actions on it answer 409 naming the job until
    #: the restore defines it or ends.
    job_id: str = ""
    #: ``target_directory`` must exist and be writable (a migration, whose checks come
    #: before anything is made on the target); a restore makes it when it is missing.
    #: Without ``target_directory`` or ``storage_pool``, the disks' own directories must;
    #: and (as for disks that go somewhere new) an existing file at a disk's path must be
    #: a disk of the domain ``vm_name`` being replaced.
    directory_must_exist: bool = False


class RestorePrecheckResult(Message, frozen=True, kw_only=True):
    """``vm_exists``: a domain of that name is defined; ``can_define_only``: every disk
    exists at its path with the right size, so defining alone brings the VM back.
    ``disks``: where each disk is restored (planned only when the request gave
    ``domain_xml``; else empty)."""

    vm_exists: bool
    vm_running: bool
    can_define_only: bool
    problems: list[str] = msgspec.field(default_factory=list)
    disks: list[RestoreDisk] = msgspec.field(default_factory=list)
    #: The UUID of the existing domain ``vm_name`` (empty when there is none): a restore
    #: that replaces it keeps it.
    vm_uuid: str = ""


class RestorePrepareRequest(Message, frozen=True, kw_only=True):
    """Create a new thin image of each disk's format beside its final path (a file
    disk), or open a block device in place (a block disk), and export each over NBD for
    the workers to write."""

    server_id: str
    job_id: str
    disks: list[RestoreDisk]


class RestoreTarget(Message, frozen=True, kw_only=True):
    """A disk being restored: written through ``nbd_url`` into ``temp_path``, which the
    finish moves to ``path``. A block device is written in place (``temp_path`` is
    ``path``, nothing is moved or removed). ``fresh``: the image reads as zeros before
    the workers write it (a new file), so zero chunks need no write; false for a device
    written in place, where every zero chunk must be written as zeros. A target without
    ``nbd_url`` has nothing to write (``define``: the disk is used as it is).
    ``pid_file``: where the export's process id is, when not beside ``temp_path``."""

    target: str
    path: str
    temp_path: str
    nbd_url: str
    format: str = "qcow2"
    kind: DiskKind = "file"
    fresh: bool = True
    pid_file: str = ""


class RestorePrepared(Message, frozen=True, kw_only=True):
    disks: list[RestoreTarget]


class RestoreFinishRequest(Message, frozen=True, kw_only=True):
    """Stop the exports; on success move the images into place and define the domain
    from ``domain_xml`` (replacing a shut-off domain of the same name); else remove them.

    ``domain_xml`` is the saved XML: the inventory rewrites it for ``vm_name`` (a new
    name gets a new UUID and new MAC addresses) and for where ``disks`` are.

    ``state`` are the job's staged state files (``STATE_PREPARE``): moved into place with
    the images, before the domain is defined, or removed. On success, state files the
    job staged for the roles ``domain_xml`` references are found without being listed
    (a commit repeated by another orchestrator replica)."""

    server_id: str
    job_id: str
    vm_name: str
    success: bool
    domain_xml: str = ""
    disks: list[RestoreTarget] = msgspec.field(default_factory=list)
    state: list[StagedState] = msgspec.field(default_factory=list)
    #: The UUID the restored domain gets: the replaced domain's (``RestorePrecheckResult.
    #: vm_uuid``), as the job's state files were staged for. Empty: the UUID of the domain
    #: ``vm_name`` defined now, else the saved one (same name) or one derived from the
    #: job id (a new name).
    uuid: str = ""
