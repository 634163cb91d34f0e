"""Filesystem driver specifics: durability plumbing, failures midway, confinement."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtbackup.storage import PermanentError, open_driver
from virtbackup.storage.errors import NotFoundError
from virtbackup.storage.filesystem import DIRECT_MIN, FilesystemDriver
from virtbackup.storage.keys import TEMP_PREFIX
from virtbackup.testing.pagecache import resident_pages

MIB = 1024 * 1024


@pytest.fixture
def small_file_limit() -> Iterator[int]:
    """Limit this process's file size to 1 MiB (Python ignores SIGXFSZ: writes get EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MIB, hard))
    try:
        yield MIB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


async def test_write_failing_midway_leaves_nothing(tmp_path: Path, small_file_limit: int) -> None:
    async with FilesystemDriver(tmp_path / "VirtBackup") as driver:
        await driver.put("d/ok", b"small")
        with pytest.raises(PermanentError, match="cannot write 'd/big'"):
            await driver.put("d/big", secrets.token_bytes(4 * small_file_limit))
        assert await driver.exists("d/big") is False
        assert [k async for k in driver.list()] == ["d/ok"]
        # The partial temp file was removed, not just hidden.
        assert sorted(os.listdir(tmp_path / "VirtBackup" / "d")) == ["ok"]


async def test_failed_overwrite_keeps_the_old_object(tmp_path: Path) -> None:
    async with FilesystemDriver(tmp_path / "VirtBackup") as driver:
        old = secrets.token_bytes(1000)
        await driver.put("k", old)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (MIB, hard))
        try:
            with pytest.raises(PermanentError):
                await driver.put("k", secrets.token_bytes(2 * MIB))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert await driver.get("k") == old


async def test_base_directory_must_exist(tmp_path: Path) -> None:
    async with open_driver("filesystem", {"path": str(tmp_path / "unmounted")}) as driver:
        with pytest.raises(PermanentError, match="does not exist"):
            await driver.put("k", b"x")
        # Reads refuse too: an unmounted disk is no empty repository.
        with pytest.raises(PermanentError, match="does not exist"):
            [k async for k in driver.list()]
        with pytest.raises(PermanentError, match="does not exist"):
            await driver.get("repository.json")
        with pytest.raises(PermanentError, match="does not exist"):
            await driver.stat("k")
    assert not (tmp_path / "unmounted").exists()


async def test_a_missing_object_under_an_existing_base_is_not_found(tmp_path: Path) -> None:
    async with open_driver("filesystem", {"path": str(tmp_path)}) as driver:
        assert [k async for k in driver.list()] == []
        with pytest.raises(NotFoundError):
            await driver.get("repository.json")


async def test_repository_folder_and_file_layout(tmp_path: Path) -> None:
    async with open_driver("filesystem", {"path": str(tmp_path)}) as driver:
        await driver.put("chunks/ab/abcd", b"chunk")
    assert (tmp_path / "VirtBackup" / "chunks" / "ab" / "abcd").read_bytes() == b"chunk"
    names = [p.name for p in sorted(tmp_path.rglob("*"))]
    assert names == ["VirtBackup", "chunks", "ab", "abcd"]
    assert not any(name.startswith(TEMP_PREFIX) for name in names)


async def test_symlinks_are_not_listed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    root = tmp_path / "VirtBackup"
    async with FilesystemDriver(root) as driver:
        await driver.put("real", b"r")
        (root / "link-dir").symlink_to(outside)
        (root / "link-file").symlink_to(outside / "secret")
        assert [k async for k in driver.list()] == ["real"]


async def test_a_directory_is_not_an_object(tmp_path: Path) -> None:
    async with FilesystemDriver(tmp_path / "VirtBackup") as driver:
        await driver.put("dir/k", b"x")
        await driver.delete("dir")  # not an object: nothing to delete, no error
        assert await driver.get("dir/k") == b"x"
        with pytest.raises(Exception, match="not found"):
            await driver.get("dir")


