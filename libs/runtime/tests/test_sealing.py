"""Secrets sealed at rest in VB_CONFIG: ciphertext on the bus, plain text to the services."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from virtbackup.contracts import buckets
from virtbackup.contracts.buckets import CONFIG_KEY
from virtbackup.runtime.nats_server import NatsServer
from virtbackup.runtime.provision import ensure_bucket
from virtbackup.runtime.sealing import (
    SealedConfigBucket,
    SecretBox,
    SecretKeyError,
    load_or_create_key_file,
    new_key,
)
from virtbackup.runtime.settings import load_settings
from virtbackup.testing.nats import connect

DOC = {
    "servers": [{"id": "a", "host": "h", "password": "pw-1", "privateKey": ""}],
    "backup": {"gdrive": {"accessToken": "tok-2", "refreshToken": "tok-3"}},
    "ntfymeToken": "tok-4",
}


def box(key: str | None = None, previous: str | None = None) -> SecretBox:
    overrides = {"secret_key": key or new_key()}
    if previous:
        overrides["secret_key_previous"] = previous
    return SecretBox.from_settings(load_settings(**overrides))


def test_secret_fields_are_sealed_and_open_again() -> None:
    b = box()
    sealed = b.seal_json(json.dumps(DOC).encode())
    for secret in (b"pw-1", b"tok-2", b"tok-3", b"tok-4"):
        assert secret not in sealed
    tree = json.loads(sealed)
    assert tree["servers"][0]["host"] == "h"
    assert tree["servers"][0]["privateKey"] == ""  # nothing to hide in an empty one
    assert tree["servers"][0]["password"].startswith("vbsec:v1:")
    assert json.loads(b.open_json(sealed)) == DOC
    assert b.seal_json(sealed) == sealed  # sealing twice changes nothing
    # The same secret sealed twice differs (a fresh nonce each time).
    assert b.seal("x") != b.seal("x")


def test_a_secret_opens_only_with_its_key_and_unaltered() -> None:
    old_key, new = new_key(), new_key()
    sealed = box(old_key).seal("secret")
    with pytest.raises(SecretKeyError, match="not configured"):
        box(new).open(sealed)
    assert box(new, previous=old_key).open(sealed) == "secret"  # during a rotation
    assert box(new, previous=old_key).seal("s").split(":")[2] != sealed.split(":")[2]
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(SecretKeyError, match="does not open"):
        box(old_key).open(tampered)
    with pytest.raises(SecretKeyError, match="expected 32"):
        box(base64.b64encode(b"short").decode())


def test_the_key_file_is_created_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "data" / "secrets" / "secret-key"
    key = load_or_create_key_file(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_key_file(path) == key
    from_settings = SecretBox.from_settings(load_settings(data_dir=tmp_path / "data"))
    assert from_settings.open(SecretBox(key).seal("x")) == "x"


async def test_the_bucket_holds_ciphertext_and_its_users_read_plain_text(
    nats_server: NatsServer,
) -> None:
    nc = await connect(nats_server)
    try:
        raw = await ensure_bucket(nc.jetstream(), buckets.CONFIG)
        sealed = SealedConfigBucket(raw, box())
        watcher = await sealed.watch(CONFIG_KEY)
        assert await watcher.updates(5) is None  # nothing stored yet
        revision = await sealed.create(CONFIG_KEY, json.dumps(DOC).encode())
        await sealed.update(CONFIG_KEY, json.dumps(DOC).encode(), last=revision)
        stored = (await raw.get(CONFIG_KEY)).value or b""
        assert b"pw-1" not in stored and b"vbsec:v1:" in stored
        assert json.loads((await sealed.get(CONFIG_KEY)).value or b"") == DOC
        seen = await watcher.updates(5)
        assert json.loads(seen.value) == DOC
        assert [json.loads(e.value or b"") for e in await sealed.history(CONFIG_KEY)] == [DOC] * 2
        await watcher.stop()
    finally:
        await nc.drain()
