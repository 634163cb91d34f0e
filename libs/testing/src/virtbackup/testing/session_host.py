"""A second libvirt host for tests: another user's ``qemu:///session`` daemon over SSH.

This machine's system libvirtd is the first host; the second is the session daemon of
the system user :data:`SESSION_USER` (made once, in group ``kvm``, home
:data:`SESSION_HOME`, mode 0700), reached through an sshd on loopback that logs that user
in by key (``SshdServer(root=True, login=SESSION_USER)``). Its VMs run as that user, its
images, NVRAM and TLS folder are under that home: nothing there is root's, as on a host
of its own. Typical use (the suite's ``session_host`` fixture does the first two)::

    host = SessionHost()
    host.start()                                   # sshd up, session libvirtd running
    cfg["servers"].append(host.server_config())    # {"id": "session", "uri": ..., ...}
    async with await host.connect() as conn:       # root's own look at the session daemon
        vm = await host.create_vm(conn, f"t-{os.getpid()}", [64 * MiB])
    host.close()                                   # its VMs destroyed and undefined, images gone

Needs root (``useradd``, ``runuser``, sshd). Set-up is idempotent: the user and its
session daemon may stay between runs (the daemon exits by itself when idle). ``close``
removes the VMs of this process (names with ``-<pid>`` followed by a non-digit or the
end, as the tests name them, and every VM :meth:`create_vm` made) and the image folder it made.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

import libvirt

from virtbackup.testing.images import create_image
from virtbackup.testing.libvirtd import domain_type
from virtbackup.testing.servers import ServerError
from virtbackup.testing.sshd import SshdServer
from virtbackup.testing.vms import SmallVm, build_vm_xml, disk_target
from virtbackup.virt import Connection, open_connection
from virtbackup.virt.session import SessionDaemon, ensure_session_argv, parse_session_daemon

__all__ = ["SESSION_HOME", "SESSION_USER", "SessionHost", "ensure_session_user", "run_as"]

#: The user whose session daemon is the second host.
SESSION_USER: Final = "vbsess"
SESSION_HOME: Final = Path("/var/lib/vbsess")
_PATH: Final = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def ensure_session_user() -> pwd.struct_passwd:
    """Create :data:`SESSION_USER` if needed (system user, group ``kvm`` for ``/dev/kvm``,
    shell ``/bin/sh`` for SSH commands, no password: key logins only, home
    :data:`SESSION_HOME` mode 0700) and return it.
    Idempotent; raises ``ServerError`` when not root."""
    if os.geteuid() != 0:
        raise ServerError("the session host needs root (to make its user and start sshd)")
    try:
        pwd.getpwnam(SESSION_USER)
    except KeyError:
        made = subprocess.run(
            ["useradd", "--system", "--create-home", "--home-dir", str(SESSION_HOME),
             "--shell", "/bin/sh", "--groups", "kvm", SESSION_USER],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if made.returncode not in (0, 9):  # 9: made by another process meanwhile
            raise ServerError(f"useradd {SESSION_USER}: {made.stderr.strip()}") from None
    user = pwd.getpwnam(SESSION_USER)
    with contextlib.suppress(KeyError):
        if SESSION_USER not in grp.getgrnam("kvm").gr_mem:
            subprocess.run(["usermod", "-a", "-G", "kvm", SESSION_USER], check=True)
    if user.pw_shell != "/bin/sh":
        subprocess.run(["usermod", "-s", "/bin/sh", SESSION_USER], check=True)
    status = subprocess.run(["passwd", "-S", SESSION_USER], capture_output=True, text=True)
    if status.stdout.split()[1:2] == ["L"]:
        # A locked account ('!') may not log in at all, by key neither (sshd without
        # PAM): '*' means no password, key logins only.
        subprocess.run(["usermod", "-p", "*", SESSION_USER], check=True)
    home = Path(user.pw_dir)
    home.mkdir(mode=0o700, exist_ok=True)
    os.chown(home, user.pw_uid, user.pw_gid)
    home.chmod(0o700)
    return pwd.getpwnam(SESSION_USER)


def run_as(argv: Sequence[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as :data:`SESSION_USER` with a clean login-like environment (no
    ``XDG_RUNTIME_DIR``, as over SSH here)."""
    return subprocess.run(
        ["runuser", "-u", SESSION_USER, "--", "env", "-i", f"HOME={SESSION_HOME}",
         f"USER={SESSION_USER}", f"LOGNAME={SESSION_USER}", f"PATH={_PATH}", *argv],
        capture_output=True, text=True, timeout=timeout, check=False, cwd="/",
    )  # fmt: skip


