"""The peer to compare with: Debian's ``virtnbdbackup`` / ``virtnbdrestore`` on a benchmark VM.

Building blocks for the full benchmark (``bench/run.py``), usable alone too::

    async with await open_connection() as conn:
        vm = await prepare_vm(conn, "vb-bench")          # 4 GiB disk, ~2 GiB mixed content
        try:
            full = await peer_backup(vm.name, out / "peer", "full")
            writes = await guest_writes(conn, vm, 200 * MiB)
            inc = await peer_backup(vm.name, out / "peer", "inc")
            restore = await peer_restore(out / "peer", out / "peer-restore")
            assert images_equal(vm.image, restore.image)
            await remove_checkpoints(conn, vm.name)        # before another tool backs up
        finally:
            await remove_prepared_vm(conn, vm)

Standalone (prints a table, ``--json`` to keep it)::

    cd /work/main && uv run python bench/peer.py --reps 3 [--compress]

What matters (see ``bench/PEER.md``):

* virtnbdbackup refuses ``full``/``inc`` while the VM has a checkpoint whose name does
  not contain ``virtnbdbackup`` ("Foreign checkpoint found"), and a ``full`` deletes every
  ``virtnbdbackup*`` checkpoint: when two tools back up the same VM, call
  :func:`remove_checkpoints` between them.
* A ``full`` needs a new (or empty) output directory; ``inc`` goes into the directory of
  its full. ``virtnbdrestore`` writes ``<output>/<disk file name>`` (qcow2) and restores the
  whole chain found in the input directory.
* One disk is read by one process over one NBD connection (``-w`` only spreads *disks*
  over processes); ``-z`` is lz4 (level 2 by default), off by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import libvirt

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import content
from bench.content import GiB, MiB
from virtbackup.testing.libvirtd import ensure_libvirtd
from virtbackup.testing.vms import create_vm, monitor_hmp, remove_vm, vm_directory
from virtbackup.virt.connection import Connection, open_connection
from virtbackup.virt.errors import NotFound

Level = Literal["full", "inc", "diff", "copy"]

#: Name of the benchmark VM unless told otherwise.
DEFAULT_VM: Final = "vb-bench"
#: Size of one scattered guest write and the alignment of their offsets: a page, like a
#: guest file system's writes, so that the writes are aligned to no chunk size (and not
#: to the 64 KiB granules of a dirty bitmap either).
WRITE_SIZE: Final = 1 * MiB
WRITE_ALIGN: Final = 4 * 1024
#: The benchmark VMs' disks are opened like on production hosts: ``cache='none'``
#: (``O_DIRECT``; the host's page cache holds none of the image).
DISK_CACHE: Final = "none"
#: virtnbdbackup's checkpoints are named ``virtnbdbackup.<n>``.
PEER_CHECKPOINT_PREFIX: Final = "virtnbdbackup"


def peer_available() -> bool:
    """Whether ``virtnbdbackup`` and ``virtnbdrestore`` are installed."""
    return all(shutil.which(tool) for tool in ("virtnbdbackup", "virtnbdrestore"))


def peer_version() -> str | None:
    """``virtnbdbackup -V`` (for example ``1.9.15``), or None if not installed."""
    if shutil.which("virtnbdbackup") is None:
        return None
    result = subprocess.run(
        ["virtnbdbackup", "-V"], capture_output=True, text=True, timeout=30, check=False
    )
    return (result.stdout or result.stderr).strip() or None


def install_peer() -> None:
    """``apt-get install -y virtnbdbackup`` (root; runs ``apt-get update`` first if needed)."""
    if peer_available():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "virtnbdbackup"]
    if subprocess.run(install, env=env, check=False, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True, timeout=900)
        subprocess.run(install, env=env, check=True, timeout=900)


# --------------------------------------------------------------------------- the VM


@dataclass(frozen=True, slots=True)
class PreparedVm:
    """A running benchmark VM made by :func:`prepare_vm` (one virtio disk ``vda``)."""

    name: str
    #: Holds the image and the guest writes' source files; removed by :func:`remove_prepared_vm`.
    directory: Path
    image: Path
    disk_size: int
    #: What was written into the disk before the VM started.
    segments: tuple[content.Segment, ...]
    #: Bytes written by the fill (zero segments included: they are allocated).
    content_bytes: int
    seconds: float
    target: str = "vda"


async def prepare_vm(
    conn: Connection,
    name: str = DEFAULT_VM,
    *,
    disk_size: int = 4 * GiB,
    content_size: int = 2 * GiB,
    seed: int = 0,
    base: Path = Path("/var/tmp"),
    memory_mib: int = 64,
    cache: str | None = DISK_CACHE,
    variant: int = 0,
) -> PreparedVm:
    """Make a VM with a ``disk_size`` qcow2 disk holding ``content_size`` bytes of mixed
    content (:func:`content.mixed_layout`: binaries, text, random data, written zeros, in
    64 MiB segments spread over the disk, the rest unallocated), and start it.

    The image is filled with ``qemu-io`` before the VM starts (much faster than through the
    monitor, same content). Starts ``virtlogd``/``libvirtd`` if needed. A leftover VM of the
    same name is removed first. ``cache`` is the disk's ``<driver cache=...>`` (None:
    libvirt's default, ``writeback``). ``variant`` ``n > 0`` takes the text and binary
    content from further into their corpora (not chunk-aligned), so that several VMs
    made with the same ``seed`` and different variants share no chunk.
    """
    started = time.monotonic()
    await asyncio.to_thread(ensure_libvirtd)
    directory = vm_directory(base, prefix=f"{name}-")
    try:
        vm = await create_vm(conn, name, directory, [disk_size], memory_mib=memory_mib, start=False)
        image = vm.disks[0]
        segments = content.mixed_layout(disk_size, content_size, seed=seed + variant)
        if variant:
            shift = variant * (content_size + 1_000_003)
            segments = [
                dataclasses.replace(s, skip=s.skip + shift) if s.kind in ("text", "binary") else s
                for s in segments
            ]
        written = await asyncio.to_thread(
            content.fill_image, image, segments, seed=seed + variant, scratch=directory
        )
        if cache is not None:
            await set_disk_cache(conn, name, cache)
        dom = await conn.lookup(name)
        await conn.call(dom.create, timeout=60)
    except BaseException:
        await remove_vm(conn, name, delete_directory=directory)
        raise
    return PreparedVm(
        name=name,
        directory=directory,
        image=image,
        disk_size=disk_size,
        segments=tuple(segments),
        content_bytes=written,
        seconds=time.monotonic() - started,
    )


async def set_disk_cache(conn: Connection, name: str, cache: str) -> None:
    """Redefine the (stopped) domain with ``<driver cache=CACHE>`` on every disk."""
    dom = await conn.lookup(name)
    xml = await conn.call(dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE)
    root = ET.fromstring(str(xml))  # noqa: S314 - libvirt's XML
    for driver in root.findall("./devices/disk/driver"):
        driver.set("cache", cache)
    await conn.call(conn.raw.defineXML, ET.tostring(root, encoding="unicode"))


async def clone_vm(
    conn: Connection, vm: PreparedVm, name: str, *, base: Path, cache: str | None = DISK_CACHE
) -> PreparedVm:
    """A second VM from the same template: a qcow2 copy of ``vm``'s image (``qemu-img
    convert -U``, taken while ``vm`` idles), defined and started as ``name``."""
    started = time.monotonic()
    directory = vm_directory(base, prefix=f"{name}-")
    try:
        made = await create_vm(conn, name, directory, [vm.disk_size], start=False)
        image = made.disks[0]
        await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "convert", "-U", "-O", "qcow2", str(vm.image), str(image)],
            check=True,
            timeout=1800,
        )
        image.chmod(0o644)
        if cache is not None:
            await set_disk_cache(conn, name, cache)
        dom = await conn.lookup(name)
        await conn.call(dom.create, timeout=60)
    except BaseException:
        await remove_vm(conn, name, delete_directory=directory)
        raise
    return dataclasses.replace(
        vm, name=name, directory=directory, image=image, seconds=time.monotonic() - started
    )


async def remove_prepared_vm(conn: Connection, vm: PreparedVm) -> None:
    """Destroy and undefine the VM (with its checkpoints) and delete its directory."""
    await remove_vm(conn, vm.name, delete_directory=vm.directory)


@dataclass(frozen=True, slots=True)
class GuestWrites:
    """What :func:`guest_writes` wrote: ``extents`` are ``(offset, length)``."""

    extents: tuple[tuple[int, int], ...]
    bytes: int
    seconds: float

    def chunks_touched(self, chunk_size: int) -> int:
        """How many ``chunk_size`` chunks the writes dirtied (what a chunked backup reads)."""
        touched: set[int] = set()
        for offset, length in self.extents:
            touched.update(range(offset // chunk_size, (offset + length - 1) // chunk_size + 1))
        return len(touched)


async def _device_path(conn: Connection, name: str, target: str) -> str:
    dom = await conn.lookup(name)
    root = ET.fromstring(str(await conn.call(dom.XMLDesc, 0)))  # noqa: S314 - libvirt's XML
    for disk in root.findall("./devices/disk"):
        tgt = disk.find("target")
        alias = disk.find("alias")
        if tgt is not None and tgt.get("dev") == target and alias is not None:
            suffix = "/virtio-backend" if tgt.get("bus") == "virtio" else ""
            return f"/machine/peripheral/{alias.get('name')}{suffix}"
    raise NotFound(f"domain {name} has no running disk {target}")


def write_offsets(
    disk_size: int, total: int, size: int = WRITE_SIZE, *, seed: int = 0
) -> list[int]:
    """``total // size`` offsets (sorted, multiples of :data:`WRITE_ALIGN`) for writes of
    ``size`` bytes that do not overlap, drawn at random (``seed``) over the disk: the disk
    is cut into slots of ``2 * size`` and each write starts in the first half of its slot,
    never at its start: with ``size`` 1 MiB, no offset is a multiple of 1 MiB (aligned to
    no chunk size of 1 MiB or more).
    """
    rng = random.Random(seed)  # noqa: S311 - a reproducible layout, not a secret
    slot_size = 2 * size
    slots = disk_size // slot_size
    count = min(slots, max(1, total // size))
    starts = max(2, size // WRITE_ALIGN)
    return [
        slot * slot_size + rng.randrange(1, starts) * WRITE_ALIGN
        for slot in sorted(rng.sample(range(slots), count))
    ]


async def guest_writes(
    conn: Connection,
    vm: PreparedVm,
    total: int = 200 * MiB,
    *,
    size: int = WRITE_SIZE,
    offsets_seed: int = 0,
    content_seed: int = 1,
) -> GuestWrites:
    """Write ``total`` bytes into the running guest's disk as ``total // size`` scattered
    writes of ``size`` bytes, through the device (HMP ``qemu-io -d ... "write -s FILE OFF
    LEN"``), so that dirty bitmaps and the next incremental see them; then flush.

    Offsets depend on ``offsets_seed`` only (:func:`write_offsets`), content on
    ``content_seed`` (text, binary and random in turn): repeat with the same offsets and a
    new content seed to dirty the same ranges with new data.
    """
    started = time.monotonic()
    device = await _device_path(conn, vm.name, vm.target)
    offsets = write_offsets(vm.disk_size, total, size, seed=offsets_seed)
    kinds: tuple[content.Kind, ...] = ("text", "binary", "random")
    per_kind = (len(offsets) // len(kinds) + 1) * size
    readers = {
        kind: content.Reader(
            content.stream(kind, per_kind, seed=content_seed, skip=content_seed * per_kind)
        )
        for kind in kinds
    }
    source = vm.directory / "guest-write.bin"
    extents = []
    try:
        for index, offset in enumerate(offsets):
            data = b"".join(readers[kinds[index % len(kinds)]].take(size))
            source.write_bytes(data)
            source.chmod(0o644)
            command = f'qemu-io -d {device} "write -q -s {source} {offset} {size}"'
            output = await monitor_hmp(conn, vm.name, command)
            if output.strip():
                raise RuntimeError(f"guest write at {offset} failed: {output.strip()}")
            extents.append((offset, size))
        await monitor_hmp(conn, vm.name, f'qemu-io -d {device} "flush"')
    finally:
        source.unlink(missing_ok=True)
    return GuestWrites(
        extents=tuple(extents),
        bytes=sum(n for _, n in extents),
        seconds=time.monotonic() - started,
    )


async def remove_checkpoints(
    conn: Connection, name: str, *, prefix: str | None = None
) -> list[str]:
    """Delete the VM's checkpoints (only those whose name starts with ``prefix``, if
    given), leaves first, with their dirty bitmaps. Returns the names deleted.

    Call between two tools that back up the same VM: virtnbdbackup refuses to run next to
    a checkpoint it did not make, and deletes its own on every ``full``.
    """
    dom = await conn.lookup(name)
    deleted: list[str] = []
    while True:
        checkpoints = await conn.call(dom.listAllCheckpoints, 0)
        leaves = await conn.call(dom.listAllCheckpoints, libvirt.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES)
        wanted = {
            c.getName() for c in checkpoints if prefix is None or c.getName().startswith(prefix)
        }
        todo = [c for c in leaves if c.getName() in wanted]
        if not todo:
            # A wanted checkpoint that is not a leaf has unwanted children: delete it anyway
            # (libvirt merges its bitmap into its parent's).
            todo = [c for c in checkpoints if c.getName() in wanted]
            if not todo:
                return deleted
        for checkpoint in todo:
            await conn.call(checkpoint.delete, 0)
            deleted.append(checkpoint.getName())


# --------------------------------------------------------------------------- the peer


@dataclass(frozen=True, slots=True)
class PeerRun:
    """One timed run of ``virtnbdbackup`` or ``virtnbdrestore``."""

    tool: str
    #: ``full``, ``inc``, ``diff``, ``copy`` or ``restore``.
    level: str
    seconds: float
    #: Backup: bytes of the files this run added to the backup directory (data, metadata,
    #: logs). Restore: the restored image's allocated size.
    bytes_stored: int
    #: Backup: all files of the backup directory after the run.
    total_stored: int
    #: Guest bytes the tool reported reading (its "bytes of data extents"), if found.
    data_bytes: int | None
    #: CPU seconds of the tool's process (user + system).
    cpu_seconds: float
    #: CPU seconds the VM's QEMU used meanwhile (the NBD server), if known.
    qemu_cpu_seconds: float | None
    command: tuple[str, ...]
    output: Path
    #: Restore: the restored image.
    image: Path | None = None

    @property
    def mb_per_s(self) -> float | None:
        """Guest data read per second (10^6 bytes), when the tool reported it."""
        if self.data_bytes is None or self.seconds <= 0:
            return None
        return self.data_bytes / self.seconds / 1e6


class PeerError(RuntimeError):
    """The peer tool failed; the message ends with its output."""


def _empty(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


def _make_parent(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)


def _restored_images(output: Path) -> list[Path]:
    return sorted(p for p in output.iterdir() if p.is_file() and not p.name.endswith(".xml"))


def stored_bytes(path: Path) -> int:
    """Sum of the sizes of the files under ``path`` (what a copy of it would take);
    0 if it does not exist."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def allocated_bytes(path: Path) -> int:
    """Disk blocks used by ``path`` (sparse files count what is allocated)."""
    return path.stat().st_blocks * 512


