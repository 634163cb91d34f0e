"""Diagnostics of the gateway's event loop (off unless asked for; ``bench/load.py`` asks).

With ``VIRTBACKUP_LOOP_WATCH_MS=<ms>`` in its environment the gateway samples its own
event loop and logs, every ``REPORT_SECONDS``, one ``event loop`` record (INFO) with:

* ``lag_max_ms``: the longest time the loop came back late from a ``SAMPLE_SECONDS``
  sleep (wall clock: a callback that ran long, or the process not scheduled at all);
* ``stall_cpu_max_ms``: the most CPU time the loop's thread spent between two samples
  (its own work only: another process taking the core does not count; the noise-free
  figure of the longest pause the gateway caused itself);
* ``stalls``: how many samples were later than ``<ms>``;
* ``gc_max_ms``, ``gc_cpu_max_ms`` and ``gc_runs``: the longest run of Python's cyclic
  garbage collector (wall clock, and the thread's CPU time) and the count of runs, each
  a list of three (by generation).

``PYTHONASYNCIODEBUG=1`` as well turns on asyncio's own slow-callback log at the same
threshold (``Executing <Handle ...> took 0.0xx seconds``, WARNING on ``asyncio``); debug
mode slows the loop itself, so it is for finding the callback, not for timing.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

ENV = "VIRTBACKUP_LOOP_WATCH_MS"
#: How often the sampler wakes, in seconds.
SAMPLE_SECONDS = 0.005
#: How often a record is logged, in seconds.
REPORT_SECONDS = 10.0


def threshold_ms() -> float | None:
    """``VIRTBACKUP_LOOP_WATCH_MS`` as a positive number of milliseconds, or None (unset,
    empty, not a number, or not above 0: no watching)."""
    raw = os.environ.get(ENV, "").strip()
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value > 0 else None


class _GcTimes:
    """Durations of the cyclic collector's runs, by generation (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.started = self.started_cpu = 0.0
        self.max_s = [0.0, 0.0, 0.0]
        self.max_cpu = [0.0, 0.0, 0.0]
        self.runs = [0, 0, 0]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started, self.started_cpu = time.perf_counter(), time.thread_time()
            return
        gen = int(info.get("generation", 2))
        self.runs[gen] += 1
        self.max_s[gen] = max(self.max_s[gen], time.perf_counter() - self.started)
        self.max_cpu[gen] = max(self.max_cpu[gen], time.thread_time() - self.started_cpu)

    def take(self) -> dict[str, list[float] | list[int]]:
        out: dict[str, list[float] | list[int]] = {
            "gc_max_ms": [round(s * 1000, 2) for s in self.max_s],
            "gc_cpu_max_ms": [round(s * 1000, 2) for s in self.max_cpu],
            "gc_runs": list(self.runs),
        }
        self.max_s, self.max_cpu, self.runs = [0.0] * 3, [0.0] * 3, [0, 0, 0]
        return out


async def watch(threshold: float) -> None:
    """Sample the running loop until cancelled, logging a record every
    ``REPORT_SECONDS`` (see the module docstring); ``threshold`` in milliseconds."""
    loop = asyncio.get_running_loop()
    loop.slow_callback_duration = threshold / 1000  # logged only in asyncio debug mode
    gc_times = _GcTimes()
    gc.callbacks.append(gc_times)
    try:
        lag_max = cpu_max = 0.0
        stalls = samples = 0
        report_at = time.monotonic() + REPORT_SECONDS
        while True:
            wall0, cpu0 = time.perf_counter(), time.thread_time()
            await asyncio.sleep(SAMPLE_SECONDS)
            lag = time.perf_counter() - wall0 - SAMPLE_SECONDS
            cpu = time.thread_time() - cpu0
            samples += 1
            lag_max, cpu_max = max(lag_max, lag), max(cpu_max, cpu)
            stalls += lag * 1000 > threshold
            if time.monotonic() >= report_at:
                log.info(
                    "event loop",
                    extra={
                        "lag_max_ms": round(lag_max * 1000, 2),
                        "stall_cpu_max_ms": round(cpu_max * 1000, 2),
                        "stalls": stalls,
                        "samples": samples,
                        "threshold_ms": threshold,
                        **gc_times.take(),
                    },
                )
                lag_max = cpu_max = 0.0
                stalls = samples = 0
                report_at = time.monotonic() + REPORT_SECONDS
    finally:
        gc.callbacks.remove(gc_times)
