"""A real OpenSSH sshd on loopback, for tests: the one sshd harness, in two roles.

    with sshd_server() as sshd:              # an SFTP server (needs root and openssh-server)
        driver = open_driver("sftp", sshd.params(sshd.make_base("t1")))
        ...
        sshd.stop()                          # the server is gone: connections drop
        sshd.start()                         # back on the same port, same keys and files
        sshd.pause(); sshd.resume()          # a server that hangs (SIGSTOP/SIGCONT)

    with sshd_server(root=True) as host:     # a hypervisor host reached over ssh
        client = await host.connect()        # asyncssh, key auth, host key checked
        remote = await open_ssh_connection(client)

``SshdServer()`` logs in ``TEST_USER``, a system user created on first use (``useradd``,
shell ``nologin``) whose password is random per machine and stored in a root-only file
under the temp directory, by password or by key; ``ForceCommand internal-sftp`` allows
SFTP only (no shell). It stands in for an SFTP destination and for the inventory's SSH
login test.

``SshdServer(root=True)`` logs in root by key only and allows commands and TCP and Unix
socket forwarding: with this machine's libvirtd behind it, it stands in for a remote
hypervisor (``qemu+ssh://``, libssh, or asyncssh's forwarded libvirt socket).
``SshdServer(root=True, login=user)`` does the same for another existing user instead of
root (a host whose libvirt is that user's session daemon).

Either way sshd runs as root (it must, to log in a user) on a free high port of 127.0.0.1
chosen at creation and kept across ``stop``/``start``, with its own config, Ed25519 host
key, authorized client key and ``PidFile`` in a temporary directory, and ``UsePAM no``;
``close`` stops it and removes that directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import asyncssh

from virtbackup.runtime.ports import free_port
from virtbackup.testing.servers import (
    LOOPBACK,
    ServerError,
    descendants,
    log_tail,
    signal_quietly,
    stop_process,
)

__all__ = ["PASSWORD_FILE", "SSHD", "TEST_USER", "SshdServer", "ensure_test_user", "sshd_server"]

SSHD: Final = "/usr/sbin/sshd"
#: The unprivileged user an SFTP-role server logs in.
TEST_USER: Final = "vbtest"
#: Where that user's password is kept (made once per machine, 0600).
PASSWORD_FILE: Final = Path(tempfile.gettempdir()) / "virtbackup-test-sshd" / "password"


def ensure_test_user(password_file: Path) -> tuple[str, str]:
    """Create ``TEST_USER`` if needed and give it the machine's test password (made once,
    kept in ``password_file``, mode 0600). Returns ``(username, password)``.

    Raises ``ServerError`` when not root.
    """
    if os.geteuid() != 0:
        raise ServerError("the sshd test server needs root (to log in a test user)")
    password_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        password = ""
        deadline = time.monotonic() + 5
        while not password and time.monotonic() < deadline:  # another process writing it
            password = password_file.read_text().strip()
            if not password:
                time.sleep(0.05)
        if not password:
            raise ServerError(f"{password_file} is empty: remove it") from None
    else:
        password = secrets.token_urlsafe(18)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", TEST_USER],
            check=False, capture_output=True, text=True,
        )  # fmt: skip
        if made.returncode not in (0, 9):  # 9: made by another process meanwhile
            raise ServerError(f"useradd {TEST_USER}: {made.stderr.strip()}") from None
    subprocess.run(
        ["chpasswd"], input=f"{TEST_USER}:{password}\n".encode(), check=True, capture_output=True
    )
    return TEST_USER, password


class SshdServer:
    """An OpenSSH sshd on a free loopback port (see the module docstring for the roles).

    Created stopped: ``start`` it, or use it as a context manager (started on entry,
    closed on exit). Raises ``ServerError`` when sshd is missing or, for the SFTP role,
    when not root.
    """

    def __init__(self, *, root: bool = False, port: int | None = None, login: str = "root") -> None:
        if not os.path.exists(SSHD):
            raise ServerError(f"{SSHD} not found: install Debian's openssh-server")
        #: Whether this server logs in root with a shell (else the SFTP-only test user).
        self.root = root
        self.host = LOOPBACK
        self.port = port or free_port(LOOPBACK)
        #: The user to log in as, and its password (None: key only, the root role).
        #: ``login`` names another existing user for the hypervisor role (e.g. one whose
        #: own ``qemu:///session`` daemon stands for a host, ``virtbackup.testing.session_host``).
        self.username: str = login if root else "root"
        self.password: str | None = None
        if not root:
            self.username, self.password = ensure_test_user(PASSWORD_FILE)
        self.dir = Path(tempfile.mkdtemp(prefix="virtbackup-sshd-"))
        self.dir.chmod(0o711)
        user = pwd.getpwnam(self.username)
        #: Directory owned by the user: make SFTP base paths in here.
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(mode=0o755)
        os.chown(self.data_dir, user.pw_uid, user.pw_gid)

        host_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key_path = self.dir / "host_key"
        host_key.write_private_key(str(host_key_path))
        host_key_path.chmod(0o600)
        #: The server's public host key as an OpenSSH line (for the ``hostKey`` param).
        self.host_key = host_key.export_public_key().decode().strip()
        #: A known_hosts file naming this server's host key for ``[127.0.0.1]:<port>``.
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {self.host_key}\n")
        user_key = asyncssh.generate_private_key("ssh-ed25519", comment="virtbackup-test")
        #: An authorized private key, OpenSSH text (for the ``privateKey`` param) ...
        self.private_key = user_key.export_private_key().decode()
        #: ... and the same key as a file (mode 0600), for ``ssh -i`` or libvirt's keyfile.
        self.client_key = self.dir / "client_ed25519"
        self.client_key.write_text(self.private_key)
        self.client_key.chmod(0o600)
        (self.dir / "authorized_keys").write_bytes(user_key.export_public_key())
        self.log_path = self.dir / "sshd.log"
        self.config_path = self.dir / "sshd_config"
        if root:
            role = [
                "PermitRootLogin " + ("prohibit-password" if login == "root" else "no"),
                "PasswordAuthentication no",
                "AllowTcpForwarding yes",
                "AllowStreamLocalForwarding yes",
                "Subsystem sftp internal-sftp",
                # bash sources ~/.bashrc for an ssh command only as a top-level shell
                # (shell level 1): with SHLVL=1 it starts at 2 and does not. Root's
                # .bashrc on the test machines runs pyenv's init, whose rehash takes a
                # lock file; a session killed in it (a test stopping this sshd mid-job)
                # leaves the lock, and every later command then waits 60 s for it. A
                # remote host's shell setup is not what these tests are about.
                "SetEnv SHLVL=1",
            ]
        else:
            role = [
                "PermitRootLogin no",
                "PasswordAuthentication yes",
                "Subsystem sftp internal-sftp",
                "ForceCommand internal-sftp",
            ]
        self.config_path.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.host}",
                    f"HostKey {host_key_path}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                    f"AllowUsers {self.username}",
                    "UsePAM no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "StrictModes no",
                    "UseDNS no",
                    "MaxSessions 32",
                    "MaxStartups 100:30:200",
                    "MaxAuthTries 6",
                    "LoginGraceTime 30",
                    *role,
                    "LogLevel INFO",
                    "",
                ]
            )
        )
        self._process: subprocess.Popen[bytes] | None = None

    def params(self, base_path: str, *, key: bool = False, **extra: Any) -> dict[str, Any]:
        """SFTP destination params (wire names) logging in by password, or by key if ``key``
        (``extra`` overrides any of them), with this server's ``hostKey`` pinned (pass
        ``hostKey=""`` to leave it to pinning on first use). ValueError for a password
        login to the root role."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "basePath": base_path,
            "hostKey": self.host_key,
        }
        if key:
            params["privateKey"] = self.private_key
        elif self.password is None:
            raise ValueError("this sshd logs in by key only: params(..., key=True)")
        else:
            params["password"] = self.password
        params.update(extra)
        return params

    def make_base(self, name: str) -> str:
        """A fresh directory ``data_dir/name`` owned by the user, to use as ``basePath``."""
        path = self.data_dir / name
        path.mkdir()
        user = pwd.getpwnam(self.username)
        os.chown(path, user.pw_uid, user.pw_gid)
        return str(path)

    async def connect(self) -> asyncssh.SSHClientConnection:
        """An asyncssh client connection as ``username`` by the client key, checking the
        host key against ``known_hosts``. Close it when done."""
        return await asyncssh.connect(
            self.host,
            port=self.port,
            username=self.username,
            client_keys=[str(self.client_key)],
            known_hosts=str(self.known_hosts),
            agent_path=None,
        )

    @property
    def running(self) -> bool:
        """Whether the listener process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        """Start sshd (on the same port as before) and wait until it sends its banner.

        A no-op when running. Raises ``ServerError`` (with the log's tail) if sshd rejects
        its config, exits, or does not answer within ``timeout`` seconds.
        """
        if self.running:
            return
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        check = subprocess.run(
            [SSHD, "-t", "-f", str(self.config_path)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise ServerError(f"sshd rejects its config: {check.stderr.strip()}")
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(f"sshd exited at start:\n{log_tail(self.log_path)}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    sock.settimeout(2)
                    if sock.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise ServerError(f"sshd did not answer within {timeout:g} s:\n{log_tail(self.log_path)}")

    def session_pids(self) -> list[int]:
        """PIDs of the per-connection sshd processes (descendants of the listener), ``[]``
        when stopped."""
        if self._process is None or self._process.poll() is not None:
            return []
        return descendants(self._process.pid)

    def pause(self) -> None:
        """SIGSTOP the listener and every session: connections stay up, nothing answers."""
        if self._process is not None and self._process.poll() is None:
            for pid in [self._process.pid, *self.session_pids()]:
                signal_quietly(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause``."""
        if self._process is not None and self._process.poll() is None:
            for pid in [self._process.pid, *self.session_pids()]:
                signal_quietly(pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the listener and every session: clients see their connections drop.
        Idempotent; ``start`` brings the server back on the same port."""
        if self._process is not None:
            stop_process(self._process, grace=2.0, tree=True)
            self._process = None

    def close(self) -> None:
        """Stop and remove the temporary directory (config, keys, data)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SshdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def sshd_server(*, root: bool = False) -> Iterator[SshdServer]:
    """A started ``SshdServer`` (the role as in its constructor), closed on exit."""
    server = SshdServer(root=root)
    try:
        server.start()
        yield server
    finally:
        server.close()