async def test_without_fsync_still_atomic(tmp_path: Path) -> None:
    async with FilesystemDriver(tmp_path / "VirtBackup", fsync=False) as driver:
        await driver.put("k", b"v")
        assert await driver.get("k") == b"v"
        assert os.listdir(tmp_path / "VirtBackup") == ["k"]


async def test_closed_driver_refuses_work(tmp_path: Path) -> None:
    driver = FilesystemDriver(tmp_path / "VirtBackup")
    await driver.close()
    with pytest.raises(PermanentError, match="closed"):
        await driver.put("k", b"v")


@pytest.mark.parametrize("size", [DIRECT_MIN, DIRECT_MIN + 1, 4 * MIB - 7, 4 * MIB + 4096])
async def test_chunks_bypass_the_page_cache(tmp_path: Path, size: int) -> None:
    """Large objects are written with O_DIRECT: exact size on disk, nothing left cached."""
    data = secrets.token_bytes(size)
    async with FilesystemDriver(tmp_path / "VirtBackup") as driver:
        await driver.put("c/chunk", data)
        path = tmp_path / "VirtBackup" / "c" / "chunk"
        assert path.stat().st_size == size
        assert driver.direct is True
        assert resident_pages(path) == 0
        assert await driver.get("c/chunk") == data
        assert await driver.get_range("c/chunk", size - 5, 10) == data[-5:]
        # A small object (records, manifests) goes through the page cache as before.
        await driver.put("c/small", b"x" * 100)
        assert resident_pages(tmp_path / "VirtBackup" / "c" / "small") == 1


