"""Per-VM state files: found from the domain XML, and copied, read, written, staged and
moved on a host (this machine, with the real tools)."""

from __future__ import annotations

import hashlib
import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtbackup.testing.sshd import SshdServer, sshd_server
from virtbackup.virt.host import LocalHost, SshHost
from virtbackup.virt.state import (
    StateEntry,
    StateError,
    StateLocation,
    commit,
    connection_kind,
    discard,
    home_directory,
    list_entries,
    locate_state,
    read_piece,
    snapshot,
    stage,
    write_piece,
)

UUID = "39fdf10f-8302-462b-88a4-8202520c3b4c"


def _domain(os_part: str, devices: str = "", uuid: str = UUID) -> str:
    return (
        f"<domain type='qemu'><name>vm1</name><uuid>{uuid}</uuid>"
        f"<os>{os_part}</os><devices>{devices}</devices></domain>"
    )


TPM = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
LOADER = "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"


def test_nvram_and_tpm_of_a_system_domain() -> None:
    xml = _domain(
        LOADER + "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/srv/vm1.fd</nvram>", TPM
    )
    assert locate_state(xml) == [
        StateLocation("nvram", "/srv/vm1.fd", "file"),
        StateLocation("tpm", f"/var/lib/libvirt/swtpm/{UUID}", "dir"),
    ]


def test_a_session_domain_keeps_its_state_below_the_users_home() -> None:
    xml = _domain("<type>hvm</type>", TPM).replace("<os>", "<os firmware='efi'>")
    assert locate_state(xml, "session", home="/home/ann") == [
        StateLocation("nvram", "/home/ann/.config/libvirt/qemu/nvram/vm1_VARS.fd", "file"),
        StateLocation("tpm", f"/home/ann/.config/libvirt/qemu/swtpm/{UUID}", "dir"),
    ]
    with pytest.raises(ValueError, match="home"):
        locate_state(xml, "session")


def test_what_libvirt_names_implicitly_and_what_is_not_state() -> None:
    # A read-only pflash loader without <nvram>: libvirt makes <nvram dir>/<name>_VARS.fd.
    assert locate_state(_domain(LOADER)) == [
        StateLocation("nvram", "/var/lib/libvirt/qemu/nvram/vm1_VARS.fd", "file")
    ]
    # Stateless firmware, SeaBIOS, a network NVRAM, a passthrough TPM: nothing to copy.
    stateless = LOADER.replace("type='pflash'", "type='pflash' stateless='yes'")
    assert locate_state(_domain(stateless)) == []
    assert locate_state(_domain("<type>hvm</type>")) == []
    network = "<nvram type='network'><source protocol='iscsi' name='x'/></nvram>"
    assert locate_state(_domain(LOADER + network)) == []
    passthrough = "<tpm><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>"
    assert locate_state(_domain("", passthrough)) == []


def test_a_writable_loader_a_file_nvram_and_named_tpm_state() -> None:
    loader = "<loader readonly='no' type='pflash'>/srv/vm1-OVMF.fd</loader>"
    nvram = "<nvram type='file'><source file='/srv/vars.fd'/></nvram>"
    tpms = (
        "<tpm model='tpm-crb'><backend type='emulator'><source type='dir' path='/srv/tpm'/>"
        "</backend></tpm><tpm model='spapr-tpm-proxy'><backend type='emulator'>"
        "<source type='file' path='/srv/tpm2.state'/></backend></tpm>"
    )
    assert locate_state(_domain(loader + nvram, tpms)) == [
        StateLocation("nvram", "/srv/vars.fd", "file"),
        StateLocation("loader", "/srv/vm1-OVMF.fd", "file"),
        StateLocation("tpm", "/srv/tpm", "dir"),
        StateLocation("tpm.1", "/srv/tpm2.state", "file"),
    ]


def test_a_tpm_without_uuid_cannot_be_located() -> None:
    with pytest.raises(ValueError, match="uuid"):
        locate_state(_domain("", TPM, uuid=""))


def test_connection_kinds() -> None:
    assert connection_kind("qemu:///system") == "system"
    assert connection_kind("qemu+ssh://root@h/system?keyfile=x") == "system"
    assert connection_kind("qemu:///session") == "session"
    assert connection_kind("qemu+unix:///session?socket=/run/x") == "session"


