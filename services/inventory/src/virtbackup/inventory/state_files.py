"""A VM's state files on its host (UEFI NVRAM, writable loaders, TPM state) for backups
and restores; the commands of :mod:`virtbackup.contracts.v1.state`.

Backup: the state the domain references (:func:`virtbackup.virt.state.locate_state`) is
copied with owners and modes into ``<scratch>/vbstate-<job>/<n>`` in one step (so what is
read is the state of one moment, however slowly it is read), then read in pieces, then
the copies are removed (copies a killed orchestrator never released are removed by a
later snapshot, a day on).

Restore: each role's state is built beside the place the domain XML being defined keeps
it, as ``<path>.vbrestore-<job>`` (owners and modes set, files filled in pieces), and
moved into place when the restore commits (:func:`commit`), before the domain is defined;
a directory already there is replaced only then. A failed restore removes what it built
(:func:`discard`). State of a role the restore point does not hold is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
from collections.abc import Sequence

from virtbackup.contracts.v1.state import (
    StagedState,
    StateFile,
    StatePiece,
    StatePrepared,
    StatePrepareRequest,
    StateReadRequest,
    StateReleaseRequest,
    StateSnapshot,
    StateSnapshotRequest,
    StateWriteRequest,
)
from virtbackup.inventory.beside import beside
from virtbackup.inventory.hosts import HostServer
from virtbackup.runtime.errors import BadRequest, Conflict, Unavailable
from virtbackup.virt import get_domain, placement
from virtbackup.virt.connection import Connection
from virtbackup.virt.domains import domain_xml
from virtbackup.virt.errors import NotFound as VirtNotFound
from virtbackup.virt.errors import VirtError
from virtbackup.virt.host import Host
from virtbackup.virt.placement import clamp, host_account, resolve
from virtbackup.virt.placement import entry_kind as _kind
from virtbackup.virt.rewrite import domain_name, restored_domain
from virtbackup.virt.state import (
    StateEntry,
    StateError,
    StateLocation,
    check_relative,
    connection_kind,
    home_directory,
    list_entries,
    locate_state,
    read_piece,
    snapshot,
    stage,
    state_dirs,
    write_piece,
)
from virtbackup.virt.state import commit as commit_location
from virtbackup.virt.state import discard as discard_tree

log = logging.getLogger(__name__)

#: Minutes after which a snapshot's copies are taken as abandoned (a backup reads them
#: within seconds of making them) and removed by the next snapshot on the host.
STALE_MINUTES = 24 * 60


def snapshot_dir(scratch_dir: str, job_id: str) -> str:
    """Where a backup job's copies of the state files are."""
    return posixpath.join(scratch_dir, f"vbstate-{job_id}")


def temp_path(path: str, job_id: str) -> str:
    """Where a restore job builds the state that goes to ``path`` (``<path>.vbrestore-<job>``,
    shortened for a name too long for it: see ``beside``)."""
    return beside(path, f".vbrestore-{job_id}")


def old_path(path: str, job_id: str) -> str:
    """Where a restore job puts the directory it replaces until the new one is in place."""
    return f"{path}.vbold-{job_id}"


async def locations(server: HostServer, conn: Connection, xml: str) -> list[StateLocation]:
    """The state ``xml`` references, on this server's libvirt (system or session).
    BadRequest for an XML that cannot say (an emulated TPM without a uuid)."""
    uri = str(await conn.call(conn.raw.getURI))
    kind = connection_kind(uri)
    home = await home_directory(await server.host()) if kind == "session" else None
    try:
        return locate_state(xml, kind, home=home)
    except ValueError as exc:
        raise BadRequest(f"domain XML: {exc}") from None
    except SyntaxError as exc:  # ET.ParseError
        raise BadRequest(f"domain XML does not parse: {exc}") from None


def _file(location: StateLocation, entry: StateEntry, source: str) -> StateFile:
    return StateFile(
        role=location.role,
        path=posixpath.join(location.path, entry.relative) if entry.relative else location.path,
        relative=entry.relative,
        kind=entry.kind,
        size=entry.size,
        mode=entry.mode,
        owner=entry.owner,
        group=entry.group,
        source=source if entry.kind == "file" else "",
    )


