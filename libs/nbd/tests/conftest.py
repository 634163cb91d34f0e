"""Fixtures: qcow2 images made with qemu-img/qemu-io, served by real qemu-nbd processes.

Every qemu-nbd started through the ``qemu`` fixture is stopped (SIGTERM, then
SIGKILL) when the test ends, whatever its outcome.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from virtbackup.runtime.ports import free_port

MiB = 1024 * 1024


@dataclass
class Server:
    """One running qemu-nbd."""

    pid: int
    export: str
    port: int | None = None
    socket: str | None = None

    @property
    def uri(self) -> str:
        if self.socket is not None:
            return f"nbd+unix:///{self.export}?socket={self.socket}"
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state not in ("Z", "X")  # a zombie has released its sockets and files

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not self.alive():
                    return
                time.sleep(0.01)


@dataclass
class Qemu:
    """Makes images and serves them; remembers servers to stop them."""

    tmp: Path
    servers: list[Server] = field(default_factory=list)
    _count: int = 0

    def _name(self, stem: str) -> Path:
        self._count += 1
        return self.tmp / f"{stem}{self._count}"

    def image(
        self,
        size: int,
        writes: Sequence[tuple[int, int, int]] = (),
        bitmap: str | None = None,
        zero_writes: Sequence[tuple[int, int]] = (),
    ) -> Path:
        """A qcow2 image; ``writes`` are (pattern byte, offset, length) made with qemu-io.

        ``bitmap`` adds an enabled persistent dirty bitmap before the writes, so it
        records exactly them.
        """
        path = self._name("img").with_suffix(".qcow2")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True
        )
        if bitmap is not None:
            subprocess.run(
                ["qemu-img", "bitmap", "--add", "--enable", str(path), bitmap], check=True
            )
        cmds: list[str] = []
        for pattern, offset, length in writes:
            cmds += ["-c", f"write -P {pattern:#x} {offset} {length}"]
        for offset, length in zero_writes:
            cmds += ["-c", f"write -z {offset} {length}"]
        if cmds:
            subprocess.run(
                ["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True, capture_output=True
            )
        return path

    def image_from(self, content: bytes) -> Path:
        """A qcow2 image whose guest-visible content is ``content`` (zero runs stay sparse)."""
        raw = self._name("raw").with_suffix(".raw")
        raw.write_bytes(content)
        path = raw.with_suffix(".qcow2")
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
        )
        raw.unlink()
        return path

    def serve(
        self,
        image: Path,
        *,
        read_only: bool = False,
        bitmap: str | None = None,
        unix: bool = False,
        export: str = "export",
        shared: int = 8,
        tls_dir: Path | None = None,
    ) -> Server:
        """Start ``qemu-nbd --fork --persistent`` on a free loopback port or a Unix socket;
        with ``tls_dir`` (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``) it
        requires TLS and a client certificate signed by that CA."""
        for _attempt in range(5):
            pid_file = self._name("pid")
            args = [
                "qemu-nbd",
                "--fork",
                "--persistent",
                f"--shared={shared}",
                "-f",
                "qcow2",
                "-x",
                export,
                f"--pid-file={pid_file}",
            ]
            port: int | None = None
            sock: str | None = None
            if unix:
                sock = str(self._name("nbd").with_suffix(".sock"))
                args += ["-k", sock]
            else:
                port = free_port()
                args += ["-b", "127.0.0.1", "-p", str(port)]
            if read_only:
                args.append("-r")
            if bitmap is not None:
                args += ["-B", bitmap]
            if tls_dir is not None:
                args += [
                    "--object",
                    f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer=on",
                    "--tls-creds",
                    "tls0",
                ]
            args.append(str(image))
            proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
            if proc.returncode == 0:
                server = Server(int(pid_file.read_text()), export, port, sock)
                self.servers.append(server)
                return server
            if "in use" not in proc.stderr:
                raise RuntimeError(f"qemu-nbd failed: {proc.stderr}")
        raise RuntimeError("qemu-nbd found no free port")

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()

    def qemu_io_read(self, image: Path, pattern: int, offset: int, length: int) -> bool:
        """True when qemu-io (sharing the image with a running server) finds ``pattern`` there."""
        proc = subprocess.run(
            [
                "qemu-io",
                "-r",
                "-U",
                "-f",
                "qcow2",
                "-c",
                f"read -P {pattern:#x} {offset} {length}",
                str(image),
            ],
            capture_output=True,
            text=True,
        )
        return proc.returncode == 0 and "Pattern verification failed" not in proc.stdout


def nbdinfo_json(*args: str) -> object:
    out = subprocess.run(["nbdinfo", "--json", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Qemu]:
    q = Qemu(tmp_path)
    try:
        yield q
    finally:
        q.stop_all()


@dataclass(frozen=True)
class Pki:
    """A CA, a server directory (certificate for 127.0.0.1 and localhost) and a client
    directory it signed, and a client directory signed by another CA."""

    server_dir: Path
    client_dir: Path
    foreign_client_dir: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    from virtbackup.virt.pki import (
        CA_CERT,
        SERVER_CERT,
        SERVER_KEY,
        Authority,
        ensure_client_credentials,
        load_or_create_authority,
        write_file,
    )

    base = tmp_path_factory.mktemp("pki")
    authority = load_or_create_authority(base / "ours")
    server_dir = base / "server"
    issued = authority.issue_server(["127.0.0.1", "localhost"])
    write_file(server_dir / CA_CERT, authority.cert_pem, 0o644)
    write_file(server_dir / SERVER_CERT, issued.cert_pem, 0o644)
    write_file(server_dir / SERVER_KEY, issued.key_pem, 0o600)
    client_dir = ensure_client_credentials(base / "ours", authority)
    # Another CA's client, trusting our CA for the server: the server must refuse it.
    other = Authority.create("Someone else's CA")
    foreign = base / "foreign"
    theirs = other.issue_client()
    write_file(foreign / CA_CERT, authority.cert_pem, 0o644)
    write_file(foreign / "client-cert.pem", theirs.cert_pem, 0o644)
    write_file(foreign / "client-key.pem", theirs.key_pem, 0o600)
    return Pki(server_dir=server_dir, client_dir=client_dir, foreign_client_dir=foreign)


@pytest.fixture
def nbdinfo() -> type[NbdInfo]:
    return NbdInfo


class NbdInfo:
    """nbdinfo (libnbd) as the reference client."""

    @staticmethod
    def info(uri: str) -> dict[str, object]:
        data = nbdinfo_json(uri)
        assert isinstance(data, dict)
        exports = data["exports"]
        assert isinstance(exports, list)
        export = exports[0]
        assert isinstance(export, dict)
        return export

    @staticmethod
    def map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
        data = nbdinfo_json(f"--map={context}", uri)
        assert isinstance(data, list)
        return [(int(e["offset"]), int(e["length"]), int(e["type"])) for e in data]
