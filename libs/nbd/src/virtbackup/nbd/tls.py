"""TLS client credentials for NBD, in QEMU's layout.

A directory holds ``ca-cert.pem`` (the CA that signs the servers' certificates),
``client-cert.pem`` and ``client-key.pem`` (this client's certificate and key), the
names QEMU's ``tls-creds-x509`` object uses for a client endpoint, so the same directory
serves ``qemu-nbd``, ``nbdinfo`` and this client.
"""

from __future__ import annotations

import ssl
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
