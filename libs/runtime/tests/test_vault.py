"""The vault's encryption at rest: AEAD bound to the connection id, and its key."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from virtbackup.runtime.sealing import SecretKeyError, new_key
from virtbackup.runtime.settings import load_settings
from virtbackup.runtime.vault import PREFIX, VaultCipher

SECRETS = {"password": "hunter2-vault", "privateKey": ""}


def test_sealed_fields_open_only_for_their_connection_and_key() -> None:
    cipher = VaultCipher.from_settings(load_settings(vault_key=new_key()))
    sealed = cipher.seal("vc-1", SECRETS)
    assert sealed.startswith(PREFIX)
    assert b"hunter2" not in sealed.encode()
    assert cipher.open("vc-1", sealed) == SECRETS
    assert cipher.seal("vc-1", SECRETS) != sealed  # a fresh nonce each time
    # The id is the associated data: a value copied onto another connection does not open.
    with pytest.raises(SecretKeyError, match="do not open"):
        cipher.open("vc-2", sealed)
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(SecretKeyError, match="do not open"):
        cipher.open("vc-1", tampered)
    other = VaultCipher.from_settings(load_settings(vault_key=new_key()))
    with pytest.raises(SecretKeyError, match="sealed under key"):
        other.open("vc-1", sealed)


def test_the_vault_key_comes_from_the_environment_a_secret_file_or_is_made(
    tmp_path: Path,
) -> None:
    with pytest.raises(SecretKeyError, match="expected 32"):
        VaultCipher.from_settings(load_settings(vault_key=base64.b64encode(b"short").decode()))
    # A Kubernetes Secret mounted as a file: it must exist (never made in its place).
    secret_file = tmp_path / "mounted" / "vault-key"
    with pytest.raises(SecretKeyError, match="VIRTBACKUP_VAULT_KEY_FILE"):
        VaultCipher.from_settings(load_settings(vault_key_file=secret_file))
    assert not secret_file.exists()
    secret_file.parent.mkdir()
    key = new_key()
    secret_file.write_text(key + "\n")
    from_file = VaultCipher.from_settings(load_settings(vault_key_file=secret_file))
    from_env = VaultCipher.from_settings(load_settings(vault_key=key))
    assert from_env.open("c", from_file.seal("c", SECRETS)) == SECRETS
    # Single-machine mode: made at first use, 0600 in a 0700 directory, then kept.
    data = tmp_path / "data"
    made = VaultCipher.from_settings(load_settings(data_dir=data))
    path = data / "secrets" / "vault-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = VaultCipher.from_settings(load_settings(data_dir=data))
    assert again.open("c", made.seal("c", SECRETS)) == SECRETS


def test_a_rotated_out_key_still_opens_what_it_sealed() -> None:
    old, new = new_key(), new_key()
    sealed = VaultCipher.from_settings(load_settings(vault_key=old)).seal("c", SECRETS)
    rotating = VaultCipher.from_settings(load_settings(vault_key=new, vault_key_previous=old))
    assert rotating.open("c", sealed) == SECRETS
    assert not rotating.is_current(sealed)
    assert rotating.is_current(rotating.seal("c", SECRETS))
    with pytest.raises(SecretKeyError, match="VIRTBACKUP_VAULT_KEY_PREVIOUS"):
        VaultCipher.from_settings(load_settings(vault_key=new)).open("c", sealed)
