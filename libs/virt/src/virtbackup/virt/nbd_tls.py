"""TLS for the NBD exports on a hypervisor: VirtBackup's server certificate where QEMU
looks for it.

A pull-mode backup begun with ``<server tls='yes'/>`` makes QEMU serve its NBD export
with the certificates in libvirt's ``backup_tls_x509_cert_dir`` (qemu.conf; default
``default_tls_x509_cert_dir``, itself ``/etc/pki/qemu`` by default), and with
``backup_tls_x509_verify`` (default 1) it accepts only clients whose certificate that
folder's ``ca-cert.pem`` signed. libvirt reads qemu.conf when libvirtd starts; QEMU reads
the folder at each backup begin, so certificates written there apply to the next backup
without restarting anything. Restore exports (``qemu-nbd``) use the same folder.

:func:`install_server_credentials` writes VirtBackup's CA, a server certificate for the
names the workers dial, and its key (readable by root and the user QEMU runs as only)
into that folder, and marks the folder as VirtBackup's (``.virtbackup``). It never
overwrites certificates it did not write: a folder holding someone else's (e.g. VNC or
migration TLS in the shared default folder) is refused with what to change.

A user's ``qemu:///session`` daemon reads the user's own qemu.conf
(:class:`~virtbackup.virt.session.SessionDaemon`), runs QEMU as that user, and gets a
folder of the user's (0700, the key 0400, no owner change: nothing there needs root).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from virtbackup.virt.errors import VirtError
from virtbackup.virt.host import Host
from virtbackup.virt.pki import CA_CERT, SERVER_CERT, SERVER_KEY, Authority

QEMU_CONF: Final = "/etc/libvirt/qemu.conf"
DEFAULT_CERT_DIR: Final = "/etc/pki/qemu"
#: A file in the folder saying VirtBackup wrote (and may rewrite) its certificates.
MARKER: Final = ".virtbackup"
#: Users QEMU runs as by default (Debian's, then upstream's), when qemu.conf names none.
DEFAULT_QEMU_USERS: Final = ("libvirt-qemu", "qemu")


class TlsSetupError(VirtError):
    """The host's libvirt cannot serve VirtBackup's exports with client certificates;
    the message says what to change on the host."""


@dataclass(frozen=True, slots=True)
class BackupTlsConfig:
    """What libvirt on a host does for a backup with ``tls='yes'``."""

    directory: str
    verify: bool
    qemu_user: str | None
    """The user QEMU runs as (``None``: root)."""


_LINE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*=\s*(.*?)\s*$")


def parse_qemu_conf(text: str) -> dict[str, str]:
    """The ``key = value`` settings of a qemu.conf (strings unquoted; lists and comments
    skipped)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            continue
        key, raw = match.groups()
        if raw.startswith('"'):
            end = raw.find('"', 1)
            if end > 0:
                values[key] = raw[1:end]
        elif raw and raw[0] not in "[#":
            values[key] = raw.split("#", 1)[0].strip()
    return values


def backup_tls_config(conf: dict[str, str], existing_users: Sequence[str]) -> BackupTlsConfig:
    """libvirt's backup TLS settings from qemu.conf's values (see :func:`parse_qemu_conf`);
    ``existing_users`` are the default QEMU users that exist on the host."""
    directory = (
        conf.get("backup_tls_x509_cert_dir")
        or conf.get("default_tls_x509_cert_dir")
        or DEFAULT_CERT_DIR
    )
    verify_raw = conf.get("backup_tls_x509_verify", conf.get("default_tls_x509_verify", "1"))
    user = conf.get("user") or (existing_users[0] if existing_users else None)
    if user in ("root", "+0"):
        user = None
    return BackupTlsConfig(directory=directory, verify=verify_raw != "0", qemu_user=user)


async def read_backup_tls_config(host: Host, session_conf: str | None = None) -> BackupTlsConfig:
    """:func:`backup_tls_config` of the host's qemu.conf, or of a session daemon's
    ``session_conf`` (QEMU runs as the user: ``qemu_user`` is ``None``; TlsSetupError when
    it names no ``backup_tls_x509_cert_dir``, since the default folder is root's). Raises
    VirtError (Unreachable, VirtTimeout) when the host cannot be asked."""
    result = await host.run(["cat", session_conf or QEMU_CONF], timeout=30)
    conf = parse_qemu_conf(result.stdout) if result.returncode == 0 else {}
    if session_conf is not None:
        if not conf.get("backup_tls_x509_cert_dir", "").startswith("/"):
            raise TlsSetupError(
                f"{session_conf} names no backup_tls_x509_cert_dir: set it to a folder of the "
                "user's and restart the session libvirtd"
            )
        return dataclasses.replace(backup_tls_config(conf, []), qemu_user=None)
    users = []
    if "user" not in conf:
        for name in DEFAULT_QEMU_USERS:
            if (await host.run(["id", "-u", name], timeout=30)).returncode == 0:
                users.append(name)
    return backup_tls_config(conf, users)


