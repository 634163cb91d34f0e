"""TLS credentials for NBD: client contexts in QEMU's layout, and server contexts.

A directory holds ``ca-cert.pem`` (the CA that signs the servers' certificates),
``client-cert.pem`` and ``client-key.pem`` (this client's certificate and key), the
names QEMU's ``tls-creds-x509`` object uses for a client endpoint, so the same directory
serves ``qemu-nbd``, ``nbdinfo`` and this client.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path
from typing import Final

CA_CERT: Final = "ca-cert.pem"
CLIENT_CERT: Final = "client-cert.pem"
CLIENT_KEY: Final = "client-key.pem"


def client_context(*, ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A TLS 1.2+ client context that trusts only ``ca`` (PEM), checks the server's host
    name, and presents ``cert`` with its private ``key`` (PEM files).

    Raises OSError when a file cannot be read, ssl.SSLError when one is not valid PEM
    or the key does not match the certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def client_context_from_dir(directory: str | Path) -> ssl.SSLContext:
    """:func:`client_context` from ``ca-cert.pem``, ``client-cert.pem`` and
    ``client-key.pem`` in ``directory`` (QEMU's layout); the same errors."""
    base = Path(directory)
    return client_context(ca=base / CA_CERT, cert=base / CLIENT_CERT, key=base / CLIENT_KEY)


def server_context(*, cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting ``cert_pem`` with its ``key_pem`` and
    requiring a client certificate signed by ``client_ca_pem`` (all PEM, in memory).

    Python loads a certificate chain only from files: the key is written to a private
    temporary directory (0700, file 0600) and removed before this returns. Raises
    ssl.SSLError when the PEM is not valid or the key does not match the certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
    with tempfile.TemporaryDirectory(prefix="vb-nbd-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx
