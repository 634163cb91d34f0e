"""The machine's shared test state, made once before tests run side by side.

``python3 dev.py test`` runs the suite in two pytest-xdist workers. Some of what tests
need is made on first use and shared by the whole machine: libvirtd and virtlogd, the
SFTP test user and its password, the session host's user, and the one NBD certificate
authority of every test system (:mod:`virtbackup.testing.pki`). Each of those is safe
to make again, but two workers making them at the same moment on a fresh machine could
race (two ``libvirtd -d``, two ``useradd``). :func:`prepare_machine` makes them once, in
the controlling process, before any worker starts.
"""

from __future__ import annotations

import os

from virtbackup.testing.libvirtd import ensure_libvirtd
from virtbackup.testing.pki import shared_pki_dir
from virtbackup.testing.session_host import ensure_session_user
from virtbackup.testing.sshd import PASSWORD_FILE, ensure_test_user
from virtbackup.virt.pki import ensure_client_credentials, load_or_create_authority

__all__ = ["prepare_machine"]


def prepare_machine() -> list[str]:
    """Make the machine-wide test state (see the module docstring); returns what could not
    be made, one line each (an empty list when all was). Never raises: a test that needs
    a part that could not be made fails or skips there, saying why, as it would alone.
    Does nothing but return a line when not root (every part needs root)."""
    if os.geteuid() != 0:
        return ["not root: machine-wide test state left to the tests"]
    problems: list[str] = []
    steps = (
        ("libvirtd", ensure_libvirtd),
        ("the SFTP test user", lambda: ensure_test_user(PASSWORD_FILE)),
        ("the session host's user", ensure_session_user),
        (
            "the shared NBD CA",
            lambda: ensure_client_credentials(
                shared_pki_dir(), load_or_create_authority(shared_pki_dir())
            ),
        ),
    )
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # reported; the tests that need it say it again
            problems.append(f"{name}: {exc}")
    return problems
