"""VirtBackup's own certificate authority for NBD exports (TLS with client certificates).

A backup's NBD export (QEMU's NBD server, begun by libvirt) and a restore's (``qemu-nbd``)
accept only TLS clients whose certificate this CA signed; the clients (transfer workers,
the inventory reading extent maps) accept only servers whose certificate it signed for
the host they dialled. Nothing else is needed: a local user without the client key can
neither read nor write a disk through an export.

Files, all PEM, in QEMU's ``tls-creds-x509`` layout so the same directories serve QEMU,
``qemu-nbd``, ``nbdinfo`` and :mod:`virtbackup.nbd.tls`::

    <pki>/ca/ca-cert.pem, ca-key.pem (0600)          the authority, made once
    <pki>/nbd-client/ca-cert.pem, client-cert.pem,
                     client-key.pem (0600)           what the workers present

and on each hypervisor (see :mod:`virtbackup.virt.nbd_tls`) ``ca-cert.pem``,
``server-cert.pem``, ``server-key.pem``. Keys are ECDSA P-256.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT: Final = "ca-cert.pem"
CA_KEY: Final = "ca-key.pem"
SERVER_CERT: Final = "server-cert.pem"
SERVER_KEY: Final = "server-key.pem"
CLIENT_CERT: Final = "client-cert.pem"
CLIENT_KEY: Final = "client-key.pem"

CA_DIR: Final = "ca"
CLIENT_DIR: Final = "nbd-client"

#: Lifetimes: the authority outlives any installation; leaf certificates are renewed
#: when less than ``RENEW_BEFORE`` is left.
CA_DAYS: Final = 3650 * 2
LEAF_DAYS: Final = 825
RENEW_BEFORE: Final = dt.timedelta(days=30)


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``, atomically (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True, slots=True)
class Authority:
    """The CA: its certificate and private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, common_name: str = "VirtBackup NBD CA") -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert=cert, key=key)

    def _issue(
        self, common_name: str, names: Sequence[str], usage: x509.ObjectIdentifier
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                # QEMU (GnuTLS) refuses a leaf without both when key usage is critical.
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(n) for n in names]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def issue_server(self, names: Sequence[str]) -> Issued:
        """A server certificate for ``names`` (host names or IP addresses)."""
        if not names:
            raise ValueError("a server certificate needs at least one name")
        return self._issue(names[0], names, ExtendedKeyUsageOID.SERVER_AUTH)

    def issue_client(self, common_name: str = "VirtBackup NBD client") -> Issued:
        """A client certificate (what the workers present to an export)."""
        return self._issue(common_name, (), ExtendedKeyUsageOID.CLIENT_AUTH)

    def issued(self, cert_pem: bytes, names: Sequence[str] = ()) -> bool:
        """Whether ``cert_pem`` was signed by this CA, is valid for at least
        ``RENEW_BEFORE`` more, and names every one of ``names``."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
            return False
        if names:
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            except x509.ExtensionNotFound:
                return False
            have = {str(v) for v in san.value.get_values_for_type(x509.DNSName)}
            have |= {str(v) for v in san.value.get_values_for_type(x509.IPAddress)}
            if not all(str(_san_value(n)) in have for n in names):
                return False
        return True


def _san_value(name: str) -> object:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return name


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_or_create_authority(pki_dir: Path) -> Authority:
    """The authority kept in ``<pki_dir>/ca``, made on first use (key 0600, folders 0700).

    Safe against concurrent callers (a file lock). Raises OSError when the folder cannot
    be written, ValueError when the stored files are not a certificate and its key."""
    ca_dir = pki_dir / CA_DIR
    with _locked(pki_dir):
        cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an ECDSA key")
            return Authority(cert=cert, key=key)
        authority = Authority.create()
        write_file(key_path, _key_pem(authority.key), 0o600)
        write_file(cert_path, authority.cert_pem, 0o644)
        return authority


def ensure_client_credentials(pki_dir: Path, authority: Authority) -> Path:
    """``<pki_dir>/nbd-client`` with the CA's certificate and a client certificate it
    signed (renewed when it expires soon or another CA signed it); returns the folder
    (see :func:`virtbackup.nbd.tls.client_context_from_dir`)."""
    client_dir = pki_dir / CLIENT_DIR
    with _locked(pki_dir):
        cert_path = client_dir / CLIENT_CERT
        ca_path = client_dir / CA_CERT
        current = cert_path.read_bytes() if cert_path.exists() else b""
        have_ca = ca_path.read_bytes() if ca_path.exists() else b""
        if (
            not current
            or not authority.issued(current)
            or have_ca != authority.cert_pem
            or not (client_dir / CLIENT_KEY).exists()
        ):
            issued = authority.issue_client()
            write_file(client_dir / CLIENT_KEY, issued.key_pem, 0o600)
            write_file(cert_path, issued.cert_pem, 0o644)
            write_file(ca_path, authority.cert_pem, 0o644)
    return client_dir
