"""Per-VM state that is not a disk: UEFI variable stores, writable loaders, TPM state.

A domain references state of its own besides its disks; losing it loses what the guest
stored there (UEFI boot entries and Secure Boot keys in the NVRAM variable store, keys
sealed in the emulated TPM). :func:`locate_state` finds it from the domain XML:

* ``nvram`` (a file): ``<os><nvram>`` (a path, or ``<nvram type='file'><source file=...>``),
  or where libvirt puts a variable store the XML does not name yet
  (``<nvram dir>/<name>_VARS.fd`` for ``<os firmware='efi'>`` or a read-only pflash
  loader without one); a stateless loader has none;
* ``loader`` (a file): a ``<loader readonly='no'>`` image, firmware code and variables
  in one writable file (a read-only loader is shared firmware code, not per-VM state);
* ``tpm`` (a directory): the swtpm state of a ``<tpm><backend type='emulator'>``,
  ``<swtpm dir>/<uuid>`` (``<source type='dir|file' path=...>`` where libvirt supports
  naming it). A second emulated TPM is ``tpm.1``.

The directories are libvirt's: ``/var/lib/libvirt/qemu/nvram`` and
``/var/lib/libvirt/swtpm`` for ``qemu:///system``, ``~/.config/libvirt/qemu/nvram`` and
``~/.config/libvirt/qemu/swtpm`` for ``qemu:///session``. Network or block-device NVRAM
is not a file this module can copy and is not listed.

The rest works on the hypervisor through a :class:`~virtbackup.virt.host.Host` (local or
over SSH) with standard tools (``cp``, ``find``, ``dd``, ``base64``, ``chown``):
:func:`snapshot` copies a location aside with its owners and modes and lists it,
:func:`read_piece` and :func:`write_piece` move bytes in pieces small enough for one bus
message, :func:`stage` builds a location's tree under a temporary name, and
:func:`commit` moves it into place (:func:`discard` removes it).
"""

from __future__ import annotations

import base64
import contextlib
import posixpath
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import urlsplit

from virtbackup.virt import _xml
from virtbackup.virt.errors import CommandFailed
from virtbackup.virt.host import Host

NVRAM: Final = "nvram"
LOADER: Final = "loader"
TPM: Final = "tpm"

ConnectionKind = Literal["system", "session"]
EntryKind = Literal["file", "dir"]

#: libvirt's directories for ``qemu:///system``.
SYSTEM_NVRAM_DIR: Final = "/var/lib/libvirt/qemu/nvram"
SYSTEM_SWTPM_DIR: Final = "/var/lib/libvirt/swtpm"
#: libvirt's directories for ``qemu:///session``, below the user's home.
SESSION_NVRAM_DIR: Final = ".config/libvirt/qemu/nvram"
SESSION_SWTPM_DIR: Final = ".config/libvirt/qemu/swtpm"

#: Bytes ``dd`` moves per block when reading or writing a piece.
_DD_BLOCK: Final = 65536
#: The permission bits a restore gives what it stages: a restore point's record is not
#: authenticated, so never setuid, setgid or sticky, and never writable by others.
SAFE_MODE_BITS: Final = 0o775


@dataclass(frozen=True, slots=True)
class StateLocation:
    """One piece of per-VM state the domain references: its ``role`` (``nvram``,
    ``loader``, ``tpm``...), where it is (absolute path) and whether it is one file or a
    directory tree."""

    role: str
    path: str
    kind: EntryKind


@dataclass(frozen=True, slots=True)
class StateEntry:
    """A file or directory of a location as found on the host: ``relative`` is ``""``
    for the location itself, else a path below it (``tpm2/tpm2-00.permall``); ``mode``
    the permission bits (``0o7777`` at most); ``owner`` and ``group`` are names (numbers
    where the host has no name for them); ``size`` is in bytes (0 for a directory)."""

    relative: str
    kind: EntryKind
    size: int
    mode: int
    owner: str
    group: str


class StateError(CommandFailed):
    """A state file or directory could not be copied, read, written or moved."""


def connection_kind(uri: str) -> ConnectionKind:
    """``session`` for a ``qemu:///session`` URI (any transport), else ``system``."""
    path = urlsplit(uri).path.rstrip("/")
    return "session" if path.endswith("/session") or path == "session" else "system"


