"""State files on restore: built by role where the XML being defined keeps them, written
in pieces, moved into place, or removed; nothing outside a job's own trees is touched.
The local libvirtd (its URI says system or session) and real tools on this machine."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import msgspec
import pytest

from virtbackup.contracts.v1.config import Server
from virtbackup.contracts.v1.inventory import RestoreFinishRequest
from virtbackup.contracts.v1.state import (
    StagedState,
    StateFile,
    StatePrepareRequest,
    StateReadRequest,
    StateReleaseRequest,
    StateSnapshotRequest,
    StateWriteRequest,
)
from virtbackup.inventory import restores, state_files
from virtbackup.inventory.hosts import HostServer
from virtbackup.runtime.errors import BadRequest, Conflict
from virtbackup.testing.libvirtd import ensure_libvirtd
from virtbackup.testing.vms import MiB, create_vm, remove_vm, vm_directory
from virtbackup.virt.host import LocalHost

pytestmark = pytest.mark.libvirt


@pytest.fixture
def server() -> HostServer:
    ensure_libvirtd()
    return HostServer(config=Server(id="local", name="This host", host=""), timeout=5)


def _xml(tmp_path: Path) -> str:
    """A domain whose NVRAM and TPM state live in ``tmp_path`` (no loader: a VM of its
    own is not needed, the XML is only read)."""
    return (
        "<domain type='qemu'><name>vm1</name>"
        "<uuid>39fdf10f-8302-462b-88a4-8202520c3b4c</uuid>"
        f"<os><type>hvm</type><nvram>{tmp_path}/new/vm1_VARS.fd</nvram></os><devices>"
        "<tpm model='tpm-crb'><backend type='emulator'>"
        f"<source type='dir' path='{tmp_path}/tpm'/></backend></tpm></devices></domain>"
    )


def _saved(size: int) -> list[StateFile]:
    """What a snapshot of another host listed (paths there do not matter)."""

    def f(role: str, relative: str, kind: str, size: int, mode: int) -> StateFile:
        return msgspec.convert(
            {"role": role, "path": "/elsewhere", "relative": relative, "kind": kind,
             "size": size, "mode": mode, "owner": "tss", "group": "tss"},
            StateFile,
        )  # fmt: skip

    return [
        f("nvram", "", "file", size, 0o600),
        f("tpm", "", "dir", 0, 0o711),
        f("tpm", "tpm2", "dir", 0, 0o700),
        f("tpm", "tpm2/tpm2-00.permall", "file", 5, 0o600),
        f("loader", "", "file", 1, 0o644),
    ]


async def test_staged_by_role_written_then_moved_into_place(
    server: HostServer, tmp_path: Path
) -> None:
    nvram = os.urandom(600_000)
    (tmp_path / "tpm" / "tpm2").mkdir(parents=True)
    (tmp_path / "tpm" / "tpm2" / "stale").write_bytes(b"old")
    req = StatePrepareRequest(
        server_id="local", job_id="j1", domain_xml=_xml(tmp_path), files=_saved(len(nvram))
    )
    prepared = await state_files.prepare(server, req)
    assert prepared.skipped == ["loader"]  # the XML has no writable loader
    staged = {s.role: s for s in prepared.staged}
    assert staged["nvram"].temp_path == f"{tmp_path}/new/vm1_VARS.fd.vbrestore-j1"
    assert staged["tpm"].temp_path == f"{tmp_path}/tpm.vbrestore-j1"
    assert (tmp_path / "tpm" / "tpm2" / "stale").exists()  # nothing replaced yet

    for offset in range(0, len(nvram), 256 * 1024):
        piece = nvram[offset : offset + 256 * 1024]
        write = StateWriteRequest(
            server_id="local", job_id="j1", path=staged["nvram"].temp_path, offset=offset,
            data=piece,
        )  # fmt: skip
        await state_files.write(server, write)
    permall = f"{staged['tpm'].temp_path}/tpm2/tpm2-00.permall"
    await state_files.write(
        server, StateWriteRequest(server_id="local", job_id="j1", path=permall, data=b"tpm!!")
    )

    # A commit repeated without the list (another orchestrator) finds the staged trees.
    found = await state_files.staged_for(server, "j1", _xml(tmp_path), [])
    assert sorted(found, key=lambda s: s.role) == sorted(prepared.staged, key=lambda s: s.role)
    await state_files.commit(LocalHost(), "j1", found)
    assert (tmp_path / "new" / "vm1_VARS.fd").read_bytes() == nvram
    assert (tmp_path / "tpm" / "tpm2" / "tpm2-00.permall").read_bytes() == b"tpm!!"
    assert not (tmp_path / "tpm" / "tpm2" / "stale").exists()
    for path, mode in (("new/vm1_VARS.fd", 0o600), ("tpm", 0o711), ("tpm/tpm2", 0o700)):
        st = (tmp_path / path).stat()
        assert st.st_mode & 0o7777 == mode
        assert (tmp_path / path).owner() == "tss"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "tpm"]  # no temporaries


async def test_owners_and_modes_of_an_unauthenticated_record_are_clamped(
    server: HostServer, tmp_path: Path
) -> None:
    """backup.json is plaintext: an owner libvirt and swtpm never use becomes the host's
    account (root), and setuid, setgid, sticky and write-by-others bits are dropped."""
    forged = [
        StateFile(role="nvram", path="/x", mode=0o6777, owner="nobody", group="nogroup", size=1),
        StateFile(role="tpm", path="/y", kind="dir", mode=0o1777, owner="daemon", group="kvm"),
    ]
    req = StatePrepareRequest(
        server_id="local", job_id="j3", domain_xml=_xml(tmp_path), files=forged
    )
    prepared = await state_files.prepare(server, req)
    staged = {s.role: Path(s.temp_path) for s in prepared.staged}
    nvram, tpm = staged["nvram"].stat(), staged["tpm"].stat()
    assert (nvram.st_mode & 0o7777, staged["nvram"].owner(), staged["nvram"].group()) == (
        0o775, "root", "root")  # fmt: skip
    assert (tpm.st_mode & 0o7777, staged["tpm"].owner(), staged["tpm"].group()) == (
        0o775, "root", "kvm")  # fmt: skip
    await state_files.discard(LocalHost(), prepared.staged, "j3")


async def test_a_place_of_the_wrong_kind_is_never_replaced(
    server: HostServer, tmp_path: Path
) -> None:
    """The NVRAM is a file: a directory where the restored domain keeps it is refused
    (409), like a directory where a disk file is due; nothing is staged."""
    (tmp_path / "new" / "vm1_VARS.fd").mkdir(parents=True)
    req = StatePrepareRequest(
        server_id="local", job_id="j4", domain_xml=_xml(tmp_path), files=_saved(3)
    )
    with pytest.raises(Conflict, match="is a dir"):
        await state_files.prepare(server, req)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


async def test_only_missing_state_is_put_back(server: HostServer, tmp_path: Path) -> None:
    """``only_missing`` (a restore that only defines): a role whose place holds state is
    kept as it is (named in ``kept``); a missing one is staged, and committed without
    replacing anything that appeared meanwhile."""
    (tmp_path / "tpm").mkdir()
    (tmp_path / "tpm" / "mine").write_bytes(b"keep")
    req = StatePrepareRequest(
        server_id="local", job_id="j5", domain_xml=_xml(tmp_path), files=_saved(3),
        only_missing=True,
    )  # fmt: skip
    prepared = await state_files.prepare(server, req)
    assert prepared.kept == ["tpm"]
    assert [(s.role, s.replace) for s in prepared.staged] == [("nvram", False)]
    await state_files.commit(LocalHost(), "j5", prepared.staged)
    assert (tmp_path / "new" / "vm1_VARS.fd").stat().st_size == 0
    assert (tmp_path / "tpm" / "mine").read_bytes() == b"keep"
    # Committed again after the place was filled: what is there stays.
    (tmp_path / "new" / "vm1_VARS.fd").write_bytes(b"new state")
    prepared = await state_files.prepare(server, req)
    assert prepared.kept == ["nvram", "tpm"] and not prepared.staged


async def test_nothing_outside_a_jobs_own_trees(server: HostServer, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    for path in (str(victim), f"{tmp_path}/x.vbrestore-other", f"{tmp_path}/a.vbrestore-j1/../v"):
        with pytest.raises(BadRequest, match="not staged by job j1"):
            await state_files.write(
                server, StateWriteRequest(server_id="local", job_id="j1", path=path, data=b"x")
            )
    with pytest.raises(BadRequest, match="not in the snapshot"):
        await state_files.read(
            server,
            StateReadRequest(server_id="local", job_id="j1", path=str(victim)),
            str(tmp_path / "scratch"),
        )
    forged = StagedState(role="nvram", path=str(victim), temp_path=str(victim))
    with pytest.raises(BadRequest, match="not staged by job j1"):
        await state_files.discard(LocalHost(), [forged], "j1")
    with pytest.raises(BadRequest, match="not staged by job j1"):
        await state_files.commit(LocalHost(), "j1", [forged])
    assert victim.read_bytes() == b"keep"


async def test_a_failed_prepare_leaves_nothing(server: HostServer, tmp_path: Path) -> None:
    files = _saved(3)
    # Two roots for the TPM directory: the saved entries do not make a tree.
    files.insert(2, StateFile(role="tpm", path="/u", kind="dir", mode=0o711, owner="root",
                              group="root"))  # fmt: skip
    xml = _xml(tmp_path)
    req = StatePrepareRequest(server_id="local", job_id="j2", domain_xml=xml, files=files)
    with pytest.raises(BadRequest, match="not a dir"):
        await state_files.prepare(server, req)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new"]  # only the made parent
    bad = StateFile(
        role="nvram", path="/x", relative="../x", mode=0o600, owner="root", group="root"
    )
    req = StatePrepareRequest(server_id="local", job_id="j2", domain_xml=xml, files=[bad])
    with pytest.raises(BadRequest, match="relative"):
        await state_files.prepare(server, req)


async def test_a_failed_restore_without_its_list_removes_what_it_staged(
    server: HostServer,
) -> None:
    """A restore ended by another orchestrator replica (which has no list of the state
    the dead one staged) still removes it from libvirt's own state directories."""
    job = f"jf{os.getpid()}"
    nvram = Path(f"/var/lib/libvirt/qemu/nvram/vbt-st-{os.getpid()}_VARS.fd.vbrestore-{job}")
    tpm = Path(f"/var/lib/libvirt/swtpm/00000000-0000-0000-0000-{os.getpid():012d}.vbrestore-{job}")
    keep = Path(f"/var/lib/libvirt/qemu/nvram/vbt-st-{os.getpid()}_VARS.fd")
    nvram.parent.mkdir(parents=True, exist_ok=True)
    tpm.parent.mkdir(parents=True, exist_ok=True)
    nvram.write_bytes(b"staged")
    keep.write_bytes(b"in place")
    (tpm / "tpm2").mkdir(parents=True)
    try:
        req = RestoreFinishRequest(server_id="local", job_id=job, vm_name="none", success=False)
        await restores.finish(server, req)
        assert not nvram.exists() and not tpm.exists()
        assert keep.read_bytes() == b"in place"
    finally:
        keep.unlink()
        nvram.unlink(missing_ok=True)
        shutil.rmtree(tpm, ignore_errors=True)


async def test_a_snapshot_of_a_vm_without_state_and_abandoned_copies(
    server: HostServer, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    stale, fresh = scratch / "vbstate-old", scratch / "vbstate-running"
    for path in (stale, fresh):
        (path / "0").mkdir(parents=True)
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))
    name = f"vbt-st-{os.getpid()}"
    directory = vm_directory()
    conn = await server.connection()
    try:
        await create_vm(conn, name, directory, [MiB], start=False)
        req = StateSnapshotRequest(server_id="local", vm_name=name, job_id="j5")
        snap = await state_files.take_snapshot(server, req, str(scratch))
        assert snap.files == []  # SeaBIOS, no TPM: nothing but disks
        assert sorted(p.name for p in scratch.iterdir()) == ["vbstate-j5", "vbstate-running"]
        release = StateReleaseRequest(server_id="local", job_id="j5")
        await state_files.release(server, release, str(scratch))
        await state_files.release(server, release, str(scratch))  # idempotent
        assert sorted(p.name for p in scratch.iterdir()) == ["vbstate-running"]
    finally:
        await remove_vm(conn, name, delete_directory=directory)
        await server.close()
