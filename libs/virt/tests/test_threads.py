"""The per-connection thread pool ends its idle threads (an inventory of 1,000 servers
kept ~2,000 idle threads): bounded, in order, still working after its threads ended."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future

import pytest

from virtbackup.virt import list_domains, open_connection
from virtbackup.virt.threads import ReapingExecutor


def _wait_for(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.02)


def _named(prefix: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(prefix))


def test_threads_start_on_demand_up_to_the_bound_and_run_in_order() -> None:
    pool = ReapingExecutor(3, idle_seconds=5, thread_name_prefix="vbt-order")
    gate = threading.Event()
    done: list[int] = []
    futures = [pool.submit(lambda i=i: (gate.wait(5), done.append(i))) for i in range(10)]
    _wait_for(lambda: pool.thread_count == 3)
    time.sleep(0.1)
    assert pool.thread_count == 3 and _named("vbt-order") == 3  # never more than the bound
    gate.set()
    for future in futures:
        future.result(5)
    assert sorted(done) == list(range(10)) and done[:3] == sorted(done[:3])
    pool.shutdown()
    assert _named("vbt-order") == 0


def test_idle_threads_end_and_later_work_still_runs() -> None:
    pool = ReapingExecutor(4, idle_seconds=0.2, thread_name_prefix="vbt-idle")
    gate = threading.Event()
    busy = [pool.submit(gate.wait, 5) for _ in range(4)]
    _wait_for(lambda: pool.thread_count == 4)
    gate.set()
    assert all(f.result(5) for f in busy)
    _wait_for(lambda: pool.thread_count == 0 and _named("vbt-idle") == 0)
    # No thread left, and work submitted now must not wait for one that has ended.
    assert pool.submit(lambda: 42).result(5) == 42
    # Many short calls one after the other reuse one thread rather than start more.
    for _ in range(50):
        pool.submit(time.sleep, 0).result(5)
    assert pool.thread_count == 1
    pool.shutdown()


def test_errors_reach_the_caller_and_shutdown_cancels_what_has_not_started() -> None:
    pool = ReapingExecutor(1, idle_seconds=5, thread_name_prefix="vbt-shut")

    def boom() -> None:
        raise ValueError("from the call")

    with pytest.raises(ValueError, match="from the call"):
        pool.submit(boom).result(5)
    gate = threading.Event()
    running = pool.submit(gate.wait, 5)
    queued: Future[None] = pool.submit(time.sleep, 0)
    _wait_for(running.running)
    pool.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(CancelledError):
        queued.result(1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(time.sleep, 0)
    gate.set()
    assert running.result(5) is True
    _wait_for(lambda: pool.thread_count == 0)


def test_max_workers_and_idle_seconds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        ReapingExecutor(0)
    with pytest.raises(ValueError, match="idle_seconds"):
        ReapingExecutor(1, idle_seconds=0)


async def test_a_libvirt_connection_keeps_no_idle_threads() -> None:
    """libvirt's test driver (in this process): calls work, then the connection's threads
    end while it stays open, and the next call starts one again."""
    before = _named("libvirt-call")
    conn = await open_connection("test:///default", idle_thread_seconds=0.2)
    try:
        assert [d.name for d in await list_domains(conn)] == ["test"]
        assert _named("libvirt-call") > before
        _wait_for(lambda: _named("libvirt-call") == before)
        assert [d.name for d in await list_domains(conn)] == ["test"]
    finally:
        await conn.close()