def state_dirs(kind: ConnectionKind, home: str | None = None) -> tuple[str, str]:
    """libvirt's NVRAM and swtpm state directories for a connection of ``kind``.

    ``home`` (the home directory of the user libvirt runs as) is needed for ``session``:
    ValueError without it."""
    if kind == "system":
        return SYSTEM_NVRAM_DIR, SYSTEM_SWTPM_DIR
    if not home or not home.startswith("/"):
        raise ValueError("a session connection's state is below its user's home: give home")
    return posixpath.join(home, SESSION_NVRAM_DIR), posixpath.join(home, SESSION_SWTPM_DIR)


def locate_state(
    xml: str, connection: ConnectionKind = "system", *, home: str | None = None
) -> list[StateLocation]:
    """Every piece of per-VM state (not a disk) the domain XML references, in a stable
    order (NVRAM, loader, TPMs), each role once (see the module docstring).

    ``connection`` and ``home`` say where libvirt keeps what the XML names only
    implicitly (a TPM's state, an NVRAM path not yet written into the XML). Raises
    ValueError for a session connection without ``home`` when it is needed, and for a
    domain with an emulated TPM but no ``<uuid>`` (its state directory is named after it).
    """
    root = _xml.parse(xml)
    name = root.findtext("name") or ""
    found: list[StateLocation] = []
    os_el = root.find("os")
    if os_el is not None:
        loader = os_el.find("loader")
        nvram = _nvram_path(os_el)
        if nvram is None and _implies_nvram(os_el) and name:
            nvram_dir = state_dirs(connection, home)[0]
            nvram = posixpath.join(nvram_dir, f"{name}_VARS.fd")
        if nvram:
            found.append(StateLocation(NVRAM, nvram, "file"))
        if loader is not None and loader.get("readonly") == "no" and (loader.text or "").strip():
            found.append(StateLocation(LOADER, (loader.text or "").strip(), "file"))
    backends = [tpm.find("backend") for tpm in root.findall("./devices/tpm")]
    emulators = [b for b in backends if b is not None and b.get("type") == "emulator"]
    for index, backend in enumerate(emulators):
        role = TPM if index == 0 else f"{TPM}.{index}"
        source = backend.find("source")
        if source is not None and source.get("path"):
            kind: EntryKind = "file" if source.get("type") == "file" else "dir"
            found.append(StateLocation(role, source.get("path", ""), kind))
            continue
        uuid = (root.findtext("uuid") or "").strip()
        if not uuid:
            raise ValueError("a domain with an emulated TPM needs a <uuid>: its state is named so")
        swtpm_dir = state_dirs(connection, home)[1]
        found.append(StateLocation(role, posixpath.join(swtpm_dir, uuid), "dir"))
    return found


def referenced_paths(
    xml: str, connection: ConnectionKind = "system", *, home: str | None = None
) -> list[str]:
    """Every host path the domain XML uses for its data: every disk's file or device
    (CD-ROMs, read-only disks and backing files named in the XML too: a restore must not
    write over any of them) and its state locations (:func:`locate_state`; left out when
    their place cannot be told)."""
    root = _xml.parse(xml)
    paths: list[str] = []
    for source in root.iterfind("./devices/disk//source"):
        path = source.get("file") or source.get("dev")
        if path:
            paths.append(path)
    # A defined domain always has a uuid; a session without home names no state.
    with contextlib.suppress(ValueError):
        paths += [loc.path for loc in locate_state(xml, connection, home=home)]
    return paths


def _nvram_path(os_el: ET.Element) -> str | None:
    el = os_el.find("nvram")
    if el is None or el.get("type") not in (None, "file"):
        return None  # none, or a block device or network volume: not a file to copy
    source = el.find("source")
    if source is not None and source.get("file"):
        return source.get("file")
    return (el.text or "").strip() or None


def _implies_nvram(os_el: ET.Element) -> bool:
    """Whether libvirt gives the domain an NVRAM file though the XML names none."""
    if os_el.find("nvram") is not None:
        return False  # named, but not as a file (network, block)
    loader = os_el.find("loader")
    if loader is not None and loader.get("stateless") == "yes":
        return False
    if os_el.get("firmware") == "efi":
        return True
    return loader is not None and loader.get("type") == "pflash" and loader.get("readonly") == "yes"


