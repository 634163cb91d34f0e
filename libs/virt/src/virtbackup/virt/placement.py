"""Where a restore may write on a hypervisor host: the checks the inventory and a remote
agent (``virtbackup agent``) share.

A restore writes disk images and state files (NVRAM, TPM state) at paths it plans from
the saved domain XML. It never writes over what another domain uses
(:func:`used_elsewhere`: disks, backing files, CD-ROMs, NVRAM, loaders, TPM state, of
the persistent and the live definition), only into the directories the server allows
(:func:`allowed_directories`, compared after every symbolic link is resolved:
:func:`realpaths`), and it replaces only a file with a file (:func:`file_type`).

State owners come from a restore point's record, which is not authenticated
(``backup.json`` is plaintext): :func:`clamp` bounds what a forged one can make.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Sequence
from typing import Final

from virtbackup.virt.connection import Connection
from virtbackup.virt.disks import parse_disks
from virtbackup.virt.domains import PowerState, domain_xml, list_domains
from virtbackup.virt.errors import CommandFailed, VirtError
from virtbackup.virt.errors import NotFound as VirtNotFound
from virtbackup.virt.host import Host
from virtbackup.virt.images import image_info
from virtbackup.virt.pools import list_pools
from virtbackup.virt.state import (
    SAFE_MODE_BITS,
    StateEntry,
    StateError,
    connection_kind,
    home_directory,
    referenced_paths,
)

#: libvirt's default image directory: where restores may write when a server names no
#: ``restoreDirectories`` (with its file pools).
DEFAULT_RESTORE_DIRECTORY: Final = "/var/lib/libvirt/images"
#: libvirt's default image directory of a ``qemu:///session`` daemon, below its user's home.
SESSION_IMAGES_DIR: Final = ".local/share/libvirt/images"
#: The accounts restored state may belong to: root and those libvirt runs QEMU and swtpm
#: as (Debian's ``libvirt-qemu``/``kvm`` and ``tss``, Fedora's ``qemu`` and ``tss``). A
#: restore point's record is not authenticated (``backup.json`` is plaintext), so the
#: owners it names are taken only from these and the account the host's commands run as
#: (a session connection's user); any other becomes that account (see :func:`clamp`).
STATE_ACCOUNTS: Final = frozenset({"root", "libvirt-qemu", "qemu", "kvm", "tss", "swtpm"})
#: What ``stat -L -c %F`` says, as the kinds a plan cares about.
_FILE_TYPES: Final = {
    "regular file": "file",
    "regular empty file": "file",
    "block special file": "block",
}


def inside(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or below it (both normalised)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


async def realpaths(host: Host, paths: list[str]) -> list[str]:
    """``paths`` with every symbolic link resolved on the host (``realpath -m``; as
    given when that fails)."""
    result = await host.run(["realpath", "-m", "--", *paths], timeout=30)
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) != len(paths):
        return paths
    return lines


async def resolve(host: Host, paths: Sequence[str]) -> dict[str, str]:
    """Each path with every symbolic link resolved on the host (``realpath -m``; a path
    that cannot be resolved stays as it is)."""
    unique = list(dict.fromkeys(paths))
    out = {p: posixpath.normpath(p) for p in unique}
    if not unique:
        return out
    result = await host.run(["realpath", "-m", "-z", "--", *unique], timeout=60)
    found = result.stdout.split("\0")
    if result.returncode == 0 and len(found) >= len(unique):
        out.update(zip(unique, found[: len(unique)], strict=True))
    return out


async def file_type(host: Host, path: str) -> str:
    """``absent``, ``file``, ``block``, ``directory``, or what else ``stat`` says
    (symbolic links followed)."""
    result = await host.run(["stat", "-L", "-c", "%F", "--", path], timeout=30)
    if result.returncode != 0:
        return "absent"
    text = result.stdout.strip()
    return _FILE_TYPES.get(text, text)


async def entry_kind(host: Host, path: str) -> str:
    """``absent``, ``file``, ``dir``, or what else ``stat`` says (a symbolic link is not
    followed)."""
    result = await host.run(["stat", "-c", "%F", "--", path], timeout=30)
    if result.returncode != 0:
        return "absent"
    text = result.stdout.strip()
    return {"regular file": "file", "regular empty file": "file", "directory": "dir"}.get(
        text, text
    )


async def disk_paths(conn: Connection, vm_name: str) -> set[str]:
    """The disk paths of the defined domain ``vm_name`` (raises libvirt's NotFound when
    there is none)."""
    xml = await domain_xml(conn, vm_name, inactive=True)
    return {d.source for d in parse_disks(xml) if d.source}


async def allowed_directories(
    conn: Connection,
    restore_directories: list[str] | None,
    default: str = DEFAULT_RESTORE_DIRECTORY,
) -> list[str]:
    """The directories restores may write into: ``restore_directories`` (the server's
    ``restoreDirectories``) when set, else the host's file pools plus libvirt's default
    image directory ``default`` (:data:`DEFAULT_RESTORE_DIRECTORY` for the system daemon,
    :data:`SESSION_IMAGES_DIR` below the user's home for a session one); normalised."""
    if restore_directories is not None:
        return [posixpath.normpath(d) for d in restore_directories]
    pools = [posixpath.normpath(p.path) for p in await list_pools(conn) if p.holds_files]
    return sorted({*pools, posixpath.normpath(default)})


async def used_elsewhere(conn: Connection, host: Host, vm_name: str) -> dict[str, str]:
    """Every path (symbolic links resolved) that a domain other than ``vm_name`` on this
    host uses for its data (disks, backing files, CD-ROMs, NVRAM, loaders, TPM state:
    :func:`virtbackup.virt.state.referenced_paths`), with that domain's name; a running
    domain's live XML counts too. A restore writes over none of them. Raises
    ``StateError`` when the session user's home cannot be told."""
    uri = str(await conn.call(conn.raw.getURI))
    kind = connection_kind(uri)
    home = await home_directory(host) if kind == "session" else None
    users: dict[str, str] = {}
    for dom in await list_domains(conn):
        if dom.name == vm_name:
            continue
        try:
            xmls = [await domain_xml(conn, dom.name, inactive=True)]
            if dom.power_state != PowerState.SHUTOFF:
                xmls.append(await domain_xml(conn, dom.name))
        except VirtNotFound:
            continue  # undefined meanwhile
        for xml in xmls:
            for path in referenced_paths(xml, kind, home=home):
                users.setdefault(path, dom.name)
    resolved = await resolve(host, list(users))
    return {resolved[path]: name for path, name in users.items()}


def clamp(entry: StateEntry, account: tuple[str, str]) -> StateEntry:
    """``entry`` with an owner and group among :data:`STATE_ACCOUNTS` and ``account``
    (the user and group the host's commands run as), else those of ``account``, and
    without setuid, setgid, sticky or write-by-others bits. The record a restore reads
    them from is not authenticated: this bounds what a forged one can make. On a host
    whose commands do not run as root (a session daemon's user), everything belongs to
    ``account``: nobody else may be given a file there, and QEMU runs as that user."""
    allowed = STATE_ACCOUNTS | set(account) if account[0] == "root" else set(account)
    owner = entry.owner if entry.owner in allowed else account[0]
    group = entry.group if entry.group in allowed else account[1]
    return StateEntry(
        entry.relative, entry.kind, entry.size, entry.mode & SAFE_MODE_BITS, owner, group
    )


async def host_account(host: Host) -> tuple[str, str]:
    """The user and group commands run as on ``host`` (``root``, ``root`` for a system
    connection). Raises ``StateError`` when the host cannot tell."""
    result = await host.run(["sh", "-c", "id -un; id -gn"], timeout=30)
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 2:
        raise StateError(f"cannot tell the account on the host: {result.stderr.strip()}")
    return lines[0], lines[1]


async def create_image(host: Host, path: str, fmt: str, size: int, temp: str) -> None:
    """A new thin image of format ``fmt`` and ``size`` bytes at ``temp`` (beside ``path``,
    the image it will replace or become), readable by its owner (root) only: libvirt's
    dynamic ownership gives QEMU access when the domain starts. A qcow2 image keeps the
    cluster size and compat level of a qcow2 image at ``path``. ``StateError`` with
    ``qemu-img``'s reason when it cannot be made."""
    await host.run(["mkdir", "-p", "--", posixpath.dirname(path) or "/"], timeout=30)
    options: list[str] = []
    if fmt == "qcow2" and await file_type(host, path) == "file":
        with contextlib.suppress(CommandFailed, VirtError):
            old = await image_info(host, path)
            keep = [f"cluster_size={old.cluster_size}"] if old.cluster_size else []
            keep += [f"compat={old.compat}"] if old.compat else []
            if old.format == "qcow2" and keep:
                options = ["-o", ",".join(keep)]
    argv = ["qemu-img", "create", "-q", "-f", fmt, *options, temp, str(size)]
    made = await host.run(["sh", "-c", 'umask 077 && exec "$@"', "sh", *argv], timeout=60)
    if made.returncode != 0:
        raise StateError(f"cannot create {temp}: {made.stderr.strip()}")
