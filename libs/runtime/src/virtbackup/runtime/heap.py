"""A service's heap after start-up, frozen out of the cyclic garbage collector.

Python's full collections (generation 2) walk every tracked object. A service's modules,
schemas, clients and settings made at start-up are a few hundred thousand of them, all
alive for the life of the process, so every full collection walked them again: in the
gateway, 100-600 ms pauses of the event loop while 200 streams ran (``bench/load.py``);
in a transfer worker, ``gc_collect_main`` and its visitors were 0.7 of the 15.5 CPU
seconds of a 2 GiB full backup (``perf`` on the benchmark VM, 2026-12-02), each chunk's
buffers and futures triggering collections that walked the whole start-up heap.

:func:`freeze_heap` collects once and moves every object then alive to the permanent
generation (``gc.freeze``, Python >= 3.7, the technique of Instagram's "Dismissing Python
Garbage Collection"): later collections walk only what was made after. Frozen objects are
never collected, so it is called once per process, at the end of start-up; everything
made later is collected as before.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_heap() -> int:
    """``gc.collect()`` then ``gc.freeze()``; returns the number of objects now frozen
    (``gc.get_freeze_count()``), which is also logged with the milliseconds it took."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "start-up heap frozen out of the garbage collector",
        extra={"objects": frozen, "ms": round((time.perf_counter() - t0) * 1000, 1)},
    )
    return frozen
