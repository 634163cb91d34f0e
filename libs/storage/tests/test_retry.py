"""The retry helper: transient errors are retried with bounded backoff, others are not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtbackup.storage import (
    NotFoundError,
    PermanentError,
    RetryingDriver,
    RetryPolicy,
    StorageError,
    TransientError,
    retry,
)
from virtbackup.storage.filesystem import FilesystemDriver

FAST = RetryPolicy(attempts=4, initial_delay=0.01, max_delay=0.02, jitter=0)


class Flaky:
    """An operation that fails ``failures`` times with ``error`` before succeeding."""

    def __init__(self, failures: int, error: StorageError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


def test_errors_say_whether_a_retry_helps() -> None:
    assert TransientError("t").retryable is True
    assert PermanentError("p").retryable is False
    assert NotFoundError("k").retryable is False
    assert "k" in str(NotFoundError("k"))


async def test_transient_errors_are_retried() -> None:
    operation = Flaky(3, TransientError("timeout"))
    seen: list[tuple[int, float]] = []
    result = await retry(operation, FAST, on_retry=lambda n, exc, d: seen.append((n, d)))
    assert result == "done"
    assert operation.calls == 4
    assert [n for n, _ in seen] == [1, 2, 3]


async def test_retry_after_is_honoured_up_to_a_cap() -> None:
    waits: list[float] = []
    operation = Flaky(1, TransientError("slow down", retry_after=0.05))
    assert await retry(operation, FAST, on_retry=lambda n, exc, d: waits.append(d)) == "done"
    assert waits == [0.05]  # longer than the 10 ms backoff
    capped = RetryPolicy(attempts=2, initial_delay=0.01, jitter=0, max_retry_after=0.03)
    waits.clear()
    operation = Flaky(1, TransientError("slow down", retry_after=3600))
    assert await retry(operation, capped, on_retry=lambda n, exc, d: waits.append(d)) == "done"
    assert waits == [0.03]
    assert TransientError("plain").retry_after is None
    with pytest.raises(ValueError, match="max_retry_after"):
        RetryPolicy(max_retry_after=-1)


async def test_attempts_are_bounded() -> None:
    operation = Flaky(10, TransientError("still down"))
    with pytest.raises(TransientError, match="still down"):
        await retry(operation, FAST)
    assert operation.calls == 4


@pytest.mark.parametrize("error", [PermanentError("auth"), NotFoundError("k")])
async def test_other_errors_are_not_retried(error: StorageError) -> None:
    operation = Flaky(1, error)
    with pytest.raises(type(error)):
        await retry(operation, FAST)
    assert operation.calls == 1


async def test_deadline_bounds_the_total_time() -> None:
    policy = RetryPolicy(attempts=1000, initial_delay=0.05, max_delay=0.05, deadline=0.3)
    operation = Flaky(10_000, TransientError("down"))
    started = time.monotonic()
    with pytest.raises(TransientError):
        await retry(operation, policy)
    assert time.monotonic() - started < 1.0
    assert 3 <= operation.calls < 20


async def test_waits_never_pass_the_deadline() -> None:
    policy = RetryPolicy(attempts=100, initial_delay=0.2, max_delay=0.2, jitter=0, deadline=0.3)
    waits: list[float] = []
    with pytest.raises(TransientError):
        await retry(
            Flaky(1000, TransientError("down")), policy, on_retry=lambda n, e, d: waits.append(d)
        )
    assert waits[0] == pytest.approx(0.2)
    assert 0 <= waits[-1] < 0.2  # cut to what was left of the deadline
    assert sum(waits) <= 0.3 + 1e-6


async def test_cancellation_is_not_retried() -> None:
    calls = 0

    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await retry(cancelled, FAST)
    assert calls == 1


def test_delays_grow_exponentially_and_are_capped() -> None:
    policy = RetryPolicy(attempts=6, initial_delay=1, multiplier=2, max_delay=5, jitter=0)
    assert list(policy.delays()) == [1, 2, 4, 5, 5]
    jittered = list(RetryPolicy(attempts=50, initial_delay=1, max_delay=1, jitter=0.5).delays())
    assert all(0.5 <= d <= 1.5 for d in jittered)
    assert len(set(jittered)) > 1
    assert RetryPolicy(jitter=0, max_delay=7).backoff(100_000) == 7  # no overflow


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.5)


class FlakyListDriver(FilesystemDriver):
    """A real filesystem driver whose listing fails transiently a given number of times."""

    list_failures = 0
    fail_after_first = False

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        if self.list_failures:
            self.list_failures -= 1
            raise TransientError("listing hiccup")
        first = True
        async for key in super().list(prefix):
            if not first and self.fail_after_first:
                raise TransientError("dropped mid-listing")
            first = False
            yield key


async def test_retrying_driver_retries_list_until_the_first_key(tmp_path: Path) -> None:
    inner = FlakyListDriver(tmp_path / "VirtBackup")
    async with RetryingDriver(inner, FAST) as driver:
        for key in ("a", "b", "c"):
            await driver.put(key, b"x")
        inner.list_failures = 2
        assert sorted([k async for k in driver.list()]) == ["a", "b", "c"]
        inner.fail_after_first = True
        with pytest.raises(TransientError, match="mid-listing"):
            _ = [k async for k in driver.list()]
