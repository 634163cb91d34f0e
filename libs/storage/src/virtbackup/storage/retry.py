"""Retrying transient storage errors with exponential backoff, on tenacity.

Only ``TransientError`` is retried; ``NotFoundError`` and ``PermanentError`` propagate at
once because a retry cannot help. Every driver operation is idempotent, so repeating one
is always safe. Attempts are bounded (``RetryPolicy.attempts``) and so, optionally, is the
total time (``RetryPolicy.deadline``); when both run out the last ``TransientError`` is
raised (never tenacity's ``RetryError``). When the error carries a ``retry_after`` (a
server's ``Retry-After``), the wait is at least that long (up to
``RetryPolicy.max_retry_after``).

Tenacity runs the loop (stop conditions, the retry predicate, re-raising, the hook before
each wait); the waits are ``RetryPolicy``'s own, because they honour ``retry_after`` and
spread symmetrically around the backoff.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
)
from tenacity.stop import stop_base

from virtbackup.storage.errors import TransientError
from virtbackup.storage.protocol import Driver, ObjectInfo

T = TypeVar("T")

#: Called before each wait: (number of the failed attempt, its error, seconds to wait).
RetryHook = Callable[[int, TransientError, float], None]


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently to retry.

    The wait before retry ``n`` (1-based) is ``initial_delay * multiplier**(n-1)``, capped at
    ``max_delay``, then spread by +/- ``jitter`` (a fraction) so that many workers that
    failed together do not retry in lockstep.
    """

    attempts: int = 5
    initial_delay: float = 0.2
    multiplier: float = 2.0
    max_delay: float = 10.0
    jitter: float = 0.2
    #: Give up once this many seconds have passed since the first attempt (None: no limit).
    deadline: float | None = None
    #: The longest server-requested wait (``TransientError.retry_after``) honoured as asked.
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ValueError("delays must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if self.max_retry_after < 0:
            raise ValueError("max_retry_after must be >= 0")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry ``retry`` (1-based), jitter included."""
        try:
            delay = self.initial_delay * self.multiplier ** (retry - 1)
        except OverflowError:
            delay = math.inf
        capped = min(delay, self.max_delay)
        spread = capped * self.jitter
        return max(0.0, capped + random.uniform(-spread, spread))  # noqa: S311

    def delays(self) -> Iterator[float]:
        """The waits between attempts (``attempts - 1`` of them), before ``retry_after``."""
        return (self.backoff(n) for n in range(1, self.attempts))

    def wait(self, state: RetryCallState) -> float:
        """Tenacity's wait: the backoff, at least the server's ``retry_after`` (capped), at
        most the time left before ``deadline``."""
        delay = self.backoff(state.attempt_number)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientError) and exc.retry_after is not None and exc.retry_after > 0:
            delay = max(delay, min(exc.retry_after, self.max_retry_after))
        if self.deadline is not None:
            delay = min(delay, max(0.0, self.deadline - (state.seconds_since_start or 0.0)))
        return delay

    def stop(self) -> stop_base:
        """Tenacity's stop: out of attempts, or past the deadline."""
        stop: stop_base = stop_after_attempt(self.attempts)
        if self.deadline is not None:
            stop = stop | stop_after_delay(self.deadline)
        return stop


DEFAULT_POLICY = RetryPolicy()


async def retry(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy = DEFAULT_POLICY,
    *,
    on_retry: RetryHook | None = None,
) -> T:
    """Run ``operation`` until it succeeds, retrying ``TransientError`` per ``policy``.

    Returns what the operation returns; raises the last ``TransientError`` when attempts or
    the deadline run out, any other exception at once.
    """

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if on_retry is not None and isinstance(exc, TransientError):
            on_retry(state.attempt_number, exc, state.upcoming_sleep)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(TransientError),
        stop=policy.stop(),
        wait=policy.wait,
        before_sleep=before_sleep,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await operation()
    raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover


class RetryingDriver:
    """A ``Driver`` that retries every operation of another one per a ``RetryPolicy``.

    ``list`` is retried only until it has yielded its first key: after that a transient
    error propagates, because restarting would yield keys twice.
    """

    def __init__(
        self,
        inner: Driver,
        policy: RetryPolicy = DEFAULT_POLICY,
        *,
        on_retry: RetryHook | None = None,
    ) -> None:
        self.inner = inner
        self.policy = policy
        self._on_retry = on_retry

    @property
    def driver_id(self) -> str:
        return self.inner.driver_id

    async def _retry(self, operation: Callable[[], Awaitable[T]]) -> T:
        return await retry(operation, self.policy, on_retry=self._on_retry)

    async def put(self, key: str, data: bytes) -> None:
        await self._retry(lambda: self.inner.put(key, data))

    async def get(self, key: str) -> bytes:
        return await self._retry(lambda: self.inner.get(key))

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        return await self._retry(lambda: self.inner.get_range(key, offset, length))

    async def exists(self, key: str) -> bool:
        return await self._retry(lambda: self.inner.exists(key))

    async def stat(self, key: str) -> int:
        return await self._retry(lambda: self.inner.stat(key))

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        async for key in self._listing(self.inner.list, prefix):
            yield key

    async def list_info(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Retried as ``list`` is: only until the first entry."""
        async for info in self._listing(self.inner.list_info, prefix):
            yield info

    async def _listing(
        self, listing: Callable[[str], AsyncIterator[T]], prefix: str
    ) -> AsyncIterator[T]:
        async def first() -> tuple[AsyncIterator[T], T | None]:
            iterator = aiter(listing(prefix))
            try:
                return iterator, await anext(iterator)
            except StopAsyncIteration:
                return iterator, None
            except BaseException:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                raise

        iterator, head = await self._retry(first)
        if head is None:
            return
        yield head
        async for key in iterator:
            yield key

    async def delete(self, key: str) -> None:
        await self._retry(lambda: self.inner.delete(key))

    async def delete_many(self, keys: Iterable[str]) -> None:
        todo = tuple(keys)
        await self._retry(lambda: self.inner.delete_many(todo))

    async def close(self) -> None:
        await self.inner.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