# -- on the host ------------------------------------------------------------------------


async def home_directory(host: Host) -> str:
    """The home directory of the user commands run as on ``host`` (a session
    connection's libvirt runs as that user)."""
    result = await host.run(["sh", "-c", 'printf %s "$HOME"'], timeout=30)
    home = result.check().stdout.strip()
    if not home.startswith("/"):
        raise StateError(f"no home directory on the host: {home!r}")
    return home


async def list_entries(host: Host, path: str) -> list[StateEntry]:
    """The location at ``path`` and, for a directory, everything below it (regular files
    and directories; symbolic links, sockets and the like are left out), parents before
    children. An absent ``path`` gives an empty list."""
    if (await host.run(["test", "-e", path], timeout=30)).returncode != 0:
        return []
    result = await host.run(
        ["find", path, "(", "-type", "f", "-o", "-type", "d", ")",
         "-printf", "%y\\t%s\\t%m\\t%u\\t%g\\t%P\\0"],
        timeout=60,
    )  # fmt: skip
    if result.returncode != 0:
        raise StateError(f"cannot list {path}: {result.stderr.strip()}")
    entries = []
    for record in result.stdout.split("\0"):
        if not record:
            continue
        kind, size, mode, owner, group, relative = record.split("\t", 5)
        entries.append(
            StateEntry(
                relative=relative,
                kind="dir" if kind == "d" else "file",
                size=int(size) if kind == "f" else 0,
                mode=int(mode, 8),
                owner=owner,
                group=group,
            )
        )
    entries.sort(key=lambda e: (e.relative.count("/") if e.relative else -1, e.relative))
    return entries


async def snapshot(host: Host, location: StateLocation, dest: str) -> list[StateEntry]:
    """Copy ``location`` to ``dest`` (which must not exist; its parent must) with owners,
    modes and times, and list the copy (:func:`list_entries`): the state as it was at this
    moment, to read at leisure. Empty when the location does not exist (libvirt creates
    NVRAM and TPM state on the first start)."""
    if (await host.run(["test", "-e", location.path], timeout=30)).returncode != 0:
        return []
    copied = await host.run(["cp", "-a", "-T", "--", location.path, dest], timeout=120)
    if copied.returncode != 0:
        raise StateError(f"cannot copy {location.path}: {copied.stderr.strip()}")
    return await list_entries(host, dest)


