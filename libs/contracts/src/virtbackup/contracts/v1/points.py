"""Restore points as resources, and prune (``/api/v1/restore-points``,
``/api/v1/destinations/{id}/prune``): the commands the job-orchestrator answers.

A restore point's id is ``<destinationId>~<vm>~<timestamp>``:

* ``<destinationId>`` as configured (letters, digits, ``_ . : -``);
* ``<vm>`` the VM's name in UTF-8, base64url without padding (letters, digits, ``_ -``),
  so that every name libvirt accepts (spaces, ``/``, ``%``, non-ASCII letters, 247
  bytes) gives an id that is one URL path segment needing no escaping, and names that
  differ only in case give different ids;
* ``<timestamp>`` the repository's (``2026-01-30T12-00-00``, UTC).

``~`` occurs in none of the three parts, so the id splits back without ambiguity. The
id is stable: it depends only on where the point is and what it is of, never on a
listing's order, and stays the same as long as the point exists.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated, Final, Literal

import msgspec

from virtbackup.contracts.v1.common import Message, ServerId, VmName
from virtbackup.contracts.v1.retention import KeepRules

#: The longest ``notes`` of a point (characters); the same limit as the repository's.
NOTES_MAX_LENGTH: Final = 1024
_DEST = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_B64 = re.compile(r"^[A-Za-z0-9_-]{2,400}$")
_TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d{1,6})?$")

#: A point id as the API takes it (its parts are checked by :func:`parse_point_id`).
#: The longest restore point id.
POINT_ID_MAX_LENGTH: Final = 700
PointId = Annotated[str, msgspec.Meta(min_length=1, max_length=POINT_ID_MAX_LENGTH)]


def point_id(destination_id: str, vm_name: str, timestamp: str) -> str:
    """The id of the point of ``vm_name`` at ``timestamp`` in ``destination_id``."""
    vm = base64.urlsafe_b64encode(vm_name.encode()).decode().rstrip("=")
    return f"{destination_id}~{vm}~{timestamp}"


def parse_point_id(value: str) -> tuple[str, str, str]:
    """``(destination_id, vm_name, timestamp)`` of an id; ``ValueError`` saying what is
    wrong with it (not three parts, a bad destination id, a VM part that is not
    base64url of UTF-8, a malformed timestamp or one that is no date and time)."""
    parts = value.split("~")
    if len(parts) != 3:
        raise ValueError("a restore point id is <destinationId>~<vm>~<timestamp>")
    dest, vm, ts = parts
    if not _DEST.match(dest):
        raise ValueError("its destination part is not a destination id")
    if not _B64.match(vm):
        raise ValueError("its VM part is not base64url")
    try:
        name = base64.urlsafe_b64decode(vm + "=" * (-len(vm) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("its VM part is not base64url of a UTF-8 name") from None
    if not name or point_id(dest, name, ts) != value:
        raise ValueError("its VM part is not in canonical base64url form")
    if not _TS.match(ts):
        raise ValueError("its timestamp part is not a timestamp (2026-01-30T12-00-00)")
    try:  # the shape is right: is it a time (no month 13, no February 30)?
        datetime.strptime(ts.split(".", 1)[0], "%Y-%m-%dT%H-%M-%S")
    except ValueError:
        raise ValueError(f"its timestamp part {ts} is not a valid date and time") from None
    return dest, name, ts


class PointDisk(Message, frozen=True, kw_only=True):
    """One disk of a point: its target, file name at backup time, format, size (bytes)."""

    target: str
    basename: str
    format: str
    size: int


class PointVerification(Message, frozen=True, kw_only=True):
    """The last verification of a point (``verify.json``); ``state`` ``none`` and no time
    when it was never verified."""

    state: Literal["none", "ok", "damaged"] = "none"
    verified_at: str | None = None
    mode: str | None = None
    chunks_checked: int = 0
    damaged_chunks: int = 0


class PointInfo(Message, frozen=True, kw_only=True):
    """A restore point as ``/api/v1/restore-points`` shows it.

    ``state`` is ``ok``, or ``unreadable`` for a point whose record (``backup.json``)
    exists but cannot be read (``reason`` says why): its VM name and timestamp are those
    of its folder (a long name's hashed folder gives the folder's name), and what only
    the record holds is unknown (``kind`` ``unknown``, no server, no disks, sizes 0).
    Such a point is listed rather than left out (it may hold data; garbage collection
    refuses to run while there is one); ``GET`` and ``DELETE`` of it answer 409 saying
    why.

    ``parent`` is the id of the point an incremental was built on (``None`` for a full
    one; that point may have been deleted since: every point's manifests are complete,
    so a point never needs its parent). ``logicalBytes`` is the sum of its disks' sizes.
    ``storedBytes`` is what the chunks this backup newly stored took on the destination
    (compressed, encrypted blobs), from ``backup.json``'s ``bytesWritten``
    (``storedBytesSource`` says so): chunks it shares with other points are not counted,
    nor are its manifests, domain XML and state files.
    """

    id: str
    destination_id: str
    vm_name: str
    server_id: str
    server_name: str
    timestamp: str
    created_at: str
    kind: Literal["full", "incremental", "unknown"]
    parent: str | None = None
    parent_timestamp: str | None = None
    xml_path: str
    disks: list[PointDisk]
    logical_bytes: int
    stored_bytes: int
    stored_bytes_source: Literal["backup.json:bytesWritten"] = "backup.json:bytesWritten"
    protected: bool = False
    notes: str = ""
    verification: PointVerification = msgspec.field(default_factory=PointVerification)
    state: Literal["ok", "unreadable"] = "ok"
    reason: str | None = None


class PointListRequest(Message, frozen=True, kw_only=True):
    """Points of every enabled destination (or ``destination_id``'s), optionally of one
    source server or VM."""

    destination_id: str | None = None
    server_id: str | None = None
    vm_name: str | None = None


class PointList(Message, frozen=True, kw_only=True):
    """Points newest first (those whose record cannot be read among them, ``state``
    ``unreadable``); ``unreadable`` names destinations that could not be listed
    (``"<id>: <why>"``) when the request named none, and point records that exist but
    cannot be read (``<destination>: <key>: <reason>``); ``unreadable_destinations`` the
    ids of those destinations alone."""

    points: list[PointInfo]
    unreadable: list[str] = msgspec.field(default_factory=list)
    unreadable_destinations: list[str] = msgspec.field(default_factory=list)


class PointRef(Message, frozen=True, kw_only=True):
    id: PointId


class PointDeleteRequest(PointRef, frozen=True, kw_only=True):
    """Delete a point. ``force``: a point whose record (``backup.json``) cannot be read
    is deleted too (its folder: record first, never a chunk); without it that is a 409.
    ``force`` never overrides ``protected`` (when its ``point.json`` can be read) or a
    job or export using the point."""

    force: bool = False


class PointUpdateRequest(Message, frozen=True, kw_only=True):
    """Change ``protected`` and/or ``notes`` (``None``: unchanged)."""

    id: PointId
    protected: bool | None = None
    notes: Annotated[str, msgspec.Meta(max_length=NOTES_MAX_LENGTH)] | None = None


class PointDeleted(Message, frozen=True, kw_only=True):
    """The point that was deleted, as it was."""

    point: PointInfo


class PruneRequest(KeepRules, Message, frozen=True, kw_only=True):
    """``POST /api/v1/destinations/{id}/prune``: prune the points of ``vm_name`` (else of
    every VM in the destination) by the keep rules given (``KeepRules``' fields; none:
    each VM's configured policy). ``dry_run``: answer at once what would be kept and
    removed, change nothing. ``server_id`` limits it to the points backed up from that
    server."""

    destination_id: str
    vm_name: VmName | None = None
    server_id: ServerId | None = None
    dry_run: bool = False
    #: Set by the orchestrator for the prune that follows a backup.
    automatic: bool = False


class PruneDecision(Message, frozen=True, kw_only=True):
    """One point: kept (``reason``: the rule that keeps it, or ``protected``) or not."""

    id: str
    vm_name: str
    timestamp: str
    keep: bool
    reason: str | None = None


class PrunePlan(Message, frozen=True, kw_only=True):
    """What a prune does (a dry run's answer): per VM the policy applied (its rules by
    wire name) and every point's decision, newest first; ``keep`` and ``remove`` list the
    same decisions split. ``skipped``: points the rules do not keep that the prune leaves
    all the same because something uses them now (``reason``: ``in use: ...``, naming the
    job or the instant-access export); they are in neither ``keep`` nor ``remove``."""

    destination_id: str
    dry_run: bool = True
    policies: dict[str, dict[str, int | bool | None]] = msgspec.field(default_factory=dict)
    keep: list[PruneDecision] = msgspec.field(default_factory=list)
    remove: list[PruneDecision] = msgspec.field(default_factory=list)
    skipped: list[PruneDecision] = msgspec.field(default_factory=list)