async def take_snapshot(
    server: HostServer, req: StateSnapshotRequest, scratch_dir: str
) -> StateSnapshot:
    """Copy the VM's state aside (see the module docstring) and list it. The live XML of
    a running VM names what its QEMU uses. Raises NotFound (unknown VM, through the
    caller's libvirt mapping), Conflict (a copy that fails)."""
    conn = await server.connection()
    host = await server.host()
    await get_domain(conn, req.vm_name)
    found = await locations(server, conn, await domain_xml(conn, req.vm_name))
    base = snapshot_dir(scratch_dir, req.job_id)
    files: list[StateFile] = []
    try:
        await _run(host, ["rm", "-rf", "--", base], "remove an earlier snapshot")
        # Copies a backup never released (its orchestrator was killed while reading).
        await host.run(
            ["find", scratch_dir, "-mindepth", "1", "-maxdepth", "1", "-type", "d",
             "-name", "vbstate-*", "-mmin", f"+{STALE_MINUTES}", "-exec", "rm", "-rf", "{}", "+"],
            timeout=60,
        )  # fmt: skip
        await _run(host, ["mkdir", "-p", "-m", "0700", "--", base], "make the snapshot folder")
        for index, location in enumerate(found):
            dest = posixpath.join(base, str(index))
            for entry in await snapshot(host, location, dest):
                source = posixpath.join(dest, entry.relative) if entry.relative else dest
                files.append(_file(location, entry, source))
    except StateError as exc:
        with contextlib.suppress(StateError, VirtError):
            await discard_tree(host, base)
        raise Conflict(f"vm {req.vm_name}: {exc}") from None
    return StateSnapshot(files=files)


async def _run(host: Host, argv: list[str], what: str) -> None:
    result = await host.run(argv, timeout=60)
    if result.returncode != 0:
        raise StateError(f"cannot {what}: {result.stderr.strip()}")


def _below(path: str, base: str) -> bool:
    normal = posixpath.normpath(path)
    return normal == path and normal.startswith(base.rstrip("/") + "/")


async def read(server: HostServer, req: StateReadRequest, scratch_dir: str) -> StatePiece:
    """A piece of a snapshot copy. BadRequest for a path outside this job's snapshot,
    Conflict when it cannot be read."""
    if not _below(req.path, snapshot_dir(scratch_dir, req.job_id)):
        raise BadRequest(f"path: {req.path!r} is not in the snapshot of job {req.job_id}")
    try:
        data = await read_piece(await server.host(), req.path, req.offset, req.length)
    except StateError as exc:
        raise Conflict(str(exc)) from None
    return StatePiece(data=data)


async def release(server: HostServer, req: StateReleaseRequest, scratch_dir: str) -> None:
    """Remove the job's snapshot copies (idempotent)."""
    try:
        await discard_tree(await server.host(), snapshot_dir(scratch_dir, req.job_id))
    except StateError as exc:
        raise Conflict(str(exc)) from None


def _entries(files: Sequence[StateFile], account: tuple[str, str]) -> list[StateEntry]:
    out = []
    for f in files:
        try:
            check_relative(f.relative)
        except ValueError as exc:
            raise BadRequest(f"files: {f.role}: {exc}") from None
        out.append(clamp(StateEntry(f.relative, f.kind, f.size, f.mode, f.owner, f.group), account))
    return out


async def target_uuid(conn: Connection, vm_name: str, given: str = "") -> str | None:
    """The UUID a restored domain ``vm_name`` gets: ``given``, else that of the domain of
    this name defined now (a restore keeps the UUID of the domain it replaces), else
    ``None`` (:func:`virtbackup.virt.rewrite.restored_domain` decides)."""
    if given:
        return given
    try:
        return (await get_domain(conn, vm_name)).uuid
    except VirtNotFound:
        return None


async def nvram_dir(server: HostServer, conn: Connection) -> str:
    """libvirt's NVRAM directory on this server (system, or the session user's)."""
    kind = connection_kind(str(await conn.call(conn.raw.getURI)))
    home = await home_directory(await server.host()) if kind == "session" else None
    return state_dirs(kind, home)[0]


def restored_xml(
    xml: str, vm_name: str, job_id: str, uuid: str | None, nvram: str | None = None
) -> str:
    """The saved ``xml`` as the restore defines it under ``vm_name`` (``""``: the saved
    name), without its disk placements (state locations do not depend on them), its
    variable store in libvirt's NVRAM directory ``nvram`` of the target when it was in
    another daemon's (see :func:`virtbackup.virt.rewrite.restored_domain`).
    BadRequest for an XML that cannot be rewritten."""
    try:
        return restored_domain(
            xml, name=vm_name or domain_name(xml), job_id=job_id, uuid=uuid, nvram_dir=nvram
        )
    except (ValueError, SyntaxError) as exc:
        raise BadRequest(f"domain XML: {exc}") from None


