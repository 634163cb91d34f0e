"""Helpers for tests that need a real libvirtd, a small VM and an ssh server.

Importable from any package's tests (no pytest import here). Needs root for starting
daemons and for QEMU to open the images. Typical use::

    ensure_libvirtd()
    directory = vm_directory()
    async with await open_connection() as conn:
        vm = await create_vm(conn, "t-backup", directory, [64 * MiB, 32 * MiB])
        await guest_write(conn, vm.name, "vda", 0, 4 * MiB, pattern=0xAB)
        ...
        await remove_vm(conn, vm.name)

VMs have no operating system: SeaBIOS finds nothing to boot and idles, which is enough
for pull-mode backups, checkpoints and monitor writes. Such a guest ignores ACPI
(``shutdown``/``reboot`` requests do nothing). The domain type is ``kvm`` when QEMU can
open ``/dev/kvm``, else ``qemu`` (TCG).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import libvirt
import libvirt_qemu  # type: ignore[import-untyped]

from virtbackup.virt import _xml
from virtbackup.virt.connection import Connection
from virtbackup.virt.errors import Conflict, NotFound, VirtError
from virtbackup.virt.events import WatchEvent

MiB = 1024 * 1024
LIBVIRT_SOCKET = "/var/run/libvirt/libvirt-sock"
VIRTLOGD_SOCKET = "/var/run/libvirt/virtlogd-sock"


# --------------------------------------------------------------------------- daemons


def _socket_accepts(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1)
    try:
        sock.connect(path)
    except OSError:
        return False
    finally:
        sock.close()
    return True


def ensure_kvm_access() -> bool:
    """Give QEMU's user access to ``/dev/kvm`` as Debian's udev rule does (group ``kvm``,
    mode 0660; 0666 if the qemu user is not in group ``kvm``). Returns :func:`kvm_usable`.

    Why: in containers ``/dev/kvm`` is often ``root:root 0600``. libvirt 9.0 then probes
    QEMU (which opens ``/dev/kvm`` before dropping to the qemu user) as KVM-capable, but
    validates its capability cache against the qemu user's access and finds KVM unusable:
    it re-probes QEMU (several seconds) on *every* capability lookup, which makes each
    define/start take seconds and, under concurrency, minutes. Needs root; a no-op when
    ``/dev/kvm`` is absent or already accessible.
    """
    if not os.path.exists("/dev/kvm") or kvm_usable() or os.geteuid() != 0:
        return kvm_usable()
    user = _qemu_user()
    try:
        kvm_group = grp.getgrnam("kvm")
        member = user in kvm_group.gr_mem or pwd.getpwnam(user).pw_gid == kvm_group.gr_gid
    except KeyError:
        member = False
    if member:
        os.chown("/dev/kvm", -1, kvm_group.gr_gid)
        os.chmod("/dev/kvm", 0o660)
    else:
        os.chmod("/dev/kvm", 0o666)  # noqa: S103 - what udev does where there is no kvm group
    return kvm_usable()


def ensure_libvirtd(timeout: float = 30.0) -> None:
    """Make sure ``virtlogd`` and ``libvirtd`` run (start them with ``-d`` if not) and
    libvirtd's socket accepts connections; first fix ``/dev/kvm`` access
    (:func:`ensure_kvm_access`). Raises RuntimeError if that needs root and this process
    is not root, or if the socket does not come up within ``timeout`` seconds."""
    ensure_kvm_access()
    if _socket_accepts(LIBVIRT_SOCKET) and _socket_accepts(VIRTLOGD_SOCKET):
        return
    if os.geteuid() != 0:
        raise RuntimeError("libvirtd is not running and only root can start it")
    if not _socket_accepts(VIRTLOGD_SOCKET):
        subprocess.run(["virtlogd", "-d"], check=True, timeout=30)
    if not _socket_accepts(LIBVIRT_SOCKET):
        subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
    deadline = time.monotonic() + timeout
    while not (_socket_accepts(LIBVIRT_SOCKET) and _socket_accepts(VIRTLOGD_SOCKET)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"libvirtd socket {LIBVIRT_SOCKET} not ready after {timeout} s")
        time.sleep(0.1)


def _qemu_user() -> str:
    try:
        text = Path("/etc/libvirt/qemu.conf").read_text()
    except OSError:
        return "libvirt-qemu"
    match = re.search(r'^\s*user\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return match.group(1) if match else "libvirt-qemu"


def kvm_usable() -> bool:
    """Whether QEMU, running as libvirt's qemu user, can open ``/dev/kvm`` read-write."""
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return False
    if not stat.S_ISCHR(st.st_mode):
        return False
    user = _qemu_user()
    if user in ("root", "+0"):
        return True
    if st.st_mode & 0o006 == 0o006:
        return True
    try:
        pw = pwd.getpwnam(user)
        group = grp.getgrgid(st.st_gid)
    except KeyError:
        return False
    in_group = pw.pw_gid == st.st_gid or user in group.gr_mem
    if in_group and st.st_mode & 0o060 == 0o060:
        return True
    return pw.pw_uid == st.st_uid and st.st_mode & 0o600 == 0o600


