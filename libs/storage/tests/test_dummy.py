"""Dummy driver specifics: keys and sizes in memory, data discarded or in a temp dir."""

from __future__ import annotations

import pytest

from virtbackup.storage import NotFoundError, PermanentError, open_driver
from virtbackup.storage.dummy import DummyDriver


async def test_discards_data_but_remembers_keys_and_sizes() -> None:
    async with open_driver("dummy", {}) as driver:
        assert isinstance(driver, DummyDriver)
        assert driver.tmp_dir is None
        await driver.put("chunks/aa/1", b"12345")
        assert await driver.exists("chunks/aa/1")
        assert await driver.stat("chunks/aa/1") == 5
        assert [k async for k in driver.list("chunks/")] == ["chunks/aa/1"]
        with pytest.raises(PermanentError, match="dummyDriverTmpWrites"):
            await driver.get("chunks/aa/1")
        with pytest.raises(NotFoundError):
            await driver.get("chunks/aa/2")


async def test_tmp_writes_go_to_a_temp_dir_removed_on_close() -> None:
    driver = open_driver("dummy", {}, tmp_writes=True)
    assert isinstance(driver, DummyDriver)
    assert driver.tmp_writes
    tmp_dir = driver.tmp_dir
    assert tmp_dir is not None
    await driver.put("a/b", b"kept")
    assert (tmp_dir / "VirtBackup" / "a" / "b").read_bytes() == b"kept"
    assert await driver.get("a/b") == b"kept"
    await driver.delete("a/b")
    assert not (tmp_dir / "VirtBackup" / "a" / "b").exists()
    await driver.put("c", b"x")
    await driver.close()
    assert not tmp_dir.exists()


async def test_closed_driver_refuses_work() -> None:
    driver = open_driver("dummy", {})
    await driver.close()
    with pytest.raises(PermanentError, match="closed"):
        await driver.put("k", b"v")
