"""The gateway's own credential files (the agent token, the TLS certificate and key) are
made readable by their owner only, their directory included."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from virtbackup.gateway.credentials import TLS_DIR, ensure_certificate, ensure_token
from virtbackup.runtime.settings import Settings


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_token_and_certificate_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data, token=None)
    ensure_token(settings)
    cert, key = ensure_certificate(settings)
    assert mode(data) == 0o700 and mode(data / "agent-token") == 0o600
    assert mode(data / TLS_DIR) == 0o700
    assert mode(cert) == 0o600 and mode(key) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN")


def test_a_given_certificate_is_used_as_it_is(tmp_path: Path) -> None:
    """Replicas behind one address share a certificate (a Kubernetes TLS Secret): given,
    it is served as it is and nothing is made; half of it, or an unreadable file, stops
    the start naming the variable."""
    made, made_key = ensure_certificate(Settings(data_dir=tmp_path / "elsewhere", token=None))
    data = tmp_path / "data"
    given = Settings(data_dir=data, token=None, tls_cert_file=made, tls_key_file=made_key)
    assert ensure_certificate(given) == (made, made_key)
    assert not (data / TLS_DIR).exists()
    half = Settings(data_dir=data, token=None, tls_cert_file=made)
    with pytest.raises(SystemExit, match="VIRTBACKUP_TLS_KEY_FILE is not set"):
        ensure_certificate(half)
    missing = Settings(
        data_dir=data, token=None, tls_cert_file=made, tls_key_file=tmp_path / "nope.key"
    )
    with pytest.raises(SystemExit, match=r"VIRTBACKUP_TLS_KEY_FILE: .*nope\.key cannot be read"):
        ensure_certificate(missing)
