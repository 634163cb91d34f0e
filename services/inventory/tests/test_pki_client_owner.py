"""The workers' client certificate folder given to the workers' user when the inventory
runs as another (compose: root for the local libvirt socket, the workers 10001): before,
a worker could not read its key (0600, root's) and every export of a real VM failed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from virtbackup.inventory.credentials import ExportCredentials
from virtbackup.virt.pki import CA_DIR, CLIENT_DIR, CLIENT_KEY

NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_the_client_folder_goes_to_the_workers_user_and_stays_private(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    ExportCredentials.load(pki, f"{NOBODY}:{NOBODY}")
    client = pki / CLIENT_DIR
    for path in (client, *client.iterdir()):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (NOBODY, NOBODY), path
    assert stat.S_IMODE(client.stat().st_mode) == 0o700
    assert stat.S_IMODE((client / CLIENT_KEY).stat().st_mode) == 0o600
    # The CA (its key signs every export's certificate) stays the inventory's own.
    assert (pki / CA_DIR).stat().st_uid == os.geteuid()
    # Loading again (a restart) keeps working and keeps the owner.
    again = ExportCredentials.load(pki, str(NOBODY))
    assert again.client_dir == client and client.stat().st_uid == NOBODY
