"""Which job a domain's libvirt backup job belongs to, and whether that job still runs.

While a backup runs, its libvirt backup job and scratch files look exactly like what an
interrupted backup leaves behind (:mod:`virtbackup.virt.leftovers`, the API's
``hasOverlay``). They are not leftovers as long as the VirtBackup job that began them is
active: an orchestrator still runs it and will end the libvirt job (and if its replica
dies, another one takes the job over or fails it, and ends the libvirt job).

The inventory holds none of this in process memory. :func:`tag` marks the domain, right
after the begin, with live metadata (``virDomainSetMetadata`` with ``AFFECT_LIVE``: it is
part of the running domain's state, survives a restart of the inventory or of libvirtd,
and is gone once the domain stops)::

    <backup xmlns="https://virtbackup.dev/xmlns/backup/1" job="<job id>" checkpoint="..."
            installation="<installation id>" offline="yes"/>

(the installation tells one VirtBackup's backups from another's on a shared hypervisor:
job ids mean something only in their own ``VB_JOBS``; ``offline="yes"`` says that the
domain was shut off and the inventory started it paused to read it, so that whoever ends
the backup - the inventory at the job's end, or :mod:`.reconcile` after an inventory
died mid-backup - returns it to shut off; an offline backup tags the domain right after
starting it, before the backup job begins), and the end removes it
(:func:`untag`). :func:`in_progress` then derives the answer, in any inventory replica
at any time, from libvirt (the domain has a backup job and a tag)
and JetStream (the tagged job is queued or running in ``VB_JOBS``). A backup job with no
tag (begun by someone else) or whose job has ended is a leftover.

Restores hold the shut-off domain they replace in the same way, with persistent metadata
(:func:`hold_for_restore`, :func:`check_restore_hold`, below).
"""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Final
from xml.sax.saxutils import quoteattr

import libvirt
import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from virtbackup.contracts.v1.jobs import ACTIVE_STATES, Job
from virtbackup.runtime.errors import Conflict
from virtbackup.virt import Connection
from virtbackup.virt.errors import NotFound as VirtNotFound
from virtbackup.virt.errors import VirtError

log = logging.getLogger(__name__)

NAMESPACE: Final = "https://virtbackup.dev/xmlns/backup/1"
_PREFIX: Final = "vb"
_ELEMENT: Final = libvirt.VIR_DOMAIN_METADATA_ELEMENT
_LIVE: Final = libvirt.VIR_DOMAIN_AFFECT_LIVE
_job_decoder = msgspec.json.Decoder(Job)


@dataclass(frozen=True, slots=True)
class BackupTag:
    """The tag of a running domain: the job that began its backup (``None`` when the
    begin named no job), the checkpoint created with it, the installation whose
    inventory began it (``None`` in tags written before installations were named), and
    whether the domain was shut off and started paused by that backup (``offline``: it
    is to be destroyed again at the end if it is still paused)."""

    job_id: str | None
    checkpoint: str
    installation: str | None = None
    offline: bool = False


async def tag(
    conn: Connection,
    vm_name: str,
    job_id: str | None,
    checkpoint: str,
    installation: str | None = None,
    *,
    offline: bool = False,
) -> None:
    """Tag the running domain's backup job with ``job_id`` (replacing an older tag);
    ``offline`` when the backup started the shut-off domain paused.

    Raises VirtError (Conflict when the domain is not running)."""
    dom = await conn.lookup(vm_name)
    job = f" job={quoteattr(job_id)}" if job_id else ""
    owner = f" installation={quoteattr(installation)}" if installation else ""
    started = ' offline="yes"' if offline else ""
    xml = f"<backup{job} checkpoint={quoteattr(checkpoint)}{owner}{started}/>"
    await conn.call(dom.setMetadata, _ELEMENT, xml, _PREFIX, NAMESPACE, _LIVE)


async def untag(conn: Connection, vm_name: str) -> None:
    """Remove the domain's tag; quiet when there is none or the domain is gone or stopped."""
    with contextlib.suppress(VirtError):
        dom = await conn.lookup(vm_name)
        await conn.call(dom.setMetadata, _ELEMENT, None, None, NAMESPACE, _LIVE)


async def read_tag(conn: Connection, vm_name: str) -> BackupTag | None:
    """The domain's tag, or ``None`` (no tag, or the domain is not running).

    Raises VirtError when libvirt cannot be asked (NotFound for an unknown domain)."""
    dom = await conn.lookup(vm_name)
    try:
        xml = str(await conn.call(dom.metadata, _ELEMENT, NAMESPACE, _LIVE))
    except VirtError as exc:
        if exc.code in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_OPERATION_INVALID):
            return None
        raise
    root = ET.fromstring(xml)  # noqa: S314 - from libvirtd, a trusted peer (as in virt._xml)
    return BackupTag(
        job_id=root.get("job") or None,
        checkpoint=root.get("checkpoint", ""),
        installation=root.get("installation") or None,
        offline=root.get("offline") == "yes",
    )


