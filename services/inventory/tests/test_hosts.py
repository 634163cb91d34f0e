"""Connecting to configured servers: a libvirt URI that would run a program is never
opened, whatever path it reached the configuration by; SSH goes only to the pinned host
key (a real OpenSSH sshd on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from virtbackup.contracts.v1.config import Server
from virtbackup.inventory.hosts import HostServer
from virtbackup.runtime.errors import Unavailable
from virtbackup.testing.sshd import SshdServer, sshd_server


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+ext:///system?command={script}",
        "qemu+ssh://root@127.0.0.1/system?command={script}",
        "qemu+ssh://root@127.0.0.1/system?netcat={script}",
    ],
)
async def test_a_uri_that_runs_a_program_is_not_opened(tmp_path: Path, uri: str) -> None:
    marker = tmp_path / "ran"
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    # Built directly, as a config written straight into the bucket would be: no validation.
    server = HostServer(config=Server(id="x", uri=uri.format(script=script)), timeout=5)
    with pytest.raises(Unavailable, match=r"not accepted|not supported"):
        await server.connection()
    with pytest.raises(Unavailable, match=r"not accepted|not supported"):
        await server.open_new()
    assert not marker.exists()


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshdServer]:
    with sshd_server() as server:
        yield server


def _ssh_server(sshd: SshdServer, host_key: str) -> HostServer:
    config = Server(
        id="ssh",
        host=sshd.host,
        port=sshd.port,
        username=sshd.username,
        password=sshd.password or "",
        host_key=host_key,
    )
    return HostServer(config=config, timeout=10)


async def test_ssh_needs_the_pinned_host_key(sshd: SshdServer) -> None:
    pinned = asyncssh.import_public_key(sshd.host_key).get_fingerprint("sha256")
    # The pinned key, as a key line or a fingerprint: logged in (no shell for this user).
    for host_key in (sshd.host_key, pinned):
        assert (await _ssh_server(sshd, host_key).test_ssh()).startswith("SSH login OK")
    # Not pinned: nothing is sent.
    with pytest.raises(Unavailable, match="not pinned"):
        await _ssh_server(sshd, "").test_ssh()
    # Another key: refused, naming both fingerprints.
    other = asyncssh.generate_private_key("ssh-ed25519")
    wrong = other.export_public_key().decode()
    with pytest.raises(Unavailable, match="does not match the pinned hostKey") as info:
        await _ssh_server(sshd, wrong).test_ssh()
    assert f"pinned {other.get_fingerprint('sha256')}" in info.value.message
    assert f"presented {pinned}" in info.value.message
