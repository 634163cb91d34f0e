"""Encryption at rest: a random data key wrapped by a key derived from a passphrase.

* KDF: scrypt (n=2**15, r=8, p=1 by default) over the passphrase and a random salt gives
  a key-encryption key; the 32-byte data key is wrapped with it by the repository's
  cipher (nonce || ciphertext+tag). A wrong passphrase fails to unwrap: never garbage.
* Ciphers: AES-256-GCM or ChaCha20-Poly1305, 96-bit random nonces, the chunk id (or the
  object's key) as associated data so that a blob cannot be swapped for another.
* Chunk ids of an encrypted repository are keyed BLAKE3 with a key derived from the data
  key, so equal content does not show across repositories.
"""

from __future__ import annotations

import os
from typing import Final, Literal

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

Cipher = Literal["aes-256-gcm", "chacha20-poly1305"]
CIPHERS: Final = ("aes-256-gcm", "chacha20-poly1305")
NONCE_BYTES: Final = 12


class CryptoError(Exception):
    """Authentication failed: wrong passphrase or key, or the data was altered."""


def derive_kek(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def _aead(cipher: str, key: bytes) -> AESGCM | ChaCha20Poly1305:
    if cipher == "aes-256-gcm":
        return AESGCM(key)
    if cipher == "chacha20-poly1305":
        return ChaCha20Poly1305(key)
    raise ValueError(f"unknown cipher {cipher!r} (known: {', '.join(CIPHERS)})")


class Sealer:
    """Encrypts and decrypts blobs with one data key."""

    def __init__(self, cipher: str, data_key: bytes) -> None:
        self.cipher = cipher
        self._aead = _aead(cipher, data_key)
        self.id_key = blake3.blake3(data_key + b"virtbackup chunk id", max_threads=1).digest()

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise CryptoError("authentication failed (wrong key, or altered data)") from None


def wrap_key(cipher: str, kek: bytes, data_key: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aead(cipher, kek).encrypt(nonce, data_key, b"virtbackup data key")


def unwrap_key(cipher: str, kek: bytes, wrapped: bytes) -> bytes:
    try:
        return _aead(cipher, kek).decrypt(
            wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], b"virtbackup data key"
        )
    except InvalidTag:
        raise CryptoError("wrong passphrase for this repository") from None
