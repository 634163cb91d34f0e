"""Certificates of one instant-access export: its own CA, a server and a client certificate.

Each export gets a certificate authority of its own, made when the export starts. It
signs exactly two certificates: the worker's server certificate (for the names clients
dial) and the user's client certificate (for the public key the caller sent; the private
key never reaches the worker or the bus). Its private key is then dropped, so nothing
else can ever be signed by it. The user receives the CA's certificate (to check the
server), the client certificate and, from the gateway, the key: a ``tls-creds-x509``
folder for ``qemu-nbd``, ``qemu-img`` or ``nbdinfo``.

Why not VirtBackup's NBD CA (``virtbackup.virt.pki``): QEMU's backup exports and the
restores' ``qemu-nbd`` accept *any* client certificate that CA signed. A certificate
handed to a user for reading one restore point would open every live backup export
(read any VM's disk) and every restore export (write into the disks being restored).
A per-export CA keeps the user's certificate useless anywhere but its export, and the
workers need no CA key (theirs is a read-only copy of the PKI folder). The server also
checks the client certificate's fingerprint, not only its signature.

Every certificate is valid from five minutes before now until five minutes after the
export's end. Keys are ECDSA P-256; the client's key may also be RSA (2048 bits or more).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SLACK: Final = dt.timedelta(minutes=5)
MIN_RSA_BITS: Final = 2048


class ClientKeyError(ValueError):
    """The client public key is not PEM, or not a key type clients can use (ECDSA, or
    RSA of at least 2048 bits)."""


@dataclass(frozen=True, slots=True)
class ExportCredentials:
    """What an export's server uses and what its user gets (PEM); the fingerprint is the
    SHA-256 (hex) of the client certificate's DER form."""

    ca_cert_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    client_cert_pem: bytes
    client_fingerprint: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def load_client_key(pem: str) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The public key of a PEM ``PUBLIC KEY`` block; ClientKeyError otherwise."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnicodeEncodeError):
        raise ClientKeyError("clientPublicKey is not a PEM public key") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return key
    raise ClientKeyError("clientPublicKey must be an ECDSA key or an RSA key of 2048+ bits")


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    subject: str,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    usage: x509.ObjectIdentifier,
    names: Sequence[str],
    not_after: dt.datetime,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SLACK)
        .not_valid_after(not_after + SLACK)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # GnuTLS (QEMU, libnbd) refuses a leaf without both when key usage is critical.
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
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(n) for n in names]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())


def issue_export_credentials(
    *,
    export_id: str,
    client_public_key: str,
    server_names: Sequence[str],
    not_after: dt.datetime,
) -> ExportCredentials:
    """A new CA for export ``export_id``, a server certificate for ``server_names``
    (host names or IP addresses, at least one) and a client certificate for
    ``client_public_key`` (PEM), valid until ``not_after`` (aware). The CA's key is not
    kept. Raises ClientKeyError for an unusable client key, ValueError without names."""
    if not server_names:
        raise ValueError("a server certificate needs at least one name")
    client_key = load_client_key(client_public_key)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"VirtBackup export {export_id}")
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SLACK)
        .not_valid_after(not_after + SLACK)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _leaf(
        ca_key,
        ca_name,
        server_names[0],
        server_key.public_key(),
        ExtendedKeyUsageOID.SERVER_AUTH,
        server_names,
        not_after,
    )
    client_cert = _leaf(
        ca_key,
        ca_name,
        f"VirtBackup export {export_id} client",
        client_key,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        (),
        not_after,
    )
    pem = serialization.Encoding.PEM
    return ExportCredentials(
        ca_cert_pem=ca_cert.public_bytes(pem),
        server_cert_pem=server_cert.public_bytes(pem),
        server_key_pem=server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        client_cert_pem=client_cert.public_bytes(pem),
        client_fingerprint=hashlib.sha256(
            client_cert.public_bytes(serialization.Encoding.DER)
        ).hexdigest(),
    )
