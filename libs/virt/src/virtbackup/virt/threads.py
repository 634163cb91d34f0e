"""A thread pool whose idle threads end: one per libvirt connection, none left when idle.

Every :class:`~virtbackup.virt.connection.Connection` runs its blocking libvirt calls in
a pool of its own, so that a host that hangs holds only its own threads and never
starves the calls to other hosts. :class:`concurrent.futures.ThreadPoolExecutor` keeps
every thread it ever started until shutdown, so an inventory of 1,000 servers (two
connections each: calls and lifecycle events) kept about 2,000 threads that were idle
nearly all the time (README, "Fleet and load"). :class:`ReapingExecutor` starts threads
the same way (one more while none is idle, up to ``max_workers``) and ends a thread once
it has waited ``idle_seconds`` with nothing to do.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

__all__ = ["ReapingExecutor"]

P = ParamSpec("P")
T = TypeVar("T")

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]
_names = itertools.count()


class ReapingExecutor(Executor):
    """At most ``max_workers`` threads, started on demand (one more whenever work waits
    and fewer threads are idle than works wait), each ending after ``idle_seconds`` (> 0)
    without work. Work runs in submission order as threads free up.

    ``submit`` after ``shutdown`` raises RuntimeError, as the standard pools do; work
    submitted before a shutdown still runs unless ``cancel_futures``.
    """

    def __init__(
        self, max_workers: int, *, idle_seconds: float = 30.0, thread_name_prefix: str = "pool"
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        if idle_seconds <= 0:
            raise ValueError("idle_seconds must be positive")
        self._max = max_workers
        self._idle_seconds = idle_seconds
        self._prefix = thread_name_prefix
        self._cond = threading.Condition()
        self._work: collections.deque[_Work] = collections.deque()
        self._idle = 0  # threads waiting for work, under the condition's lock
        self._threads: set[threading.Thread] = set()
        self._shutdown = False

    @property
    def thread_count(self) -> int:
        """How many threads are alive now (idle or busy)."""
        with self._cond:
            return len(self._threads)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._work.append((future, fn, args, kwargs))
            if self._idle < len(self._work) and len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._run, name=f"{self._prefix}-{next(_names)}", daemon=True
                )
                self._threads.add(thread)
                thread.start()
            self._cond.notify()
        return future

    def _next(self) -> _Work | None:
        """The next work, or None once this thread should end (idle too long, or shut
        down with nothing left)."""
        me = threading.current_thread()
        with self._cond:
            while not self._work:
                if self._shutdown:
                    self._threads.discard(me)
                    return None
                self._idle += 1
                woken = self._cond.wait(self._idle_seconds)
                self._idle -= 1
                if not woken and not self._work:
                    self._threads.discard(me)
                    return None
            return self._work.popleft()

    def _run(self) -> None:
        while (work := self._next()) is not None:
            future, fn, args, kwargs = work
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # handed to the caller, as the standard pools do
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del work, future, fn, args, kwargs

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more work is taken; ``cancel_futures`` cancels what has not started. Threads
        end once the work left is done (``wait`` waits for that)."""
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                while self._work:
                    self._work.popleft()[0].cancel()
            threads = list(self._threads)
            self._cond.notify_all()
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()
