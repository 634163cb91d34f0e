"""A fresh destination driver of every kind, for tests that hold all drivers to one
contract (the storage conformance suite, restic's ``internal/backend/test``).

    case = open_test_driver("sftp", scratch=tmp_path, sshd=sshd)
    await case.driver.put("k", b"v")
    await case.driver.close()
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from virtbackup.storage.dummy import DummyDriver
from virtbackup.storage.factory import REPOSITORY_DIR, open_driver
from virtbackup.storage.protocol import Driver
from virtbackup.testing.gdrive import FakeGoogleDrive, google_driver
from virtbackup.testing.seaweedfs import SeaweedServer
from virtbackup.testing.sshd import SshdServer

__all__ = ["DRIVER_KINDS", "DriverCase", "open_test_driver"]

#: Every driver configuration a conformance run covers.
DRIVER_KINDS: Final = ("filesystem", "sftp", "s3", "gdrive", "dummy-tmp", "dummy")


@dataclass
class DriverCase:
    """A driver under test, and what a test may expect of it."""

    kind: str
    driver: Driver
    #: Whether get() returns what put() stored (false for the plain dummy driver).
    stores_data: bool
    #: The driver's root as a local directory, where a test can look behind its back.
    local_root: Path | None = None


def open_test_driver(
    kind: str,
    *,
    scratch: Path,
    sshd: SshdServer | None = None,
    seaweed: SeaweedServer | None = None,
    google: FakeGoogleDrive | None = None,
) -> DriverCase:
    """A fresh, empty driver of ``kind`` (one of ``DRIVER_KINDS``).

    ``scratch`` is an empty local directory (the filesystem driver's base); ``sshd`` (the
    SFTP role), ``seaweed`` and ``google`` are needed for ``sftp``, ``s3`` and ``gdrive``,
    else ValueError (also for an unknown kind). Each call gets its own root, so tests
    sharing a server do not see each other's keys. Close ``case.driver`` when done.
    """
    name = f"t-{secrets.token_hex(4)}"
    if kind == "filesystem":
        driver = open_driver("filesystem", {"path": str(scratch)})
        return DriverCase(kind, driver, True, scratch / REPOSITORY_DIR)
    if kind == "sftp":
        if sshd is None:
            raise ValueError("sftp needs an SshdServer")
        base = sshd.make_base(name)
        return DriverCase(kind, open_driver("sftp", sshd.params(base)), True,
                          Path(base) / REPOSITORY_DIR)  # fmt: skip
    if kind == "s3":
        if seaweed is None:
            raise ValueError("s3 needs a SeaweedServer")
        return DriverCase(kind, open_driver("s3", seaweed.params(prefix=name)), True)
    if kind == "gdrive":
        if google is None:
            raise ValueError("gdrive needs a FakeGoogleDrive")
        return DriverCase(kind, google_driver(google, root_path=f"/{name}"), True)
    if kind == "dummy-tmp":
        dummy = DummyDriver(tmp_writes=True)
        assert dummy.tmp_dir is not None
        return DriverCase(kind, dummy, True, dummy.tmp_dir / REPOSITORY_DIR)
    if kind == "dummy":
        return DriverCase(kind, open_driver("dummy", {}), False)
    raise ValueError(f"unknown driver kind {kind!r} (known: {', '.join(DRIVER_KINDS)})")
