"""The gateway's own credential files (the agent token, the TLS certificate and key) are
made readable by their owner only, their directory included."""

from __future__ import annotations

import stat
from pathlib import Path

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