async def used_elsewhere(
    server: HostServer, conn: Connection, host: Host, vm_name: str
) -> dict[str, str]:
    """Every path (symbolic links resolved) that a domain other than ``vm_name`` on this
    server uses for its data, with that domain's name
    (:func:`virtbackup.virt.placement.used_elsewhere`). A restore writes over none."""
    return await placement.used_elsewhere(conn, host, vm_name)


async def check_places(
    server: HostServer,
    host: Host,
    places: Sequence[StateLocation],
    vm_name: str,
    elsewhere: dict[str, str],
    ours: set[str] | None,
) -> dict[str, str]:
    """Conflict unless each state location can be written as a disk path can: what is
    there is of the location's kind (a file, a directory: nothing else is ever
    replaced), no other domain on the server uses it (``elsewhere``, from
    :func:`used_elsewhere`), and, when ``ours`` is given (a restore under a new name),
    what exists there is state of domain ``vm_name`` (``ours``: its locations).
    Returns each location's kind on the host (``absent``, ``file``, ``dir``)."""
    resolved = await resolve(host, [p.path for p in places])
    kinds: dict[str, str] = {}
    for place in places:
        kind = await _kind(host, place.path)
        where = f"{place.role} state {place.path} on server {server.id}"
        if kind not in ("absent", place.kind):
            want = "directory" if place.kind == "dir" else "file"
            raise Conflict(f"{where} is a {kind}; a restore puts a {want} there and never "
                           f"replaces a {kind} with it")  # fmt: skip
        user = elsewhere.get(resolved[place.path])
        if user is not None:
            raise Conflict(
                f"{where} is used by vm {user}; a restore never writes over another VM's "
                "state (restore under another vmName, or change that VM)"
            )
        if ours is not None and kind != "absent" and place.path not in ours:
            raise Conflict(
                f"{where} exists and is not state of {vm_name}; remove it, or restore under "
                "another vmName"
            )
        kinds[place.path] = kind
    return kinds


async def own_places(server: HostServer, conn: Connection, vm_name: str) -> set[str]:
    """The state locations of the defined domain ``vm_name`` (empty when there is none)."""
    try:
        xml = await domain_xml(conn, vm_name, inactive=True)
    except VirtNotFound:
        return set()
    try:
        return {loc.path for loc in await locations(server, conn, xml)}
    except BadRequest:
        return set()


async def prepare(server: HostServer, req: StatePrepareRequest) -> StatePrepared:
    """Build each saved role's state beside where the restored domain keeps it (the XML as
    the restore defines it: ``req.vm_name`` and the UUID of :func:`target_uuid`; see the
    module docstring). Roles the XML does not reference are skipped, and with
    ``only_missing`` roles whose place holds state are left as they are (each named in
    the reply). Owners and modes are clamped (:func:`clamp`).

    Raises BadRequest (an XML that cannot say where, saved entries that do not make a
    tree), Conflict (a place that is not of its role's kind or that another domain uses,
    see :func:`check_places`; the host refuses); nothing is left behind on failure."""
    conn = await server.connection()
    host = await server.host()
    name = req.vm_name or domain_name(req.domain_xml)
    uuid = await target_uuid(conn, name, req.uuid)
    xml = restored_xml(req.domain_xml, req.vm_name, req.job_id, uuid, await nvram_dir(server, conn))
    by_role = {loc.role: loc for loc in await locations(server, conn, xml)}
    roles: dict[str, list[StateFile]] = {}
    for f in req.files:
        roles.setdefault(f.role, []).append(f)
    skipped = sorted(r for r in roles if r not in by_role)
    places = [by_role[r] for r in roles if r in by_role]
    try:
        account = await host_account(host)
        elsewhere = await used_elsewhere(server, conn, host, name)
    except StateError as exc:
        raise Conflict(str(exc)) from None
    kinds = await check_places(server, host, places, name, elsewhere, None)
    kept = sorted(p.role for p in places if req.only_missing and kinds[p.path] != "absent")
    staged: list[StagedState] = []
    try:
        for location in places:
            if location.role in kept:
                continue
            temp = temp_path(location.path, req.job_id)
            try:
                await stage(host, location, _entries(roles[location.role], account), temp)
            except ValueError as exc:
                raise BadRequest(f"files: {exc}") from None
            staged.append(
                StagedState(
                    role=location.role, path=location.path, temp_path=temp,
                    kind=location.kind, replace=not req.only_missing,
                )
            )  # fmt: skip
    except BaseException as exc:
        await discard(host, staged)
        if isinstance(exc, StateError):
            raise Conflict(str(exc)) from None
        raise
    if skipped:
        log.info("restore %s: the domain XML has no place for %s", req.job_id, skipped)
    return StatePrepared(staged=staged, skipped=skipped, kept=kept)


