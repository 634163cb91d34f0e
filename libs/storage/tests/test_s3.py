"""S3 driver specifics, against a real SeaweedFS on loopback."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from virtbackup.runtime.ports import free_port
from virtbackup.storage import (
    InvalidParamsError,
    NotFoundError,
    PermanentError,
    RetryPolicy,
    TransientError,
    open_driver,
    retry,
    test_connection,
)
from virtbackup.storage import s3 as s3_module
from virtbackup.storage.s3 import S3Driver, split_endpoint
from virtbackup.testing.seaweedfs import SeaweedServer

MIB = 1024 * 1024


def s3(seaweed: SeaweedServer, **params: object) -> S3Driver:
    params.setdefault("prefix", f"s-{secrets.token_hex(4)}")
    driver = open_driver("s3", seaweed.params(**params))
    assert isinstance(driver, S3Driver)
    return driver


async def test_probe_message(seaweed: SeaweedServer) -> None:
    async with s3(seaweed) as driver:
        assert await test_connection(driver) == "S3 connection successful (read/write OK)."


async def test_objects_live_under_prefix_slash_virtbackup(seaweed: SeaweedServer) -> None:
    prefix = f"team/{secrets.token_hex(4)}"
    async with s3(seaweed, prefix=f"/{prefix}/") as driver:
        await driver.put("chunks/ab/k", b"v")
    names = await asyncio.to_thread(
        lambda: [
            o.object_name
            for o in seaweed.client().list_objects(seaweed.bucket, prefix=prefix, recursive=True)
        ]
    )
    assert names == [f"{prefix}/VirtBackup/chunks/ab/k"]


async def test_missing_bucket_is_permanent(seaweed: SeaweedServer) -> None:
    async with s3(seaweed, bucket="no-such-bucket-here") as driver:
        for operation in (
            lambda: driver.put("k", b"x"),
            lambda: driver.get("k"),
            lambda: driver.stat("k"),
            lambda: driver.delete("k"),
        ):
            with pytest.raises(PermanentError, match="bucket 'no-such-bucket-here' does not exist"):
                await operation()
        with pytest.raises(PermanentError, match="does not exist"):
            _ = [k async for k in driver.list()]
    assert not await asyncio.to_thread(seaweed.client().bucket_exists, "no-such-bucket-here")


async def test_wrong_secret_is_permanent(seaweed: SeaweedServer) -> None:
    async with s3(seaweed, secretKey="wrong-secret") as driver:
        started = time.monotonic()
        with pytest.raises(PermanentError, match="access denied"):
            await driver.put("k", b"x")
        assert time.monotonic() - started < 10


async def test_connection_refused_is_transient() -> None:
    port = free_port()
    async with S3Driver(endpoint=f"127.0.0.1:{port}", bucket="bucket", secure=False) as driver:
        started = time.monotonic()
        with pytest.raises(TransientError, match="unreachable"):
            await driver.get("k")
        assert time.monotonic() - started < 10


async def test_server_stopped_is_transient_then_retry_recovers(seaweed: SeaweedServer) -> None:
    async with s3(seaweed) as driver:
        await driver.put("chunks/00/before", b"kept")
        await asyncio.to_thread(seaweed.stop)
        try:
            with pytest.raises(TransientError):
                await driver.put("chunks/00/during", b"x")
            with pytest.raises(TransientError):
                await driver.get("chunks/00/before")
            retries: list[int] = []
            restarter = asyncio.ensure_future(asyncio.to_thread(seaweed.start))
            await retry(
                lambda: driver.put("chunks/00/during", b"written after restart"),
                RetryPolicy(attempts=40, initial_delay=0.2, max_delay=2.0, deadline=90),
                on_retry=lambda attempt, exc, delay: retries.append(attempt),
            )
            await restarter
        finally:
            await asyncio.to_thread(seaweed.start)
        assert retries, "the first attempts should have failed while SeaweedFS was down"
        assert await driver.get("chunks/00/during") == b"written after restart"
        assert await driver.get("chunks/00/before") == b"kept"


async def test_multipart_upload_roundtrip(seaweed: SeaweedServer) -> None:
    params = seaweed.params()
    async with S3Driver(
        endpoint=params["endpoint"],
        bucket=seaweed.bucket,
        root=f"mp-{secrets.token_hex(4)}/",
        region=seaweed.region,
        access_key=seaweed.access_key,
        secret_key=seaweed.secret_key,
        secure=False,
        part_size=5 * MIB,
    ) as driver:
        data = secrets.token_bytes(12 * MIB + 5)
        await driver.put("big", data)  # three parts
        assert await driver.stat("big") == len(data)
        assert await driver.get("big") == data
        assert await driver.get_range("big", 5 * MIB - 2, 4) == data[5 * MIB - 2 : 5 * MIB + 2]


async def test_delete_many_in_batches(
    seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_module, "DELETE_BATCH", 7)
    async with s3(seaweed) as driver:
        keys = [f"b/{i:03d}" for i in range(30)]
        await asyncio.gather(*(driver.put(k, b"x") for k in keys))
        await driver.delete_many([*keys[:20], "b/missing"])
        assert [k async for k in driver.list("b/")] == keys[20:]


async def test_list_pages_through_many_keys(
    seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_module, "LIST_BATCH", 3)
    async with s3(seaweed) as driver:
        keys = [f"l/{i:02d}" for i in range(11)]
        await asyncio.gather(*(driver.put(k, b"x") for k in keys))
        assert [k async for k in driver.list("l/")] == keys


async def test_endpoint_with_scheme(seaweed: SeaweedServer) -> None:
    assert split_endpoint("http://h:9000/", True) == ("h:9000", False)
    assert split_endpoint("https://h:9000", False) == ("h:9000", True)
    assert split_endpoint("h:9000", True) == ("h:9000", True)
    with pytest.raises(InvalidParamsError):
        split_endpoint("http://h:9000/path", False)
    async with s3(seaweed, endpoint=f"http://{seaweed.endpoint}", secure=True) as driver:
        await driver.put("k", b"scheme")
        assert await driver.get("k") == b"scheme"


async def test_bad_prefix_is_a_parameter_error(seaweed: SeaweedServer) -> None:
    with pytest.raises(InvalidParamsError, match="prefix"):
        open_driver("s3", seaweed.params(prefix="a/../b"))


async def test_get_range_of_missing_key_past_end(seaweed: SeaweedServer) -> None:
    async with s3(seaweed) as driver:
        with pytest.raises(NotFoundError):
            await driver.get_range("missing", 100, 10)


async def test_hung_server_times_out_as_transient(seaweed: SeaweedServer) -> None:
    params = seaweed.params()
    async with S3Driver(
        endpoint=params["endpoint"],
        bucket=seaweed.bucket,
        root=f"h-{secrets.token_hex(4)}/",
        region=seaweed.region,
        access_key=seaweed.access_key,
        secret_key=seaweed.secret_key,
        secure=False,
        connect_timeout=1.0,
        read_timeout=1.0,
    ) as driver:
        await driver.put("k", b"v")
        seaweed.pause()
        try:
            started = time.monotonic()
            with pytest.raises(TransientError):
                await driver.get("k")
            assert time.monotonic() - started < 8
        finally:
            seaweed.resume()
        assert await retry(lambda: driver.get("k"), RetryPolicy(attempts=10)) == b"v"
