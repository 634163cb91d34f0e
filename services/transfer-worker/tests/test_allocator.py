"""The worker's allocator settings: a freed chunk-sized buffer is reused, not faulted in
again. Each case runs in a fresh interpreter (the settings are per process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: Allocates, touches and frees 16 MiB twice; prints the page faults of the second time.
PROGRAM = """
import resource, sys
from virtbackup.transfer_worker.allocator import keep_large_buffers
if sys.argv[1] == "keep":
    assert keep_large_buffers()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
buf = bytearray(16 << 20)  # calloc: touched by the zeroing, or fresh zero pages
buf[::4096] = b"x" * len(buf[::4096])
del buf
before = faults()
buf = bytearray(16 << 20)
buf[::4096] = b"x" * len(buf[::4096])
print(faults() - before)
"""


def _second_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_buffer_is_reused_without_page_faults() -> None:
    pages = (16 << 20) // 4096
    # glibc's defaults: the buffer is unmapped when freed and faulted in again.
    assert _second_faults("default") > pages // 2
    assert _second_faults("keep") < pages // 16


#: Six threads hold 1 MiB each at once, then glibc's ``malloc_stats`` lists the arenas
#: (on standard error, one ``Arena N:`` line each).
ARENAS = """
import ctypes, ctypes.util, sys, threading
from virtbackup.transfer_worker.allocator import keep_large_buffers
if sys.argv[1] == "keep":
    assert keep_large_buffers()
barrier = threading.Barrier(6)
held = []
def work():
    buf = bytearray(1 << 20)  # malloc'd, below the mmap threshold: from an arena
    barrier.wait()
    held.append(buf)
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
sys.stderr.flush()
ctypes.CDLL(ctypes.util.find_library("c")).malloc_stats()
"""


def _arenas(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, check=True
    )
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_threads_share_two_arenas() -> None:
    # glibc's defaults: threads allocating at once get arenas of their own.
    assert _arenas("default") >= 4
    assert _arenas("keep") == 2
