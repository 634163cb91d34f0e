"""The agent token and the self-signed TLS certificate, made on first start and kept."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import secrets
import socket
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from virtbackup.runtime.settings import Settings

log = logging.getLogger(__name__)

TOKEN_FILE = "agent-token"  # noqa: S105
TLS_DIR = "tls"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only, atomically (a directory it makes is
    the owner's only, too)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def token_path(settings: Settings) -> Path:
    return settings.data_dir / TOKEN_FILE


def ensure_token(settings: Settings) -> str:
    """The agent token: ``VIRTBACKUP_TOKEN`` if set, else the kept one, else a new one.

    A new token is kept (mode 0600) in the data directory, where the operator reads it;
    stderr only says where (it is often a log file others can read: the token is never
    written there).
    """
    if settings.token is not None and settings.token.get_secret_value():
        return settings.token.get_secret_value()
    path = token_path(settings)
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    _write_private(path, token.encode() + b"\n")
    print(f"VirtBackup agent token made, kept in {path} (mode 0600)", file=sys.stderr, flush=True)
    return token


def ensure_certificate(settings: Settings) -> tuple[Path, Path]:
    """The agent listener's (certificate, key) paths: ``VIRTBACKUP_TLS_CERT_FILE`` and
    ``VIRTBACKUP_TLS_KEY_FILE`` when given (both, readable: ``SystemExit`` naming the
    variable otherwise), else a self-signed pair made once in the data directory."""
    given = {"VIRTBACKUP_TLS_CERT_FILE": settings.tls_cert_file}
    given["VIRTBACKUP_TLS_KEY_FILE"] = settings.tls_key_file
    if any(path is not None for path in given.values()):
        for variable, path in given.items():
            if path is None:
                raise SystemExit(f"{variable} is not set: give both the certificate and its key")
            if not os.access(path, os.R_OK):
                raise SystemExit(f"{variable}: {path} cannot be read")
        assert settings.tls_cert_file is not None and settings.tls_key_file is not None
        return settings.tls_cert_file, settings.tls_key_file
    tls = settings.data_dir / TLS_DIR
    cert_path, key_path = tls / "agent.crt", tls / "agent.key"
    tls.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls.chmod(0o700)  # also one an earlier version made 0755: the key is in it
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    hostname = socket.gethostname()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "VirtBackup agent")])
    now = dt.datetime.now(dt.UTC)
    alt_names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName(hostname),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    log.info("self-signed certificate created", extra={"path": str(cert_path)})
    return cert_path, key_path