async def test_filesystem_refusing_direct_io_gets_buffered_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some filesystems answer EINVAL to O_DIRECT: the driver falls back and remembers."""
    real_open = os.open

    def refusing_open(path: str, flags: int, *args: int, **kwargs: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    data = secrets.token_bytes(4 * MIB + 3)
    async with FilesystemDriver(tmp_path / "VirtBackup") as driver:
        await driver.put("c/chunk", data)
        assert driver.direct is False
        assert await driver.get("c/chunk") == data
        assert [name for name in os.listdir(tmp_path / "VirtBackup" / "c")] == ["chunk"]


def _nobody_can_read(path: Path) -> bool:
    """Whether the unprivileged user ``nobody`` can read ``path`` (or list it, a directory)."""
    command = ["ls", str(path)] if path.is_dir() else ["head", "-c1", str(path)]
    done = subprocess.run(["runuser", "-u", "nobody", "--", *command], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A destination base that every local user can traverse (0755 up to /), like a
    /var/backups: only the driver's own modes can keep other users out of it."""
    base = Path(tempfile.mkdtemp(prefix="vbtest-modes-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as nobody")
async def test_repository_is_readable_by_its_owner_only(open_base: Path) -> None:
    chunk = secrets.token_bytes(DIRECT_MIN)  # large enough for the O_DIRECT path
    async with open_driver("filesystem", {"path": str(open_base)}) as driver:
        await driver.put("chunks/ab/abcdef", chunk)
        await driver.put("config", b"small")
    root = open_base / "VirtBackup"
    for directory in (root, root / "chunks", root / "chunks" / "ab"):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    for file in (root / "chunks" / "ab" / "abcdef", root / "config"):
        assert file.stat().st_mode & 0o777 == 0o600, file
    assert _nobody_can_read(open_base)  # the test itself lets nobody in up to the base
    assert not _nobody_can_read(root)
    assert not _nobody_can_read(root / "chunks" / "ab" / "abcdef")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as nobody")
async def test_a_root_left_open_by_an_older_version_is_narrowed(open_base: Path) -> None:
    root = open_base / "VirtBackup"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    async with open_driver("filesystem", {"path": str(open_base)}) as driver:
        await driver.put("k", b"v")
    assert root.stat().st_mode & 0o777 == 0o700


async def test_deleting_the_last_objects_removes_their_empty_folders(tmp_path: Path) -> None:
    root = tmp_path / "VirtBackup"
    async with FilesystemDriver(root) as driver:
        await driver.put("vms/web1/t1/backup.json", b"r")
        await driver.put("vms/web1/t1/vda.manifest", b"m")
        await driver.put("vms/web1/t2/backup.json", b"r")
        await driver.put("chunks/ab/abcd", b"c")
        await driver.delete("vms/web1/t1/backup.json")
        assert (root / "vms" / "web1" / "t1").is_dir()  # still holds the manifest
        await driver.delete("vms/web1/t1/vda.manifest")
        assert not (root / "vms" / "web1" / "t1").exists()
        assert (root / "vms" / "web1" / "t2").is_dir()
        await driver.delete_many(["vms/web1/t2/backup.json", "chunks/ab/abcd"])
        # Every folder left empty went, up to the root, which stays.
        assert sorted(os.listdir(root)) == []
        assert [k async for k in driver.list()] == []
        await driver.put("vms/web1/t3/backup.json", b"r")  # and folders come back on a put
        assert [k async for k in driver.list("vms/")] == ["vms/web1/t3/backup.json"]


class _RacedDriver(FilesystemDriver):
    """Removes each folder it has just made, as a concurrent delete that emptied the VM's
    folder would between a put's ``mkdir`` and its ``open`` (the first ``races`` times)."""

    def __init__(self, root: Path, races: int) -> None:
        super().__init__(root)
        self.races = races

    def _make_dirs(self, directory: Path) -> None:
        super()._make_dirs(directory)
        if self.races > 0:
            self.races -= 1
            self._remove_empty_dirs(directory)


async def test_a_put_outlasts_a_delete_removing_its_folder_meanwhile(tmp_path: Path) -> None:
    root = tmp_path / "VirtBackup"
    async with _RacedDriver(root, races=3) as driver:
        await driver.put("vms/web1/t1/backup.json", b"r")
        await driver.put("vms/web1/t2/big", secrets.token_bytes(128 * 1024))  # O_DIRECT path
        assert driver.races == 0
        assert await driver.get("vms/web1/t1/backup.json") == b"r"
        assert sorted([k async for k in driver.list("vms/")]) == [
            "vms/web1/t1/backup.json",
            "vms/web1/t2/big",
        ]


async def test_concurrent_deletes_and_puts_in_one_vm_folder_lose_nothing(tmp_path: Path) -> None:
    root = tmp_path / "VirtBackup"
    async with FilesystemDriver(root, fsync=False) as driver:
        for i in range(60):
            await driver.put(f"vms/web1/old{i}/backup.json", b"o")
            # The delete empties vms/web1 while the put makes vms/web1/new<i>.
            await asyncio.gather(
                driver.delete(f"vms/web1/old{i}/backup.json"),
                driver.put(f"vms/web1/new{i}/backup.json", b"n"),
            )
            assert await driver.get(f"vms/web1/new{i}/backup.json") == b"n"
            await driver.delete(f"vms/web1/new{i}/backup.json")
        assert not (root / "vms").exists()


def _direct_buffers() -> int:
    """The ``O_DIRECT`` buffers this process maps (shared anonymous: ``/dev/zero``)."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sum(1 for line in maps if line.endswith("/dev/zero (deleted)"))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux's /proc")
async def test_direct_io_buffers_are_shared_by_the_threads(tmp_path: Path) -> None:
    """Many puts and gets at once through the 16 threads: the aligned buffers are taken
    only for the read or write itself and a few are kept, instead of one per thread."""
    before = _direct_buffers()
    driver = FilesystemDriver(tmp_path)
    blobs = {f"chunks/{i:02x}/blob": os.urandom(1 << 20) + bytes([i]) for i in range(48)}
    try:
        await asyncio.gather(*(driver.put(key, blob) for key, blob in blobs.items()))
        read = await asyncio.gather(*(driver.get(key) for key in blobs))
        assert read == list(blobs.values())
        assert driver.direct  # ext4: the puts and gets went through the aligned buffers
        assert 1 <= _direct_buffers() - before <= 4
    finally:
        await driver.close()
