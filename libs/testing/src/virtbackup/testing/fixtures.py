"""Pytest fixtures shared by every test package (loaded by the root ``conftest.py``).

Destination servers: ``sshd`` (OpenSSH on loopback, the SFTP role) and ``seaweed``
(SeaweedFS with its S3 gateway) once per session, ``google`` (the Google Drive stand-in,
in memory) once per test; a second libvirt host, ``session_host`` (another user's
``qemu:///session`` over SSH), once per session; :func:`driver_case` opens a fresh
driver of a kind with the servers it needs. A module that needs a server of its own
set-up defines a fixture of the same name, which takes precedence.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtbackup.runtime.nats_server import NatsServer, start_nats_server
from virtbackup.testing.drivers import DriverCase, open_test_driver
from virtbackup.testing.gdrive import FakeGoogleDrive
from virtbackup.testing.seaweedfs import SeaweedServer
from virtbackup.testing.session_host import SessionHost
from virtbackup.testing.sshd import SshdServer
from virtbackup.testing.vms import vm_directory


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream for one test, storing under ``tmp_path``; clients
    must log in (``server.client_settings()``, ``virtbackup.testing.nats.connect``)."""
    server = start_nats_server(tmp_path / "nats", auth=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vm_dir() -> Iterator[Path]:
    """A QEMU-traversable directory for a module's images and scratch files."""
    path = vm_directory()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def repo_dir() -> Iterator[Path]:
    """A module's filesystem repository folder (a destination's ``path``), removed at
    the end (root owns what the services wrote there)."""
    path = vm_directory(prefix="vbtest-repo-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd() -> Iterator[SshdServer]:
    """A real sshd on a loopback port (the SFTP destinations' server) for the session."""
    server = SshdServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def session_host() -> Iterator[SessionHost]:
    """A second libvirt host for the session: the session daemon of user ``vbsess``
    behind an sshd on loopback (``virtbackup.testing.session_host``); its VMs of this
    process and its image folder are removed at the end."""
    host = SessionHost()
    try:
        host.start()
        yield host
    finally:
        host.close()


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedServer]:
    """A real SeaweedFS with its S3 gateway on loopback for the session."""
    server = SeaweedServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def google() -> Iterator[FakeGoogleDrive]:
    """The Google Drive stand-in (in memory, so one per test keeps memory flat)."""
    server = FakeGoogleDrive()
    try:
        server.start()
        yield server
    finally:
        server.close()


def driver_case(request: pytest.FixtureRequest, kind: str, scratch: Path) -> DriverCase:
    """A fresh, empty driver of ``kind`` (``testing.drivers.open_test_driver``), with the
    server fixture it needs (``sshd``, ``seaweed`` or ``google``) taken from ``request``;
    ``scratch`` is an empty local directory. Close ``case.driver`` when done."""
    return open_test_driver(
        kind,
        scratch=scratch,
        sshd=request.getfixturevalue("sshd") if kind == "sftp" else None,
        seaweed=request.getfixturevalue("seaweed") if kind == "s3" else None,
        google=request.getfixturevalue("google") if kind == "gdrive" else None,
    )