def domain_type() -> str:
    """``kvm`` when usable, else ``qemu``."""
    return "kvm" if kvm_usable() else "qemu"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vm_directory(
    base: str | Path = "/var/tmp",  # noqa: S108 - mkdtemp below makes a private name
    prefix: str = "vbtest-",
) -> Path:
    """A new directory for images and scratch files that QEMU (not root) can traverse.

    pytest's ``tmp_path`` is under a 0700 directory, which QEMU cannot enter.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    path.chmod(0o755)
    return path


def create_image(path: Path, size: int, fmt: str = "qcow2") -> Path:
    """``qemu-img create`` an empty image of ``size`` bytes."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True, timeout=30
    )
    return path


# --------------------------------------------------------------------------- VMs


@dataclass(frozen=True, slots=True)
class SmallVm:
    """A VM made by :func:`create_vm`: ``disks[i]`` is the image of target ``vd<a+i>``."""

    name: str
    directory: Path
    disks: tuple[Path, ...]
    cdrom: Path | None = None
    targets: tuple[str, ...] = field(default=())


def disk_target(index: int) -> str:
    """``vda``, ``vdb``, ... for disk ``index``."""
    return "vd" + chr(ord("a") + index)


def build_vm_xml(
    name: str,
    disks: Sequence[Path],
    *,
    memory_mib: int = 64,
    virt_type: str | None = None,
    cdrom: Path | None = None,
    formats: Sequence[str] | None = None,
    user_aliases: bool = False,
) -> str:
    """Domain XML for a small OS-less VM: virtio disks ``vda``... on ``disks``, an optional
    SATA CD-ROM ``sda`` with ``cdrom`` inserted, no network, graphics, USB or balloon.
    ``user_aliases`` names the disk devices ``ua-disk-vda``... instead of libvirt's
    ``virtio-disk0``..."""
    root = ET.Element("domain", type=virt_type or domain_type())
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(root, "vcpu").text = "1"
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    ET.SubElement(ET.SubElement(root, "features"), "acpi")
    ET.SubElement(root, "on_crash").text = "destroy"
    devices = ET.SubElement(root, "devices")
    for index, path in enumerate(disks):
        fmt = formats[index] if formats is not None else "qcow2"
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=fmt)
        ET.SubElement(disk, "source", file=str(path))
        ET.SubElement(disk, "target", dev=disk_target(index), bus="virtio")
        if user_aliases:
            ET.SubElement(disk, "alias", name=f"ua-disk-{disk_target(index)}")
    if cdrom is not None:
        drive = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(drive, "driver", name="qemu", type="raw")
        ET.SubElement(drive, "source", file=str(cdrom))
        ET.SubElement(drive, "target", dev="sda", bus="sata")
        ET.SubElement(drive, "readonly")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return _xml.dump(root)