async def _read(host: Host, path: str) -> bytes | None:
    result = await host.run(["cat", path], timeout=30)
    return result.stdout.encode() if result.returncode == 0 else None


async def _write(host: Host, path: str, data: bytes, mode: str, owner: str | None) -> None:
    """Write ``data`` through standard input (a key never appears in an argument list),
    to a temporary file moved over ``path``."""
    # A name of its own: two writers (two installations, or two inventories) must not
    # move each other's half-written file into place.
    tmp = f"{path}.vbtmp-{secrets.token_hex(4)}"
    steps = [f"umask 077 && cat > {shlex.quote(tmp)}", f"chmod {mode} {shlex.quote(tmp)}"]
    if owner:
        steps.append(f"chown {shlex.quote(owner)} {shlex.quote(tmp)}")
    steps.append(f"mv -f {shlex.quote(tmp)} {shlex.quote(path)}")
    result = await host.run(["sh", "-c", " && ".join(steps)], timeout=30, input=data.decode())
    if result.returncode != 0:
        await host.run(["rm", "-f", tmp], timeout=30)
        raise TlsSetupError(f"cannot write {path}: {result.stderr.strip()}")


async def install_server_credentials(
    host: Host, authority: Authority, names: Sequence[str], *, session_conf: str | None = None
) -> BackupTlsConfig:
    """Make the host's backup TLS folder hold ``authority``'s certificate and a server
    certificate it signed for ``names`` (what the workers dial: an address or host name);
    returns the host's settings (the folder is ``directory``). Idempotent: files that
    are already right are left alone, so running backups are not disturbed.

    Raises TlsSetupError when libvirt would accept clients without a certificate
    (``backup_tls_x509_verify = 0``) or the folder holds certificates VirtBackup did not
    write; VirtError when the host cannot be reached. ``session_conf``: the qemu.conf of
    a user's session daemon (see the module docstring) instead of the system's."""
    config = await read_backup_tls_config(host, session_conf)
    conf_path = session_conf or QEMU_CONF
    if not config.verify:
        raise TlsSetupError(
            "libvirt on this host accepts backup NBD clients without a certificate "
            f"(backup_tls_x509_verify = 0 in {conf_path}): set it to 1 and restart libvirtd"
        )
    directory = config.directory.rstrip("/") or "/"
    ca = await _read(host, f"{directory}/{CA_CERT}")
    server = await _read(host, f"{directory}/{SERVER_CERT}")
    key_there = (await host.run(["test", "-s", f"{directory}/{SERVER_KEY}"], timeout=30)).returncode
    if (
        ca == authority.cert_pem
        and server is not None
        and key_there == 0
        and authority.issued(server, names)
    ):
        return config
    marked = (await host.run(["test", "-e", f"{directory}/{MARKER}"], timeout=30)).returncode == 0
    if not marked and (ca is not None or server is not None):
        raise TlsSetupError(
            f"{directory} holds TLS certificates VirtBackup did not write; give backups a "
            f'folder of their own: backup_tls_x509_cert_dir = "/etc/pki/libvirt-backup" '
            f"in {conf_path}, then restart libvirtd"
        )
    mode = "0700" if session_conf is not None else "0755"
    made = await host.run(["mkdir", "-p", "-m", mode, directory], timeout=30)
    if made.returncode != 0:
        raise TlsSetupError(f"cannot create {directory}: {made.stderr.strip()}")
    issued = authority.issue_server(list(names))
    await _write(host, f"{directory}/{MARKER}", b"written by VirtBackup\n", "0644", None)
    await _write(host, f"{directory}/{SERVER_KEY}", issued.key_pem, "0400", config.qemu_user)
    await _write(host, f"{directory}/{SERVER_CERT}", issued.cert_pem, "0644", None)
    await _write(host, f"{directory}/{CA_CERT}", authority.cert_pem, "0644", None)
    return config
