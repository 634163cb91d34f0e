"""Connecting to configured servers: a libvirt URI that would run a program is never
opened, whatever path it reached the configuration by."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtbackup.contracts.v1.config import Server
from virtbackup.inventory.hosts import HostServer
from virtbackup.runtime.errors import Unavailable


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