def _tree(root: Path) -> dict[str, tuple[str, int, int, int]]:
    """Every entry below ``root``: (sha256 or 'dir', mode, uid, gid)."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        out[str(path.relative_to(root))] = (digest, st.st_mode & 0o7777, st.st_uid, st.st_gid)
    return out


@pytest.fixture
def tpm_dir(tmp_path: Path) -> Path:
    """A TPM-like state directory: 0711 root, a 0700 subdirectory, a 0600 file (owned by
    ``nobody`` when this runs as root)."""
    root = tmp_path / "tpm"
    (root / "tpm2").mkdir(parents=True)
    (root / "tpm2" / "tpm2-00.permall").write_bytes(os.urandom(300_000))
    (root / "tpm2" / ".lock").write_bytes(b"")
    root.chmod(0o711)
    (root / "tpm2").chmod(0o700)
    (root / "tpm2" / "tpm2-00.permall").chmod(0o600)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for path in (root / "tpm2", root / "tpm2" / "tpm2-00.permall"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    return root


async def test_snapshot_read_stage_write_commit_round_trip(tmp_path: Path, tpm_dir: Path) -> None:
    host = LocalHost()
    before = _tree(tpm_dir)
    location = StateLocation("tpm", str(tpm_dir), "dir")
    copy = tmp_path / "snap"
    entries = await snapshot(host, location, str(copy))
    assert [(e.relative, e.kind) for e in entries] == [
        ("", "dir"),
        ("tpm2", "dir"),
        ("tpm2/.lock", "file"),
        ("tpm2/tpm2-00.permall", "file"),
    ]
    assert entries[0].mode == 0o711 and entries[1].mode == 0o700
    assert entries[3].size == 300_000
    assert _tree(copy) == before  # owners and modes kept

    # Read the copy in pieces, as the orchestrator does.
    content = bytearray()
    while len(content) < entries[3].size:
        content += await read_piece(host, str(copy / "tpm2/tpm2-00.permall"), len(content), 65536)
    assert bytes(content) == (tpm_dir / "tpm2/tpm2-00.permall").read_bytes()
    assert await read_piece(host, str(copy / "tpm2/.lock"), 0, 10) == b""

    # The state changes, then is put back from what was read.
    (tpm_dir / "tpm2/tpm2-00.permall").write_bytes(b"changed since")
    (tpm_dir / "extra").write_bytes(b"x")
    temp = f"{tpm_dir}.vbrestore-j1"
    await stage(host, location, entries, temp)
    for offset in range(0, len(content), 100_000):
        chunk = bytes(content[offset : offset + 100_000])
        await write_piece(host, f"{temp}/tpm2/tpm2-00.permall", offset, chunk)
    assert (tpm_dir / "extra").exists()  # nothing replaced before the commit
    assert await commit(host, location, temp, f"{tpm_dir}.vbold-j1")
    assert _tree(tpm_dir) == before
    assert not Path(temp).exists() and not Path(f"{tpm_dir}.vbold-j1").exists()
    # Committing again is harmless (a finish repeated by another replica).
    assert not await commit(host, location, temp, f"{tpm_dir}.vbold-j1")
    assert _tree(tpm_dir) == before


async def test_a_file_location_and_an_absent_one(tmp_path: Path) -> None:
    host = LocalHost()
    nvram = tmp_path / "vm1_VARS.fd"
    location = StateLocation("nvram", str(nvram), "file")
    assert await snapshot(host, location, str(tmp_path / "snap")) == []
    assert await list_entries(host, str(nvram)) == []

    data = os.urandom(540_672)
    nvram.write_bytes(data)
    nvram.chmod(0o600)
    [entry] = await snapshot(host, location, str(tmp_path / "snap"))
    assert (entry.relative, entry.kind, entry.size, entry.mode) == ("", "file", len(data), 0o600)

    # Put back where the file no longer is, into a folder that no longer exists.
    target = tmp_path / "gone" / "vm1_VARS.fd"
    moved = StateLocation("nvram", str(target), "file")
    temp = f"{target}.vbrestore-j2"
    await stage(host, moved, [entry], temp)
    await write_piece(host, temp, 0, data)
    assert await commit(host, moved, temp, f"{target}.vbold-j2")
    assert target.read_bytes() == data and target.stat().st_mode & 0o7777 == 0o600

    # A discarded stage leaves nothing.
    await stage(host, moved, [entry], temp)
    await discard(host, temp)
    assert not Path(temp).exists() and target.read_bytes() == data


async def test_staging_refuses_what_does_not_fit(tmp_path: Path) -> None:
    host = LocalHost()
    location = StateLocation("tpm", str(tmp_path / "tpm"), "dir")
    root = StateEntry("", "dir", 0, 0o711, "root", "root")
    with pytest.raises(ValueError, match="not a dir"):
        await stage(host, location, [StateEntry("", "file", 1, 0o600, "root", "root")], "/x")
    bad = StateEntry("../escape", "file", 1, 0o600, "root", "root")
    with pytest.raises(ValueError, match="relative"):
        await stage(host, location, [root, bad], str(tmp_path / "t"))
    unknown = StateEntry("", "dir", 0, 0o700, "no-such-user", "root")
    with pytest.raises(StateError, match="no-such-user"):
        await stage(host, location, [unknown], str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()  # a failed stage leaves nothing
    with pytest.raises(StateError, match="not a regular file"):
        await read_piece(host, str(tmp_path), 0, 10)


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshdServer]:
    """An sshd logging in root on this machine: a remote hypervisor's host."""
    if os.geteuid() != 0:
        pytest.skip("needs root (an sshd logging in root)")
    with sshd_server(root=True) as server:
        yield server


async def test_the_same_over_ssh(sshd: SshdServer, tmp_path: Path) -> None:
    client = await sshd.connect()
    try:
        host = SshHost(client)
        assert await home_directory(host) == pwd.getpwuid(0).pw_dir
        nvram = tmp_path / "vars.fd"
        data = os.urandom(200_000)
        nvram.write_bytes(data)
        location = StateLocation("nvram", str(nvram), "file")
        [entry] = await snapshot(host, location, str(tmp_path / "snap"))
        assert await read_piece(host, str(tmp_path / "snap"), 1000, 150_000) == data[1000:151_000]
        nvram.write_bytes(b"lost")
        temp = f"{nvram}.vbrestore-j3"
        await stage(host, location, [entry], temp)
        await write_piece(host, temp, 0, data[:100_000])
        await write_piece(host, temp, 100_000, data[100_000:])
        assert await commit(host, location, temp, f"{nvram}.vbold-j3")
        assert nvram.read_bytes() == data
    finally:
        client.close()
        await client.wait_closed()
