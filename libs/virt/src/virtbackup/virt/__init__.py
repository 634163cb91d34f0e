"""A small typed, asyncio layer over libvirt-python for the inventory service.

Every libvirt call runs in a per-connection thread pool with a bounded timeout; errors
are :class:`VirtError` subclasses. Modules: :mod:`.connection` (opening, ssh),
:mod:`.domains` (list, XML, actions), :mod:`.disks`, :mod:`.checkpoints`,
:mod:`.backup` (pull-mode NBD backups), :mod:`.leftovers` (``hasOverlay`` and cleanup),
:mod:`.events` (lifecycle events), :mod:`.host` and :mod:`.images` (commands on the
hypervisor host). Helpers for tests against a real libvirtd live in the dev-only package
``virtbackup.testing``.
"""

from __future__ import annotations

from virtbackup.virt.backup import (
    BackupExport,
    BackupJob,
    JobInfo,
    NbdServer,
    TcpServer,
    UnixServer,
    begin_backup,
    build_backup_xml,
    current_backup,
    end_backup,
    job_info,
)
from virtbackup.virt.checkpoints import (
    ChainCheck,
    Checkpoint,
    CheckpointDisk,
    build_checkpoint_xml,
    check_chain,
    create_checkpoint,
    delete_checkpoint,
    get_checkpoint,
    list_checkpoints,
)
from virtbackup.virt.connection import (
    Connection,
    ForwardedSocket,
    forward_libvirt_socket,
    open_connection,
    open_ssh_connection,
    ssh_uri,
)
from virtbackup.virt.disks import Disk, list_disks, parse_disks
from virtbackup.virt.domains import (
    DomainAction,
    DomainInfo,
    PowerState,
    define_domain,
    domain_xml,
    eject_cdrom,
    get_domain,
    list_domains,
    perform_action,
    undefine_domain,
)
from virtbackup.virt.errors import (
    CheckpointInconsistent,
    CommandFailed,
    Conflict,
    NotFound,
    Unreachable,
    VirtError,
    VirtTimeout,
)
from virtbackup.virt.events import (
    ConnectionLost,
    LifecycleEvent,
    LifecycleKind,
    LifecycleWatcher,
    Reconnected,
    WatchEvent,
    subscribe_lifecycle,
)
from virtbackup.virt.host import Host, LocalHost, SshHost
from virtbackup.virt.leftovers import (
    CleanupReport,
    Leftovers,
    Overlay,
    cleanup_leftovers,
    find_leftovers,
)

__all__ = [
    "BackupExport",
    "BackupJob",
    "ChainCheck",
    "Checkpoint",
    "CheckpointDisk",
    "CheckpointInconsistent",
    "CleanupReport",
    "CommandFailed",
    "Conflict",
    "Connection",
    "ConnectionLost",
    "Disk",
    "DomainAction",
    "DomainInfo",
    "ForwardedSocket",
    "Host",
    "JobInfo",
    "Leftovers",
    "LifecycleEvent",
    "LifecycleKind",
    "LifecycleWatcher",
    "LocalHost",
    "NbdServer",
    "NotFound",
    "Overlay",
    "PowerState",
    "Reconnected",
    "SshHost",
    "TcpServer",
    "UnixServer",
    "Unreachable",
    "VirtError",
    "VirtTimeout",
    "WatchEvent",
    "begin_backup",
    "build_backup_xml",
    "build_checkpoint_xml",
    "check_chain",
    "cleanup_leftovers",
    "create_checkpoint",
    "current_backup",
    "define_domain",
    "delete_checkpoint",
    "domain_xml",
    "eject_cdrom",
    "end_backup",
    "find_leftovers",
    "forward_libvirt_socket",
    "get_checkpoint",
    "get_domain",
    "job_info",
    "list_checkpoints",
    "list_disks",
    "list_domains",
    "open_connection",
    "open_ssh_connection",
    "parse_disks",
    "perform_action",
    "ssh_uri",
    "subscribe_lifecycle",
    "undefine_domain",
]