async def create_vm(
    conn: Connection,
    name: str,
    directory: Path,
    disk_sizes: Sequence[int],
    *,
    memory_mib: int = 64,
    start: bool = True,
    with_cdrom: bool = False,
    user_aliases: bool = False,
) -> SmallVm:
    """Create qcow2 images ``<name>-vda.qcow2``... of ``disk_sizes`` bytes in
    ``directory``, define the VM (replacing a leftover of the same name) and start it.

    ``with_cdrom`` also inserts a 1 MiB file as a CD-ROM medium (target ``sda``);
    ``user_aliases`` gives the disks ``ua-`` aliases (see :func:`build_vm_xml`).
    """
    await remove_vm(conn, name)
    paths = tuple(
        create_image(directory / f"{name}-{disk_target(i)}.qcow2", size)
        for i, size in enumerate(disk_sizes)
    )
    cdrom: Path | None = None
    if with_cdrom:
        cdrom = directory / f"{name}-cdrom.iso"
        with cdrom.open("wb") as fh:
            fh.truncate(MiB)
        cdrom.chmod(0o644)
    xml = build_vm_xml(name, paths, memory_mib=memory_mib, cdrom=cdrom, user_aliases=user_aliases)
    dom = await conn.call(conn.raw.defineXML, xml)
    if start:
        await conn.call(dom.create, timeout=60)
    return SmallVm(
        name=name,
        directory=directory,
        disks=paths,
        cdrom=cdrom,
        targets=tuple(disk_target(i) for i in range(len(paths))),
    )


async def remove_vm(conn: Connection, name: str, *, delete_directory: Path | None = None) -> None:
    """Destroy (if running) and undefine ``name`` with its checkpoint and snapshot
    metadata; quiet when it does not exist. ``delete_directory`` is removed afterwards."""
    try:
        dom = await conn.lookup(name)
    except NotFound:
        dom = None
    if dom is not None:
        with contextlib.suppress(Conflict, NotFound):
            await conn.call(dom.abortJob)
        with contextlib.suppress(Conflict, NotFound):
            await conn.call(dom.destroy, timeout=60)
        with contextlib.suppress(NotFound):
            await conn.call(
                dom.undefineFlags,
                libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
            )
    if delete_directory is not None:
        shutil.rmtree(delete_directory, ignore_errors=True)


async def monitor_hmp(conn: Connection, name: str, command: str) -> str:
    """Run a human monitor (HMP) command in the domain's QEMU and return its output.

    Uses libvirt-qemu's unsupported passthrough: libvirt marks the domain ``tainted``.
    For tests only.
    """
    dom = await conn.lookup(name)
    flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    return str(await conn.call(libvirt_qemu.qemuMonitorCommand, dom, command, flags))


async def guest_write(
    conn: Connection,
    name: str,
    target: str,
    offset: int,
    length: int,
    *,
    pattern: int = 0xAB,
    flush: bool = True,
) -> None:
    """Write ``length`` bytes of ``pattern`` at ``offset`` of disk ``target`` as if the
    guest did (through the device, so dirty bitmaps record it).

    Runs ``qemu-io -d /machine/peripheral/<alias>/virtio-backend "write -P ..."`` in the
    monitor; the alias comes from the live XML (``virtio-disk0`` or a ``ua-`` alias).
    ``flush`` then flushes the device, so that ``qemu-img -U`` on the image file sees the
    data and the qcow2 metadata.
    """
    dom = await conn.lookup(name)
    root = _xml.parse(str(await conn.call(dom.XMLDesc, 0)))
    alias: str | None = None
    bus: str | None = None
    for disk in root.findall("./devices/disk"):
        tgt = disk.find("target")
        if tgt is not None and tgt.get("dev") == target:
            al = disk.find("alias")
            alias = al.get("name") if al is not None else None
            bus = tgt.get("bus")
    if alias is None:
        raise NotFound(f"domain {name} has no running disk {target}")
    device = f"/machine/peripheral/{alias}" + ("/virtio-backend" if bus == "virtio" else "")
    command = f'qemu-io -d {device} "write -P 0x{pattern:02x} {offset} {length}"'
    output = await monitor_hmp(conn, name, command)
    if flush:
        output += await monitor_hmp(conn, name, f'qemu-io -d {device} "flush"')
    if "error" in output.lower() or "not found" in output.lower():
        raise VirtError(f"guest write failed: {output.strip()}")


