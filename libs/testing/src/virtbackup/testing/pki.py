"""One NBD certificate authority for every test system on this machine.

Each VirtBackup installation writes its CA and a server certificate into the host's
libvirt backup TLS folder (``/etc/pki/qemu``) before a backup; test systems with CAs
of their own would overwrite each other's there while their backups run side by side.
Tests therefore share one CA (``VIRTBACKUP_PKI_DIR``), kept across runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

SHARED_PKI_DIR: Final = Path("/var/lib/virtbackup-tests/pki")


def shared_pki_dir() -> Path:
    """The machine's test CA folder (made on first use, mode 0700, in a folder only root
    can write: nobody else can plant a CA there)."""
    SHARED_PKI_DIR.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    SHARED_PKI_DIR.mkdir(mode=0o700, exist_ok=True)
    return SHARED_PKI_DIR