async def job_state(jobs: KeyValue, job_id: str) -> str | None:
    """The state of job ``job_id`` in ``jobs`` (``VB_JOBS``); ``None`` when it has no
    record (or one that cannot be read)."""
    try:
        entry = await jobs.get(job_id)
    except KeyNotFoundError:
        return None
    if entry.value is None:
        return None
    try:
        return _job_decoder.decode(entry.value).state
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("job %s cannot be read: %s", job_id, exc)
        return None


async def in_progress(conn: Connection, vm_name: str, jobs: KeyValue) -> bool:
    """Whether the domain's backup job (the caller saw one) belongs to a backup that is
    still running: the domain is tagged, and the tagged job is queued or running in
    ``jobs`` (``VB_JOBS``). A tag without a job counts as running while the libvirt job
    lasts. Raises VirtError when libvirt cannot be asked; a job record that cannot be
    read or decoded counts as not running (the backup job is then shown as a leftover)."""
    found = await read_tag(conn, vm_name)
    if found is None:
        return False
    if found.job_id is None:
        return True
    try:
        entry = await jobs.get(found.job_id)
    except KeyNotFoundError:
        return False
    if entry.value is None:
        return False
    try:
        job = _job_decoder.decode(entry.value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("job %s tagged on %s cannot be read: %s", found.job_id, vm_name, exc)
        return False
    return job.state in ACTIVE_STATES


# -- restores -----------------------------------------------------------------------------
#
# A restore holds the shut-off domain it replaces with persistent metadata
# (``AFFECT_CONFIG``: a shut-off domain has no live state), from its job's own plan until
# the restore defines the domain (the new definition has no hold) or ends::
#
#     <restore xmlns="https://virtbackup.dev/xmlns/restore/1" job="<job id>"/>
#
# A hold counts while its job is queued or running in ``VB_JOBS``: one left by a job that
# ended (an inventory that died before removing it), or by another installation (whose
# job ids are not in this ``VB_JOBS``), is ignored; the restore's own finish still
# refuses to replace a domain started meanwhile.

RESTORE_NAMESPACE: Final = "https://virtbackup.dev/xmlns/restore/1"
_RESTORE_PREFIX: Final = "vbr"
_CONFIG: Final = libvirt.VIR_DOMAIN_AFFECT_CONFIG


async def hold_for_restore(conn: Connection, vm_name: str, job_id: str) -> bool:
    """Hold the defined domain ``vm_name`` for restore job ``job_id`` (replacing an older
    hold). False when there is no such defined domain (nothing to hold: a new one is
    defined at the restore's end; a transient one has no definition to mark, and a
    restore refuses to replace a running domain). Raises VirtError when libvirt
    refuses."""
    try:
        dom = await conn.lookup(vm_name)
    except VirtNotFound:
        return False
    if not await conn.call(dom.isPersistent):
        return False
    xml = f"<restore job={quoteattr(job_id)}/>"
    await conn.call(dom.setMetadata, _ELEMENT, xml, _RESTORE_PREFIX, RESTORE_NAMESPACE, _CONFIG)
    return True


async def restore_hold(conn: Connection, vm_name: str) -> str | None:
    """The id of the restore job holding the domain, or ``None``. Raises VirtError when
    libvirt cannot be asked (NotFound for an unknown domain)."""
    dom = await conn.lookup(vm_name)
    try:
        xml = str(await conn.call(dom.metadata, _ELEMENT, RESTORE_NAMESPACE, _CONFIG))
    except VirtError as exc:
        if exc.code in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_OPERATION_INVALID):
            return None
        raise
    root = ET.fromstring(xml)  # noqa: S314 - from libvirtd, a trusted peer (as in virt._xml)
    return root.get("job") or None


async def release_restore_hold(conn: Connection, vm_name: str, job_id: str) -> None:
    """Remove the domain's hold if job ``job_id`` holds it; quiet when the domain is gone
    or holds nothing of this job."""
    with contextlib.suppress(VirtError):
        if await restore_hold(conn, vm_name) == job_id:
            dom = await conn.lookup(vm_name)
            await conn.call(dom.setMetadata, _ELEMENT, None, None, RESTORE_NAMESPACE, _CONFIG)


async def check_restore_hold(conn: Connection, vm_name: str, jobs: KeyValue) -> None:
    """Refuse (Conflict naming the job) a VM action while a restore job holds the domain
    (see above). Raises VirtError when libvirt cannot be asked."""
    job_id = await restore_hold(conn, vm_name)
    if job_id is not None and await job_state(jobs, job_id) in ACTIVE_STATES:
        raise Conflict(
            f"vm {vm_name} is being restored by job {job_id}: it cannot be started or "
            "changed until the restore ends"
        )