# --------------------------------------------------------------------------- sshd


@dataclass(slots=True)
class Sshd:
    """An OpenSSH server on 127.0.0.1 with its own config and keys.

    ``client_key`` (OpenSSH private key file) logs in as ``user`` (root); ``known_hosts``
    holds the server's host key for ``[127.0.0.1]:port``.
    """

    host: str
    port: int
    user: str
    directory: Path
    client_key: Path
    known_hosts: Path
    process: subprocess.Popen[bytes]

    async def connect(self) -> asyncssh.SSHClientConnection:
        """An asyncssh client connection with key auth and host key verification."""
        return await asyncssh.connect(
            self.host,
            port=self.port,
            username=self.user,
            client_keys=[str(self.client_key)],
            known_hosts=str(self.known_hosts),
            agent_path=None,
        )

    def stop(self) -> None:
        """Terminate the server (idempotent)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_sshd(directory: Path, *, port: int | None = None, timeout: float = 15.0) -> Sshd:
    """Start ``/usr/sbin/sshd`` on 127.0.0.1 (root login by a generated ed25519 key only,
    ``UsePAM no``, stream-local forwarding allowed) with config and keys in ``directory``.

    Must run as root (sshd's privilege separation). Raises RuntimeError if it does not
    listen within ``timeout`` seconds.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key_path = directory / "ssh_host_ed25519_key"
    host_key.write_private_key(str(host_key_path))
    host_key_path.chmod(0o600)
    client_key = asyncssh.generate_private_key("ssh-ed25519", comment="virtbackup-test")
    client_key_path = directory / "client_ed25519"
    client_key.write_private_key(str(client_key_path))
    client_key_path.chmod(0o600)
    client_key.write_public_key(str(directory / "client_ed25519.pub"))
    authorized = directory / "authorized_keys"
    client_key.write_public_key(str(authorized))
    authorized.chmod(0o600)
    known_hosts = directory / "known_hosts"
    public = host_key.export_public_key("openssh").decode().strip()
    known_hosts.write_text(f"[127.0.0.1]:{port} {public}\n")
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key_path}",
                f"PidFile {directory / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "AllowTcpForwarding yes",
                "AllowStreamLocalForwarding yes",
                "Subsystem sftp internal-sftp",
                "LogLevel ERROR",
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    process = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(directory / "sshd.log").open("wb"),
    )
    server = Sshd(
        host="127.0.0.1",
        port=port,
        user="root",
        directory=directory,
        client_key=client_key_path,
        known_hosts=known_hosts,
        process=process,
    )
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            log = (directory / "sshd.log").read_text(errors="replace")
            raise RuntimeError(f"sshd exited with {process.returncode}: {log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"sshd did not listen on port {port} within {timeout} s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- QMP, NBD tools


async def monitor_qmp(conn: Connection, name: str, command: dict[str, object]) -> object:
    """Run a QMP command in the domain's QEMU and return its ``return`` value (tests only,
    taints the domain like :func:`monitor_hmp`). Raises VirtError on a QMP error."""
    dom = await conn.lookup(name)
    reply = str(await conn.call(libvirt_qemu.qemuMonitorCommand, dom, json.dumps(command), 0))
    data = json.loads(reply)
    if "error" in data:
        raise VirtError(f"QMP {command.get('execute')}: {data['error']}")
    return data.get("return")


async def drop_bitmap(conn: Connection, name: str, target: str, bitmap: str) -> None:
    """Delete dirty bitmap ``bitmap`` of disk ``target`` behind libvirt's back, as a crash
    or a foreign tool would (``block-dirty-bitmap-remove`` on the disk's format node)."""
    dom = await conn.lookup(name)
    root = _xml.parse(str(await conn.call(dom.XMLDesc, 0)))
    alias = None
    for disk in root.findall("./devices/disk"):
        tgt = disk.find("target")
        al = disk.find("alias")
        if tgt is not None and tgt.get("dev") == target and al is not None:
            alias = al.get("name")
    if alias is None:
        raise NotFound(f"domain {name} has no running disk {target}")
    blocks = await monitor_qmp(conn, name, {"execute": "query-block"})
    assert isinstance(blocks, list)
    for block in blocks:
        if alias in str(block.get("qdev", "")) and block.get("inserted"):
            node = block["inserted"]["node-name"]
            await monitor_qmp(
                conn,
                name,
                {
                    "execute": "block-dirty-bitmap-remove",
                    "arguments": {"node": node, "name": bitmap},
                },
            )
            return
    raise NotFound(f"no block node for {target} ({alias})")


@dataclass(frozen=True, slots=True)
class MapExtent:
    """One line of ``nbdinfo --map``: ``type`` is the numeric flags, ``description`` e.g.
    ``data``, ``hole,zero``, ``dirty``, ``clean``."""

    offset: int
    length: int
    type: int
    description: str


def nbd_map(uri: str, context: str | None = None, *, timeout: float = 60.0) -> list[MapExtent]:
    """``nbdinfo --map[=CONTEXT] URI``, parsed (``base:allocation`` by default)."""
    opt = f"--map={context}" if context else "--map"
    out = subprocess.run(
        ["nbdinfo", opt, uri], check=True, capture_output=True, text=True, timeout=timeout
    ).stdout
    extents: list[MapExtent] = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3:
            extents.append(
                MapExtent(int(parts[0]), int(parts[1]), int(parts[2]), (parts[3:] or [""])[0])
            )
    return extents


def nbd_info(uri: str, *, timeout: float = 60.0) -> dict[str, object]:
    """``nbdinfo --json URI``: the export's properties (``export-size``,
    ``can_multi_conn``, ``contexts``, ...)."""
    out = subprocess.run(
        ["nbdinfo", "--json", uri], check=True, capture_output=True, text=True, timeout=timeout
    ).stdout
    data = json.loads(out)
    exports = data.get("exports") or [{}]
    return dict(exports[0])


def nbd_copy(uri: str, destination: Path, *, timeout: float = 120.0) -> Path:
    """Copy an NBD export to a raw file with ``nbdcopy`` (sparse where the export is)."""
    subprocess.run(["nbdcopy", uri, str(destination)], check=True, timeout=timeout)
    return destination


def images_equal(first: Path | str, second: Path | str, *, second_format: str = "raw") -> bool:
    """``qemu-img compare -U``: same guest-visible content (``first`` may be in use)."""
    result = subprocess.run(
        ["qemu-img", "compare", "-U", "-F", second_format, str(first), str(second)],
        capture_output=True,
        timeout=120,
    )
    if result.returncode not in (0, 1):
        raise VirtError(f"qemu-img compare failed: {result.stderr.decode(errors='replace')}")
    return result.returncode == 0


async def wait_for_event(
    queue: asyncio.Queue[WatchEvent],
    predicate: Callable[[WatchEvent], bool],
    timeout: float,
) -> WatchEvent:
    """The first event from ``queue`` matching ``predicate`` within ``timeout`` seconds
    (others are discarded); TimeoutError otherwise."""

    async def scan() -> WatchEvent:
        while True:
            item = await queue.get()
            if predicate(item):
                return item

    return await asyncio.wait_for(scan(), timeout)