def qemu_pid(name: str) -> int | None:
    """The PID of the running VM's QEMU (from libvirt's pid file), or None."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
    return None


def _process_cpu(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def qemu_nbd_pids(path_prefix: str) -> list[int]:
    """PIDs of ``qemu-nbd`` processes with an argument that starts with ``path_prefix``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        prefix = path_prefix.encode()
        if args and args[0].endswith(b"qemu-nbd") and any(a.startswith(prefix) for a in args):
            pids.append(int(proc.name))
    return pids


async def _wait_servers_gone(path_prefix: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while qemu_nbd_pids(path_prefix):
        if time.monotonic() > deadline:
            raise PeerError(f"qemu-nbd for {path_prefix} still runs after {timeout} s")
        await asyncio.sleep(0.02)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_DATA_BYTES = re.compile(r"(\d+) bytes of data extents to backup")
_RESTORED = re.compile(r"\[(\d+)\] bytes of data processed")


async def _timed(
    command: Sequence[str], qemu: int | None, timeout: float
) -> tuple[float, float, float | None, str]:
    """Run ``command``; (seconds, its CPU seconds, QEMU's CPU seconds, output).

    The tools leave temporary files behind (virtnbdrestore: an empty ``qemu-nbd*.log``
    per run): they get a private ``TMPDIR``, removed afterwards.
    """
    tmpdir = await asyncio.to_thread(tempfile.mkdtemp, prefix="vb-peer-tmp-")
    env = {**os.environ, "TMPDIR": tmpdir}
    cpu0, qemu0 = _children_cpu(), _process_cpu(qemu)
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        seconds = time.monotonic() - started
    finally:
        await asyncio.to_thread(shutil.rmtree, tmpdir, ignore_errors=True)
    qemu1 = _process_cpu(qemu)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise PeerError(f"{' '.join(command)} exited with {proc.returncode}:\n{tail}")
    qemu_cpu = qemu1 - qemu0 if qemu0 is not None and qemu1 is not None else None
    return seconds, _children_cpu() - cpu0, qemu_cpu, text


async def peer_backup(
    domain: str,
    output: Path,
    level: Level = "full",
    *,
    compress: bool | int = False,
    uri: str = "qemu:///system",
    extra: Sequence[str] = (),
    timeout: float = 3600.0,
) -> PeerRun:
    """Time ``virtnbdbackup -d DOMAIN -l LEVEL -o OUTPUT -n`` (no progress bar).

    ``full``/``copy`` need ``output`` to be new or empty (it is created); ``inc``/``diff``
    go into the directory of their full. ``compress`` adds ``-z`` (lz4; an int is the
    level). ``extra`` is passed as is (``-S`` scratch dir, ``-i vda``...).
    """
    if level in ("full", "copy") and not _empty(output):
        raise ValueError(f"{output} is not empty: a {level} backup needs a new directory")
    _make_parent(output)
    before = stored_bytes(output)
    command = ["virtnbdbackup", "-U", uri, "-d", domain, "-l", level, "-o", str(output), "-n"]
    if compress is not False:
        command += ["-z"] if compress is True else ["-z", str(compress)]
    command += list(extra)
    seconds, cpu, qemu_cpu, text = await _timed(command, qemu_pid(domain), timeout)
    total = stored_bytes(output)
    found = [int(m) for m in _DATA_BYTES.findall(text)]
    return PeerRun(
        tool="virtnbdbackup",
        level=level,
        seconds=seconds,
        bytes_stored=total - before,
        total_stored=total,
        data_bytes=sum(found) if found else None,
        cpu_seconds=cpu,
        qemu_cpu_seconds=qemu_cpu,
        command=tuple(command),
        output=output,
    )


async def peer_restore(
    backup: Path,
    output: Path,
    *,
    until: str | None = None,
    disk: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = 3600.0,
) -> PeerRun:
    """Time ``virtnbdrestore -i BACKUP -o OUTPUT -n`` (the whole chain, or ``--until`` a
    checkpoint like ``virtnbdbackup.0``). The log goes to ``OUTPUT.log`` beside ``output``
    (by default it would be ``~/virtnbdrestore.log``). The restored image is ``image``.
    """
    _make_parent(output)
    log = output.parent / f"{output.name}.log"
    command = ["virtnbdrestore", "-i", str(backup), "-o", str(output), "-n", "-L", str(log)]
    if until:
        command += ["--until", until]
    if disk:
        command += ["-d", disk]
    command += list(extra)
    started = time.monotonic()
    _, cpu, _, text = await _timed(command, None, timeout)
    # virtnbdrestore leaves its ``qemu-nbd --fork`` to finish writing the image after it
    # exits: until that process is gone, the image's metadata may not be on disk yet.
    await _wait_servers_gone(str(output) + "/", timeout=120)
    seconds = time.monotonic() - started
    images = _restored_images(output)
    found = [int(m) for m in _RESTORED.findall(text)]
    return PeerRun(
        tool="virtnbdrestore",
        level="restore",
        seconds=seconds,
        bytes_stored=sum(allocated_bytes(p) for p in images),
        total_stored=stored_bytes(output),
        data_bytes=sum(found) if found else None,
        cpu_seconds=cpu,
        qemu_cpu_seconds=None,
        command=tuple(command),
        output=output,
        image=images[0] if images else None,
    )


def images_equal(first: Path, second: Path, *, timeout: float = 600.0) -> bool:
    """``qemu-img compare -U FIRST SECOND`` (``first`` may be in use by a running VM)."""
    return compare_images(first, second, timeout=timeout)[0]


def compare_images(first: Path, second: Path, *, timeout: float = 600.0) -> tuple[bool, str]:
    """``qemu-img compare -U``: (identical, what it said, e.g. the first mismatch)."""
    result = subprocess.run(
        ["qemu-img", "compare", "-U", str(first), str(second)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode not in (0, 1):
        raise PeerError(f"qemu-img compare failed: {result.stderr.strip()}")
    return result.returncode == 0, (result.stdout + result.stderr).strip()


# --------------------------------------------------------------------------- one cycle


@dataclass
class PeerCycle:
    """One repetition: full, guest writes, incremental, restore of the chain, compare."""

    full: PeerRun
    writes: GuestWrites
    inc: PeerRun
    restore: PeerRun
    identical: bool
    #: What ``qemu-img compare`` said.
    compare: str = ""


def warm_image(path: Path) -> None:
    """Read the VM's image once, so that every tool's full backup starts with it in the
    host's page cache. Without this, whichever tool runs after a restore that replaced
    the image (VirtBackup's restore overwrites the VM's disk) reads it from the disk,
    which on the benchmark machine costs QEMU about 3 s more CPU: a difference of cache
    state, not of the tools."""
    with path.open("rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        while f.readinto(buf):
            pass


def settle() -> None:
    """Write back what earlier steps left dirty in the page cache (a reference copy, the
    peer's buffered backup files) before a timed step, so that no step pays for the
    write-back of the one before it."""
    os.sync()


async def peer_cycle(
    conn: Connection,
    vm: PreparedVm,
    workdir: Path,
    *,
    rep: int = 0,
    compress: bool | int = False,
    write_bytes: int = 200 * MiB,
    write_size: int = WRITE_SIZE,
    keep: bool = False,
) -> PeerCycle:
    """Full backup into ``workdir/peer-<rep>``, :func:`guest_writes` (same offsets every
    rep, new content), incremental, restore into ``workdir/peer-<rep>-restore`` and
    compare with the live image. The backup and restore are deleted unless ``keep``;
    virtnbdbackup's checkpoints are removed at the end."""
    backup = workdir / f"peer-{rep}"
    restored = workdir / f"peer-{rep}-restore"
    for path in (backup, restored):
        shutil.rmtree(path, ignore_errors=True)
    try:
        await asyncio.to_thread(warm_image, vm.image)
        await asyncio.to_thread(settle)
        full = await peer_backup(vm.name, backup, "full", compress=compress)
        writes = await guest_writes(
            conn, vm, write_bytes, size=write_size, offsets_seed=0, content_seed=rep + 1
        )
        await asyncio.to_thread(settle)
        inc = await peer_backup(vm.name, backup, "inc", compress=compress)
        await asyncio.to_thread(settle)
        restore = await peer_restore(backup, restored)
        if restore.image is None:
            raise PeerError(f"virtnbdrestore left no image in {restored}")
        identical, said = await asyncio.to_thread(compare_images, vm.image, restore.image)
    finally:
        await remove_checkpoints(conn, vm.name, prefix=PEER_CHECKPOINT_PREFIX)
        if not keep:
            shutil.rmtree(backup, ignore_errors=True)
            shutil.rmtree(restored, ignore_errors=True)
            (workdir / f"{restored.name}.log").unlink(missing_ok=True)
    return PeerCycle(
        full=full, writes=writes, inc=inc, restore=restore, identical=identical, compare=said
    )


# --------------------------------------------------------------------------- standalone


@dataclass
class PeerReport:
    version: str | None
    vm: dict[str, Any]
    compress: bool | int
    cycles: list[PeerCycle] = field(default_factory=list)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(report: PeerReport) -> str:
    """A table of medians over the cycles."""
    lines = [
        f"virtnbdbackup {report.version}, {report.vm['disk_size'] / GiB:g} GiB disk,"
        f" {report.vm['content_bytes'] / GiB:.2f} GiB written, compress={report.compress},"
        f" {len(report.cycles)} rep(s), medians",
        f"{'step':<10} {'seconds':>8} {'MB/s':>7} {'read MB':>8} {'stored MB':>10}"
        f" {'tool cpu s':>10} {'qemu cpu s':>10}",
    ]
    for step in ("full", "inc", "restore"):
        runs: list[PeerRun] = [getattr(c, step) for c in report.cycles]
        speeds = [r.mb_per_s for r in runs if r.mb_per_s is not None]
        data = [float(r.data_bytes) for r in runs if r.data_bytes is not None]
        qemu = [r.qemu_cpu_seconds for r in runs if r.qemu_cpu_seconds is not None]
        lines.append(
            f"{step:<10} {_median([r.seconds for r in runs]):>8.2f} {_median(speeds):>7.0f}"
            f" {_median(data) / 1e6:>8.0f} {_median([r.bytes_stored for r in runs]) / 1e6:>10.0f}"
            f" {_median([r.cpu_seconds for r in runs]):>10.2f} {_median(qemu):>10.2f}"
        )
    writes = report.cycles[0].writes if report.cycles else None
    if writes is not None:
        lines.append(
            f"guest writes: {len(writes.extents)} x {writes.extents[0][1] // 1024} KiB ="
            f" {writes.bytes / MiB:.0f} MiB in {writes.seconds:.1f} s"
            f" ({writes.chunks_touched(4 * MiB)} chunks of 4 MiB touched)"
        )
    same = all(c.identical for c in report.cycles)
    lines.append(f"restored images identical to the live disk: {same}")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


async def _main(args: argparse.Namespace) -> PeerReport:
    install_peer()
    async with await open_connection() as conn:
        vm = await prepare_vm(
            conn,
            args.name,
            disk_size=args.disk_size * GiB,
            content_size=int(args.content_size * GiB),
        )
        print(f"prepared {vm.name} in {vm.seconds:.1f} s ({vm.image})", file=sys.stderr)
        report = PeerReport(
            version=peer_version(),
            vm={
                "name": vm.name,
                "disk_size": vm.disk_size,
                "content_bytes": vm.content_bytes,
                "prepare_seconds": round(vm.seconds, 1),
            },
            compress=args.compress,
        )
        try:
            for rep in range(args.reps):
                cycle = await peer_cycle(
                    conn,
                    vm,
                    vm.directory,
                    rep=rep,
                    compress=args.compress,
                    write_bytes=args.write_mib * MiB,
                    keep=args.keep,
                )
                report.cycles.append(cycle)
                print(
                    f"rep {rep}: full {cycle.full.seconds:.1f} s, inc {cycle.inc.seconds:.1f} s,"
                    f" restore {cycle.restore.seconds:.1f} s, {cycle.compare}",
                    file=sys.stderr,
                )
        finally:
            if args.keep:
                print(f"kept {vm.name} and {vm.directory}", file=sys.stderr)
            else:
                await remove_prepared_vm(conn, vm)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time virtnbdbackup/virtnbdrestore on a VM")
    parser.add_argument("--name", default=DEFAULT_VM)
    parser.add_argument("--disk-size", type=int, default=4, help="GiB")
    parser.add_argument("--content-size", type=float, default=2, help="GiB of mixed content")
    parser.add_argument("--write-mib", type=int, default=200, help="guest writes before inc")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--compress", nargs="?", const=True, default=False, type=int, help="-z [level]"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the VM and the backups")
    args = parser.parse_args(argv)
    report = asyncio.run(_main(args))
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(_jsonable(asdict(report)), indent=2) + "\n")
    return 0 if all(c.identical for c in report.cycles) else 1


if __name__ == "__main__":
    raise SystemExit(main())