class SessionHost:
    """The session user's sshd and daemon, and a folder of images for this process."""

    def __init__(self) -> None:
        self.user = ensure_session_user()
        self.sshd = SshdServer(root=True, login=SESSION_USER)
        #: A 0700 folder of the user's for this process's images (restores and
        #: migrations write there: the server config's ``restoreDirectories``).
        self.images = Path(self.user.pw_dir) / f"vbtest-{os.getpid()}"
        self.daemon: SessionDaemon | None = None
        self._made: set[str] = set()

    @property
    def uri(self) -> str:
        """The session daemon's socket as root opens it here (``qemu+unix:///session``)."""
        return "qemu+unix:///session?" + urlencode(
            {"socket": self.ensure_daemon().socket}, safe="/"
        )

    def start(self) -> None:
        """Start the sshd, make the image folder and make sure the daemon runs."""
        self.sshd.start()
        self.images.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.images, self.user.pw_uid, self.user.pw_gid)
        self.ensure_daemon()

    def ensure_daemon(self, timeout: float = 30) -> SessionDaemon:
        """Start the session daemon as VirtBackup does (its TLS folder in the user's
        qemu.conf) if it is not running; where it is."""
        done = run_as(ensure_session_argv(timeout), timeout=timeout + 15)
        if done.returncode != 0:
            raise ServerError(f"the session libvirtd did not start: {done.stderr.strip()}")
        self.daemon = parse_session_daemon(done.stdout)
        return self.daemon

    def stop_daemon(self) -> None:
        """Stop the session daemon (SIGTERM, its VMs keep running), as an idle one does."""
        pid_file = str(Path(self.ensure_daemon().socket).parent / "libvirtd.pid")
        script = 'p=$(cat "$1") && kill "$p" && while kill -0 "$p" 2>/dev/null; do sleep 0.1; done'
        stopped = run_as(["sh", "-c", script, "stop", pid_file], timeout=30)
        if stopped.returncode != 0:
            raise ServerError(f"cannot stop the session libvirtd: {stopped.stderr.strip()}")

    def server_config(self, server_id: str = "session", **extra: Any) -> dict[str, Any]:
        """The server as the configuration takes it (wire names): SSH by key to the
        session user, host key pinned, ``uri`` ``qemu:///session``; ``extra`` overrides."""
        config: dict[str, Any] = {
            "id": server_id,
            "name": f"{SESSION_USER}'s session libvirt",
            "host": self.sshd.host,
            "port": self.sshd.port,
            "username": SESSION_USER,
            "privateKey": self.sshd.private_key,
            "hostKey": self.sshd.host_key,
            "uri": "qemu:///session",
            "restoreDirectories": [str(self.images)],
        }
        config.update(extra)
        return config

    async def connect(self) -> Connection:
        """Root's own connection to the session daemon (for a test's set-up and checks)."""
        return await open_connection(self.uri)

    def give(self, path: Path) -> Path:
        """Make ``path`` the session user's (0600 for a file, 0700 for a folder)."""
        os.chown(path, self.user.pw_uid, self.user.pw_gid)
        path.chmod(0o700 if path.is_dir() else 0o600)
        return path

    async def create_vm(
        self, conn: Connection, name: str, disk_sizes: Sequence[int], *, start: bool = True
    ) -> SmallVm:
        """An OS-less VM of the session daemon with qcow2 images of the user's in
        :attr:`images` (see ``virtbackup.testing.vms.create_vm``), removed by ``close``."""
        self._made.add(name)
        with contextlib.suppress(libvirt.libvirtError):
            _remove(conn.raw, name)
        paths = tuple(
            self.give(create_image(self.images / f"{name}-{disk_target(i)}.qcow2", size))
            for i, size in enumerate(disk_sizes)
        )
        xml = build_vm_xml(name, paths, virt_type=domain_type())
        dom = await conn.call(conn.raw.defineXML, xml)
        if start:
            await conn.call(dom.create, timeout=60)
        return SmallVm(
            name=name,
            directory=self.images,
            disks=paths,
            targets=tuple(disk_target(i) for i in range(len(paths))),
        )

    def remove_vms(self) -> list[str]:
        """Destroy and undefine the VMs of this process (see the module docstring)."""
        ours = re.compile(rf"-{os.getpid()}(\D|$)")
        if self.daemon is None:
            return []
        removed = []
        try:
            raw = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return []
        try:
            for dom in raw.listAllDomains():
                name = dom.name()
                if name in self._made or ours.search(name):
                    with contextlib.suppress(libvirt.libvirtError):
                        _remove(raw, name)
                    removed.append(name)
        finally:
            raw.close()
        return removed

    def close(self) -> None:
        """Remove this process's VMs and images; stop the sshd (the user stays)."""
        try:
            self.remove_vms()
        finally:
            shutil.rmtree(self.images, ignore_errors=True)
            self.sshd.close()

    def __enter__(self) -> SessionHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove(raw: Any, name: str) -> None:
    dom = raw.lookupByName(name)
    with contextlib.suppress(libvirt.libvirtError):
        dom.abortJob()
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()
    dom.undefineFlags(
        libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        | libvirt.VIR_DOMAIN_UNDEFINE_TPM
    )
