"""A running libvirtd with usable KVM on this machine, for tests and the benchmark.

Needs root to start the daemons and to fix ``/dev/kvm`` access; a no-op where both are
already right.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Final

__all__ = [
    "LIBVIRT_SOCKET",
    "VIRTLOGD_SOCKET",
    "domain_type",
    "ensure_kvm_access",
    "ensure_libvirtd",
    "kvm_usable",
]

LIBVIRT_SOCKET: Final = "/var/run/libvirt/libvirt-sock"
VIRTLOGD_SOCKET: Final = "/var/run/libvirt/virtlogd-sock"


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
