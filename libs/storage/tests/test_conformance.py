"""The conformance suite (restic's internal/backend/test): one set of tests, every driver.

Each test gets ``case``: a fresh, empty driver of one kind (filesystem, SFTP against a real
sshd, S3 against a real SeaweedFS, Google Drive against the in-memory stand-in of
``virtbackup.testing.gdrive`` (no real Google is reachable here), dummy with and
without tmp writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time

import pytest

from virtbackup.storage import (
    InvalidKeyError,
    NotFoundError,
    PermanentError,
    RetryingDriver,
    RetryPolicy,
    driver_info,
    test_connection,
)
from virtbackup.storage.keys import TEMP_PREFIX
from virtbackup.testing.drivers import DriverCase as Case

MIB = 1024 * 1024
BAD_KEYS = ["../x", "/abs", "a//b", "a\\b", "", "a/", ".", "a/../b", "a/./b", "x\x00y"]


async def listed(case: Case, prefix: str = "") -> list[str]:
    return sorted([key async for key in case.driver.list(prefix)])


def need_data(case: Case) -> None:
    if not case.stores_data:
        pytest.skip("the plain dummy driver discards data")


@pytest.mark.parametrize("size", [0, 1, 1000, MIB + 7])
async def test_put_get_roundtrip(case: Case, size: int) -> None:
    data = secrets.token_bytes(size)
    await case.driver.put("chunks/ab/abcdef", data)
    assert await case.driver.stat("chunks/ab/abcdef") == size
    if case.stores_data:
        assert await case.driver.get("chunks/ab/abcdef") == data
    else:
        with pytest.raises(PermanentError, match="discards data"):
            await case.driver.get("chunks/ab/abcdef")


async def test_top_level_and_deep_keys(case: Case) -> None:
    keys = ["repository.json", "vms/vm-1/2026-01-01T00:00:00Z/disk vda.manifest", "a/b/c/d/e/f"]
    for i, key in enumerate(keys):
        await case.driver.put(key, str(i).encode())
    assert await listed(case) == sorted(keys)
    for i, key in enumerate(keys):
        assert await case.driver.stat(key) == len(str(i))
        if case.stores_data:
            assert await case.driver.get(key) == str(i).encode()


async def test_overwrite_is_idempotent_and_last_wins(case: Case) -> None:
    first, second = secrets.token_bytes(3000), secrets.token_bytes(1234)
    await case.driver.put("k", first)
    await case.driver.put("k", first)
    assert await listed(case) == ["k"]
    assert await case.driver.stat("k") == len(first)
    if case.stores_data:
        assert await case.driver.get("k") == first
    await case.driver.put("k", second)
    assert await case.driver.stat("k") == len(second)
    if case.stores_data:
        assert await case.driver.get("k") == second
    assert await listed(case) == ["k"]


@pytest.mark.parametrize("key", ["missing", "no/such/dir/key"])
async def test_missing_key(case: Case, key: str) -> None:
    await case.driver.put("present", b"x")
    with pytest.raises(NotFoundError):
        await case.driver.get(key)
    with pytest.raises(NotFoundError):
        await case.driver.get_range(key, 0, 10)
    with pytest.raises(NotFoundError):
        await case.driver.stat(key)
    assert await case.driver.exists(key) is False
    assert await case.driver.exists("present") is True


async def test_range_reads(case: Case) -> None:
    data = secrets.token_bytes(10_000)
    await case.driver.put("obj", data)
    if not case.stores_data:
        with pytest.raises(PermanentError):
            await case.driver.get_range("obj", 0, 10)
        return
    get_range = case.driver.get_range
    assert await get_range("obj", 0, 1) == data[:1]
    assert await get_range("obj", 100, 50) == data[100:150]
    assert await get_range("obj", 9990, 10) == data[9990:]
    assert await get_range("obj", 9990, 100) == data[9990:]  # short at the end
    assert await get_range("obj", 0, 10_000) == data
    assert await get_range("obj", 10_000, 10) == b""  # at the end
    assert await get_range("obj", 20_000, 10) == b""  # past the end
    with pytest.raises(ValueError, match="offset"):
        await get_range("obj", -1, 10)
    with pytest.raises(ValueError, match="length"):
        await get_range("obj", 0, 0)


async def test_range_read_of_empty_object(case: Case) -> None:
    need_data(case)
    await case.driver.put("empty", b"")
    assert await case.driver.get_range("empty", 0, 10) == b""


async def test_exists_and_stat(case: Case) -> None:
    assert await case.driver.exists("a/b") is False
    await case.driver.put("a/b", b"12345")
    assert await case.driver.exists("a/b") is True
    assert await case.driver.stat("a/b") == 5
    # A "directory" is not an object.
    assert await case.driver.exists("a") is False
    with pytest.raises(NotFoundError):
        await case.driver.stat("a")


async def test_list_with_prefixes(case: Case) -> None:
    assert await listed(case) == []
    keys = ["a", "a1/x", "ab/c/d", "b/x", "b/y/z", "chunks/00/k1", "chunks/01/k2", "chunks/1"]
    await asyncio.gather(*(case.driver.put(k, k.encode()) for k in keys))
    assert await listed(case) == sorted(keys)
    assert await listed(case, "b/") == ["b/x", "b/y/z"]
    assert await listed(case, "b") == ["b/x", "b/y/z"]
    assert await listed(case, "a") == ["a", "a1/x", "ab/c/d"]
    assert await listed(case, "chunks/0") == ["chunks/00/k1", "chunks/01/k2"]
    assert await listed(case, "chunks/01/") == ["chunks/01/k2"]
    assert await listed(case, "chunks/") == ["chunks/00/k1", "chunks/01/k2", "chunks/1"]
    assert await listed(case, "b/y") == ["b/y/z"]
    assert await listed(case, "b/y/z") == ["b/y/z"]
    assert await listed(case, "nope/") == []
    assert await listed(case, "nope") == []
    assert await listed(case, "chunks/00/k1/") == []


async def test_list_info_gives_sizes_and_ages_on_the_destinations_clock(case: Case) -> None:
    """``list_info`` lists what ``list`` lists, with sizes, and ages that order writes
    (S3 and SFTP have whole seconds: the writes are more than a second apart)."""
    assert [i async for i in case.driver.list_info()] == []
    before = time.time()
    await case.driver.put("ages/old", b"o" * 1000)
    await case.driver.put("ages/sub/deep", b"")
    await case.driver.put("other", b"x")
    await asyncio.sleep(1.1)
    await case.driver.put("ages/new", b"n" * 10)
    infos = {i.key: i async for i in case.driver.list_info("ages/")}
    assert sorted(infos) == await listed(case, "ages/") == ["ages/new", "ages/old", "ages/sub/deep"]
    assert (infos["ages/old"].size, infos["ages/new"].size, infos["ages/sub/deep"].size) == (
        1000,
        10,
        0,
    )
    assert infos["ages/old"].modified < infos["ages/new"].modified
    # The test servers run on this machine: their clock is ours (to a second's rounding).
    for info in infos.values():
        assert before - 2 <= info.modified <= time.time() + 2
    retried = RetryingDriver(case.driver, RetryPolicy(attempts=2, initial_delay=0))
    assert sorted([i async for i in retried.list_info("ages/n")]) == [infos["ages/new"]]
    await asyncio.sleep(1.1)
    await case.driver.put("ages/old", b"o" * 1000)  # rewritten: younger now
    again = {i.key: i async for i in case.driver.list_info("ages/o")}
    assert list(again) == ["ages/old"]
    assert again["ages/old"].modified > infos["ages/new"].modified
    await case.driver.delete("ages/new")
    assert [i.key async for i in case.driver.list_info("ages/n")] == []
    with pytest.raises(InvalidKeyError):
        _ = [i async for i in case.driver.list_info("/abs")]


async def test_delete_is_idempotent(case: Case) -> None:
    await case.driver.put("d/k", b"data")
    await case.driver.put("d/other", b"data")
    await case.driver.delete("d/k")
    assert await case.driver.exists("d/k") is False
    await case.driver.delete("d/k")
    await case.driver.delete("never/was/here")
    assert await listed(case) == ["d/other"]
    with pytest.raises(NotFoundError):
        await case.driver.get("d/k")


async def test_delete_many(case: Case) -> None:
    keys = [f"chunks/{i % 4:02x}/{i:04d}" for i in range(40)]
    await asyncio.gather(*(case.driver.put(k, b"x" * (i + 1)) for i, k in enumerate(keys)))
    doomed = keys[:25]
    await case.driver.delete_many([*doomed, "chunks/ff/missing", "not-there"])
    assert await listed(case) == sorted(keys[25:])
    await case.driver.delete_many(doomed)  # again: idempotent
    await case.driver.delete_many([])
    assert await listed(case) == sorted(keys[25:])


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_rejected(case: Case, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        await case.driver.put(key, b"x")
    with pytest.raises(InvalidKeyError):
        await case.driver.get(key)
    with pytest.raises(InvalidKeyError):
        await case.driver.get_range(key, 0, 1)
    with pytest.raises(InvalidKeyError):
        await case.driver.exists(key)
    with pytest.raises(InvalidKeyError):
        await case.driver.stat(key)
    with pytest.raises(InvalidKeyError):
        await case.driver.delete(key)
    with pytest.raises(InvalidKeyError):
        await case.driver.delete_many(["fine", key])
    assert await listed(case) == []
    if case.local_root is not None:
        assert not (case.local_root.parent / "x").exists()


@pytest.mark.parametrize("prefix", ["../", "/abs", "a//", "a\\b", "/", "a/../b"])
async def test_bad_prefixes_rejected(case: Case, prefix: str) -> None:
    with pytest.raises(InvalidKeyError):
        await listed(case, prefix)


async def test_concurrent_puts(case: Case) -> None:
    blobs = {f"chunks/{i:02x}/{i:064x}": secrets.token_bytes(MIB) for i in range(64)}
    await asyncio.gather(*(case.driver.put(k, v) for k, v in blobs.items()))
    assert await listed(case, "chunks/") == sorted(blobs)
    sizes = await asyncio.gather(*(case.driver.stat(k) for k in blobs))
    assert sizes == [MIB] * 64
    if case.stores_data:
        read = await asyncio.gather(*(case.driver.get(k) for k in blobs))
        assert [hashlib.sha256(d).digest() for d in read] == [
            hashlib.sha256(d).digest() for d in blobs.values()
        ]


async def test_large_object(case: Case) -> None:
    data = secrets.token_bytes(16 * MIB)
    await case.driver.put("big", data)
    assert await case.driver.stat("big") == len(data)
    if case.stores_data:
        assert await case.driver.get("big") == data
        middle = 8 * MIB - 3
        assert await case.driver.get_range("big", middle, MIB) == data[middle : middle + MIB]


async def test_cancelled_put_leaves_no_partial_object(case: Case) -> None:
    data = secrets.token_bytes(32 * MIB)
    await case.driver.put("before", b"ok")
    task = asyncio.ensure_future(case.driver.put("torn", data))
    await asyncio.sleep(0.005)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # the dummy driver is done before it can be cancelled
    if await case.driver.exists("torn"):  # a put already past its commit point may win
        assert await case.driver.stat("torn") == len(data)
        if case.stores_data:
            assert await case.driver.get("torn") == data
    keys = await listed(case)
    assert all(TEMP_PREFIX not in key for key in keys)
    assert set(keys) <= {"before", "torn"}


async def test_leftover_temp_files_are_not_keys(case: Case) -> None:
    if case.local_root is None:
        pytest.skip("no local view of this driver's root")
    await case.driver.put("chunks/ab/real", b"real")
    leftover = case.local_root / "chunks" / "ab" / f"{TEMP_PREFIX}0123456789abcdef-other"
    leftover.write_bytes(b"partial")
    (case.local_root / f"{TEMP_PREFIX}feedface-top").write_bytes(b"partial")
    assert await listed(case) == ["chunks/ab/real"]
    assert await case.driver.exists("chunks/ab/other") is False


async def test_readers_never_see_a_partial_object(case: Case) -> None:
    need_data(case)
    versions = [secrets.token_bytes(2 * MIB), secrets.token_bytes(2 * MIB)]
    await case.driver.put("hot", versions[0])
    stop = asyncio.Event()
    seen: list[bytes] = []

    async def writer() -> None:
        for i in range(8):
            await case.driver.put("hot", versions[i % 2])
        stop.set()

    async def reader() -> None:
        while not stop.is_set():
            seen.append(await case.driver.get("hot"))

    await asyncio.gather(writer(), reader(), reader())
    assert seen
    assert all(data in versions for data in seen)


async def test_registry_range_read_capability_is_truthful(case: Case) -> None:
    info = driver_info(case.driver.driver_id)
    assert info is not None
    await case.driver.put("r", b"0123456789")
    calls: list[str] = []
    real_get = case.driver.get

    async def counting_get(key: str) -> bytes:
        calls.append(key)
        return await real_get(key)

    case.driver.get = counting_get  # type: ignore[method-assign]
    try:
        result = await case.driver.get_range("r", 2, 3)
    except PermanentError:
        result = None  # the plain dummy driver: it still had to try a whole read
    emulated = bool(calls)
    assert info.capabilities.supports_range_read is not emulated
    if case.stores_data:
        assert result == b"234"


async def test_connection_probe(case: Case) -> None:
    info = driver_info(case.driver.driver_id)
    assert info is not None
    message = await test_connection(case.driver)
    assert message == f"{info.label} connection successful (read/write OK)."
    assert await listed(case) == []


async def test_retrying_driver_passes_through(case: Case) -> None:
    wrapped = RetryingDriver(case.driver, RetryPolicy(attempts=2, initial_delay=0.01))
    assert wrapped.driver_id == case.driver.driver_id
    await wrapped.put("w/1", b"abc")
    await wrapped.delete_many(["w/missing"])
    assert [k async for k in wrapped.list("w/")] == ["w/1"]
    assert await wrapped.exists("w/1")
    assert await wrapped.stat("w/1") == 3
    with pytest.raises(NotFoundError):
        await wrapped.get("w/2")
    if case.stores_data:
        assert await wrapped.get("w/1") == b"abc"
        assert await wrapped.get_range("w/1", 1, 5) == b"bc"
    await wrapped.delete("w/1")
    assert [k async for k in wrapped.list()] == []