def _in_staged_tree(path: str, job_id: str) -> bool:
    normal = posixpath.normpath(path)
    if normal != path or not path.startswith("/"):
        return False
    suffix = f".vbrestore-{job_id}"
    return any(part.endswith(suffix) for part in path.split("/"))


async def write(server: HostServer, req: StateWriteRequest) -> None:
    """Write a piece into a staged file of this job. BadRequest for a path outside the
    job's staged trees, Conflict when it cannot be written."""
    if not _in_staged_tree(req.path, req.job_id):
        raise BadRequest(f"path: {req.path!r} is not staged by job {req.job_id}")
    try:
        await write_piece(await server.host(), req.path, req.offset, req.data)
    except StateError as exc:
        raise Conflict(str(exc)) from None


async def _left_in_libvirt_dirs(server: HostServer, job_id: str) -> list[StagedState]:
    """What the job staged in libvirt's own NVRAM and swtpm directories (found by the
    temporary names; where a restore that died without its list left them)."""
    conn = await server.connection()
    host = await server.host()
    kind = connection_kind(str(await conn.call(conn.raw.getURI)))
    home = await home_directory(host) if kind == "session" else None
    suffix = f".vbrestore-{job_id}"
    found = []
    for directory in state_dirs(kind, home):
        result = await host.run(
            ["find", directory, "-mindepth", "1", "-maxdepth", "1", "-name", f"*{suffix}",
             "-printf", "%y\\t%p\\0"],
            timeout=30,
        )  # fmt: skip
        for record in result.stdout.split("\0") if result.returncode == 0 else []:
            if "\t" in record:
                kind_char, temp = record.split("\t", 1)
                found.append(
                    StagedState(
                        role="found",
                        path=temp.removesuffix(suffix),
                        temp_path=temp,
                        kind="dir" if kind_char == "d" else "file",
                    )
                )
    return found


async def staged_for(
    server: HostServer, job_id: str, xml: str, listed: Sequence[StagedState]
) -> list[StagedState]:
    """``listed`` and the state the job staged for the roles ``xml`` references (found
    by their temporary names: a commit repeated without the list). Without ``xml``,
    what the job staged in libvirt's own state directories (for a cleanup; errors
    finding it leave it out)."""
    out = {s.temp_path: s for s in listed}
    if not xml:
        try:
            for s in await _left_in_libvirt_dirs(server, job_id):
                out.setdefault(s.temp_path, s)
        except (VirtError, StateError, Unavailable) as exc:
            log.warning("looking for the state staged by job %s: %s", job_id, exc)
    else:
        conn = await server.connection()
        host = await server.host()
        try:
            found = await locations(server, conn, xml)
        except BadRequest:
            found = []  # e.g. a TPM without a uuid: nothing can have been staged for it
        for location in found:
            temp = temp_path(location.path, job_id)
            if temp not in out and await list_entries(host, temp):
                out[temp] = StagedState(
                    role=location.role, path=location.path, temp_path=temp, kind=location.kind
                )
    return list(out.values())


def check_staged(job_id: str, staged: Sequence[StagedState]) -> None:
    """BadRequest unless each staged tree is where this job builds state (a request
    must not make a restore move or remove anything else)."""
    for s in staged:
        path = s.path
        if not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
            raise BadRequest(f"state: {path!r} is not a normalised absolute path")
        if s.temp_path != temp_path(path, job_id):
            raise BadRequest(f"state: {s.temp_path!r} is not staged by job {job_id}")


async def commit(host: Host, job_id: str, staged: Sequence[StagedState]) -> None:
    """Move each staged tree into place (idempotent, see
    :func:`virtbackup.virt.state.commit`). BadRequest for a tree not of this job
    (:func:`check_staged`), Conflict when the host refuses."""
    check_staged(job_id, staged)
    for s in staged:
        location = StateLocation(s.role, s.path, s.kind)
        try:
            await commit_location(
                host, location, s.temp_path, old_path(s.path, job_id), replace=s.replace
            )
        except StateError as exc:
            raise Conflict(str(exc)) from None


async def discard(host: Host, staged: Sequence[StagedState], job_id: str = "") -> None:
    """Remove staged trees; failures are logged (what is left has a temporary name).
    With ``job_id``, BadRequest for a tree not of this job (:func:`check_staged`)."""
    if job_id:
        check_staged(job_id, staged)
    for s in staged:
        try:
            await discard_tree(host, s.temp_path)
        except (StateError, VirtError) as exc:
            log.warning("cannot remove %s: %s", s.temp_path, exc)
