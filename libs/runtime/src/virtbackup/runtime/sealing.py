"""Secrets at rest on the bus: sealed with AES-256-GCM under a key from the environment.

Every secret field of the agent configuration (``SECRET_KEYS`` of the contracts:
passwords, private keys, passphrases, tokens) is stored in ``VB_CONFIG`` as
``vbsec:v1:<key id>:<base64url(nonce || ciphertext || tag)>`` instead of its value, so a
reader of the bucket sees ciphertext; the rest of the document stays readable JSON.
Services never see the sealed form: ``SealedConfigBucket`` seals on every write and opens
on every read and watch, transparently to ``runtime.agent_config`` and the gateway.

The key (32 bytes) is ``VIRTBACKUP_SECRET_KEY`` (base64), or the file
``<data dir>/secrets/secret-key`` (created at first use, mode 0600, in a 0700 directory:
every process of the single-machine mode shares it). The key id is the first 8 hex digits
of the SHA-256 of the key, so a value sealed under an earlier key still opens while that
key is listed in ``VIRTBACKUP_SECRET_KEY_PREVIOUS`` (rotation); writes always seal under
the current key.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.js.kv import KeyValue

from virtbackup.contracts.v1.config import SECRET_KEYS
from virtbackup.runtime.settings import Settings

PREFIX: Final = "vbsec:v1:"
_AAD: Final = b"virtbackup secret v1"
KEY_BYTES: Final = 32


class SecretKeyError(Exception):
    """A secret cannot be opened (no key with its id, or it was tampered with), or a key
    is malformed. Not retryable: the configuration or the environment must change."""


def _key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise SecretKeyError(f"{where}: not base64") from None
    if len(key) != KEY_BYTES:
        raise SecretKeyError(f"{where}: {len(key)} bytes, expected {KEY_BYTES}")
    return key


def new_key() -> str:
    """A fresh key, base64 (what ``VIRTBACKUP_SECRET_KEY`` holds)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def load_or_create_key_file(path: Path) -> bytes:
    """The key stored in ``path``; creates it (0600, directory 0700) when it does not exist.
    Processes racing to create it all end up with the one that was written first."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new_key() + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # atomic: fails if another process was first
        tmp.unlink()
    return _decode_key(path.read_text(encoding="utf-8"), str(path))


class SecretBox:
    """Seals and opens secret strings with the current key (and earlier ones)."""

    def __init__(self, key: bytes, previous: Iterable[bytes] = ()) -> None:
        self._current = AESGCM(key)
        self._current_id = _key_id(key)
        self._keys = {_key_id(k): AESGCM(k) for k in (*previous, key)}

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        """The box of ``settings.secret_key`` (else the key file, created if missing) and
        ``settings.secret_key_previous``. ``SecretKeyError`` for a malformed key."""
        if settings.secret_key:
            key = _decode_key(settings.secret_key.get_secret_value(), "VIRTBACKUP_SECRET_KEY")
        else:
            key = load_or_create_key_file(settings.secret_key_file)
        previous = []
        if settings.secret_key_previous:
            for part in settings.secret_key_previous.get_secret_value().split(","):
                if part.strip():
                    previous.append(_decode_key(part, "VIRTBACKUP_SECRET_KEY_PREVIOUS"))
        return cls(key, previous)

    @staticmethod
    def is_sealed(value: str) -> bool:
        return value.startswith(PREFIX)

    def seal(self, plain: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._current.encrypt(nonce, plain.encode(), _AAD)
        return f"{PREFIX}{self._current_id}:{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, value: str) -> str:
        """The plain text of a sealed value (a value that is not sealed is returned as
        it is). ``SecretKeyError`` when no key has its id or it does not authenticate."""
        if not self.is_sealed(value):
            return value
        key_id, _, body = value[len(PREFIX) :].partition(":")
        aead = self._keys.get(key_id)
        if aead is None:
            raise SecretKeyError(
                f"a secret is sealed under key {key_id}, which is not configured "
                "(VIRTBACKUP_SECRET_KEY / VIRTBACKUP_SECRET_KEY_PREVIOUS)"
            )
        try:
            raw = base64.urlsafe_b64decode(body)
            return aead.decrypt(raw[:12], raw[12:], _AAD).decode()
        except (ValueError, InvalidTag):
            raise SecretKeyError(f"a secret sealed under key {key_id} does not open") from None

    def seal_tree(self, value: Any) -> Any:
        """A copy of a JSON tree with every non-empty string under a secret key sealed."""
        if isinstance(value, dict):
            return {
                k: self.seal(v)
                if k in SECRET_KEYS and isinstance(v, str) and v and not self.is_sealed(v)
                else self.seal_tree(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [self.seal_tree(v) for v in value]
        return value

    def open_tree(self, value: Any) -> Any:
        """A copy of a JSON tree with every sealed string opened."""
        if isinstance(value, dict):
            return {k: self.open_tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.open_tree(v) for v in value]
        if isinstance(value, str) and self.is_sealed(value):
            return self.open(value)
        return value

    def seal_json(self, data: bytes) -> bytes:
        """``data`` (a JSON document) with its secrets sealed; other bytes unchanged."""
        try:
            tree = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return data
        return msgspec.json.encode(self.seal_tree(tree))

    def open_json(self, data: bytes) -> bytes:
        """``data`` (a JSON document) with its secrets opened; other bytes unchanged."""
        if PREFIX.encode() not in data:
            return data
        try:
            tree = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return data
        return msgspec.json.encode(self.open_tree(tree))


class SealedConfigBucket(KeyValue):
    """A key-value bucket whose values are JSON documents with sealed secrets: values are
    sealed on ``put``/``create``/``update`` and opened on ``get`` and in watches (and so
    in ``history``), so its users read and write plain documents."""

    def __init__(self, kv: KeyValue, box: SecretBox) -> None:
        super().__init__(
            name=kv._name,
            stream=kv._stream,
            pre=kv._pre,
            js=kv._js,
            direct=kv._direct,
        )
        self.box = box

    def _opened(self, entry: KeyValue.Entry) -> KeyValue.Entry:
        if entry.value is None:
            return entry
        return dataclasses.replace(entry, value=self.box.open_json(entry.value))

    async def get(
        self, key: str, revision: int | None = None, validate_keys: bool = True
    ) -> KeyValue.Entry:
        return self._opened(await super().get(key, revision, validate_keys))

    async def put(self, key: str, value: bytes, validate_keys: bool = True) -> int:
        return await super().put(key, self.box.seal_json(value), validate_keys)

    async def create(
        self, key: str, value: bytes, validate_keys: bool = True, msg_ttl: float | None = None
    ) -> int:
        return await super().create(key, self.box.seal_json(value), validate_keys, msg_ttl)

    async def update(
        self, key: str, value: bytes, last: int | None = None, validate_keys: bool = True
    ) -> int:
        return await super().update(key, self.box.seal_json(value), last, validate_keys)

    async def watch(
        self,
        keys: Any,
        headers_only: Any = False,
        include_history: Any = False,
        ignore_deletes: Any = False,
        meta_only: Any = False,
        inactive_threshold: Any = None,
    ) -> KeyValue.KeyWatcher:
        """A watch (also what ``history`` and ``keys`` use) handing out opened entries."""
        watcher = await super().watch(
            keys,
            headers_only=headers_only,
            include_history=include_history,
            ignore_deletes=ignore_deletes,
            meta_only=meta_only,
            inactive_threshold=inactive_threshold,
        )
        return _OpeningWatcher(watcher, self)


class _OpeningWatcher(KeyValue.KeyWatcher):
    """A watcher that hands out entries with their secrets opened."""

    def __init__(self, inner: KeyValue.KeyWatcher, bucket: SealedConfigBucket) -> None:
        self.__dict__.update(inner.__dict__)
        self._inner = inner
        self._bucket = bucket

    async def stop(self) -> None:
        await self._inner.stop()  # type: ignore[no-untyped-call]

    async def updates(self, timeout: float = 5.0) -> Any:
        entry = await self._inner.updates(timeout)  # type: ignore[no-untyped-call]
        return self._bucket._opened(entry) if isinstance(entry, KeyValue.Entry) else entry

    async def __anext__(self) -> Any:
        entry = await self._inner.__anext__()  # type: ignore[no-untyped-call]
        return self._bucket._opened(entry) if isinstance(entry, KeyValue.Entry) else entry