async def read_piece(host: Host, path: str, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes of the file at ``path`` from ``offset`` (fewer at its end).

    The bytes travel base64-encoded in the command's output."""
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative")
    script = (
        'test -f "$1" || { echo "$1: not a regular file" >&2; exit 2; }; '
        f'dd if="$1" bs={_DD_BLOCK} skip="$2" count="$3" iflag=skip_bytes,count_bytes '
        "status=none | base64 -w0"
    )
    result = await host.run(["sh", "-c", script, "sh", path, str(offset), str(length)], timeout=60)
    if result.returncode != 0 or result.stderr.strip():
        raise StateError(f"cannot read {path}: {result.stderr.strip()}")
    data = base64.b64decode(result.stdout)
    if len(data) > length:
        raise StateError(f"reading {path} returned {len(data)} bytes, asked for {length}")
    return data


async def write_piece(host: Host, path: str, offset: int, data: bytes) -> None:
    """Write ``data`` into the existing file at ``path`` at ``offset`` (nothing else of the
    file changes; the bytes travel base64-encoded on the command's standard input)."""
    if offset < 0:
        raise ValueError("offset must not be negative")
    script = (
        'test -f "$1" || { echo "$1: not a regular file" >&2; exit 2; }; '
        f'base64 -d | dd of="$1" bs={_DD_BLOCK} seek="$2" oflag=seek_bytes conv=notrunc '
        "status=none"
    )
    result = await host.run(
        ["sh", "-c", script, "sh", path, str(offset)],
        timeout=60,
        input=base64.b64encode(data).decode(),
    )
    if result.returncode != 0:
        raise StateError(f"cannot write {path}: {result.stderr.strip()}")


def _join(base: str, relative: str) -> str:
    return posixpath.join(base, relative) if relative else base


def check_relative(relative: str) -> None:
    """ValueError unless ``relative`` is ``""`` or a plain relative path (no ``..``)."""
    if not relative:
        return
    parts = relative.split("/")
    if relative.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in relative:
        raise ValueError(f"not a plain relative path: {relative!r}")


async def stage(
    host: Host, location: StateLocation, entries: Sequence[StateEntry], temp: str
) -> None:
    """Build ``location``'s tree at ``temp``: directories made, files created empty (to be
    filled by :func:`write_piece`), each with its owner, group and mode (the bits of
    :data:`SAFE_MODE_BITS` only: never setuid, setgid, sticky or writable by others). A
    leftover at ``temp`` is replaced; the location's parent directory is made if missing.

    ValueError when ``entries`` do not describe a ``location.kind`` (the root entry, with
    relative path ``""``, must be present and of that kind) or hold an unsafe path;
    StateError when the host refuses (e.g. an owner it does not know)."""
    roots = [e for e in entries if e.relative == ""]
    if len(roots) != 1 or roots[0].kind != location.kind:
        raise ValueError(f"{location.role}: the saved state is not a {location.kind}")
    for entry in entries:
        check_relative(entry.relative)
    parent = posixpath.dirname(location.path) or "/"
    lines = ["set -e", f"rm -rf -- {shlex.quote(temp)}", f"mkdir -p -- {shlex.quote(parent)}"]
    ordered = sorted(entries, key=lambda e: e.relative.count("/") if e.relative else -1)
    for entry in ordered:
        target = shlex.quote(_join(temp, entry.relative))
        if entry.kind == "dir":
            lines.append(f"mkdir -- {target}")
        else:
            lines.append(f": > {target}")
    # Owners and modes last, deepest first: a directory's mode never stops its own setup.
    for entry in reversed(ordered):
        target = shlex.quote(_join(temp, entry.relative))
        owner = shlex.quote(f"{entry.owner}:{entry.group}")
        lines.append(f"chown -h -- {owner} {target}")
        lines.append(f"chmod -- {entry.mode & SAFE_MODE_BITS:04o} {target}")
    result = await host.run(["sh", "-c", "\n".join(lines)], timeout=120)
    if result.returncode != 0:
        await discard(host, temp)
        raise StateError(f"cannot stage {location.path}: {result.stderr.strip()}")


async def commit(
    host: Host, location: StateLocation, temp: str, old: str, *, replace: bool = True
) -> bool:
    """Move the staged tree at ``temp`` to ``location.path``; a directory already there is
    first renamed to ``old`` and removed once the new one is in place, a file is replaced
    in one rename. Without ``replace``, state already at ``location.path`` stays and the
    staged tree is removed instead. Idempotent: without ``temp`` (already moved) only a
    leftover ``old`` is removed. Returns whether something was moved."""
    t, final, o = (shlex.quote(p) for p in (temp, location.path, old))
    if not replace:
        there = f"[ -e {final} ] || [ -L {final} ]"
        move = f"if {there}; then rm -rf -- {t}; else mv -T -- {t} {final}; echo moved; fi"
        script = f"set -e\nif [ -e {t} ]; then {move}; fi\nrm -rf -- {o}"
        result = await host.run(["sh", "-c", script], timeout=120)
        if result.returncode != 0:
            raise StateError(f"cannot move {temp} to {location.path}: {result.stderr.strip()}")
        return "moved" in result.stdout
    if location.kind == "dir":
        aside = f"if [ -e {final} ]; then rm -rf -- {o}; mv -T -- {final} {o}; fi"
        move = f"{aside}; mv -T -- {t} {final}"
    else:
        move = f"mv -f -T -- {t} {final}"
    script = f"set -e\nif [ -e {t} ]; then {move}; echo moved; fi\nrm -rf -- {o}"
    result = await host.run(["sh", "-c", script], timeout=120)
    if result.returncode != 0:
        raise StateError(f"cannot move {temp} to {location.path}: {result.stderr.strip()}")
    return "moved" in result.stdout


async def discard(host: Host, temp: str) -> None:
    """Remove a staged tree (idempotent)."""
    result = await host.run(["rm", "-rf", "--", temp], timeout=60)
    if result.returncode != 0:
        raise StateError(f"cannot remove {temp}: {result.stderr.strip()}")
