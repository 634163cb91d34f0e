"""The benchmark's own logic, without VMs: what it counts as a step's CPU, where the
scattered guest writes land, and how the table judges the targets (``bench/``)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import measure, peer, report  # noqa: E402
from bench.run import chunk_size_arg, parse_size  # noqa: E402

MiB = 1 << 20

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_write_offsets_are_aligned_to_no_chunk_size_and_do_not_overlap() -> None:
    offsets = peer.write_offsets(4 << 30, 200 * MiB, MiB, seed=0)
    assert len(offsets) == 200
    assert offsets == sorted(offsets)
    assert all(o % peer.WRITE_ALIGN == 0 for o in offsets)
    assert all(o % MiB for o in offsets), "an offset is aligned to a 1 MiB chunk"
    assert all(b - a >= MiB for a, b in itertools.pairwise(offsets))
    assert any(o % (64 * 1024) for o in offsets), "every offset on a 64 KiB granule"
    assert offsets == peer.write_offsets(4 << 30, 200 * MiB, MiB, seed=0)
    assert offsets != peer.write_offsets(4 << 30, 200 * MiB, MiB, seed=1)


def test_a_step_counts_the_cpu_of_children_and_grandchildren_that_ended_once() -> None:
    inner = BURN.format(s=0.3)
    outer = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {inner!r}])\n" + inner
    with measure.Monitor("/nonexistent/") as monitor:
        # What two interpreters cost to start and stop, measured the same way (it grows
        # on a loaded machine): the burn is counted once each on top of it.
        window = monitor.begin()
        subprocess.run([sys.executable, "-c", "import subprocess"], check=True)
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        # Only the children that ended count here ("reaped"): other tests' services can
        # run under this same pytest process meanwhile.
        startup = window.end().cpu_by_process.get("reaped", 0.0)
        window = monitor.begin()
        subprocess.run([sys.executable, "-c", outer], check=True)
        usage = window.end()
    reaped = usage.cpu_by_process.get("reaped", 0.0)
    assert 0.55 <= reaped <= 0.6 + 2 * startup + 0.2, (usage, startup)
    assert usage.cpu["tool"] >= reaped
    assert usage.cpu["qemu"] == usage.cpu["qemu-nbd"] == 0


def test_a_step_does_not_count_cpu_spent_before_it_began() -> None:
    with measure.Monitor("/nonexistent/") as monitor:
        code = BURN.format(s=0.4) + "print('burnt', flush=True)\ntime.sleep(0.5)"
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "burnt\n"  # only sleeps from here
            window = monitor.begin()
            assert proc.wait(10) == 0
            usage = window.end()
        finally:
            proc.kill()
    # The child (``-c``) and its reaped time net out: only what it spent in the window.
    # Not ``cpu["tool"]``: other tests' services run under this pytest process too.
    child = usage.cpu_by_process.get("reaped", 0.0) + usage.cpu_by_process.get("-c", 0.0)
    assert child < 0.15, usage
    assert usage.peak_rss, "the sampled child's memory"


def test_sizes() -> None:
    assert parse_size("4M") == 4 * MiB
    assert parse_size("512KiB") == 512 * 1024
    assert chunk_size_arg("1M") == MiB
    with pytest.raises(Exception, match="power of two"):
        chunk_size_arg("3M")


def _row(tool: str, step: str, seconds: float, **extra: Any) -> dict[str, Any]:
    workers = 2 if tool == report.VB else None
    return {
        "tool": tool, "step": step, "rep": 0, "cache": "cold", "workers": workers,
        "seconds": seconds, "data_bytes": 2_000_000_000, "stored_bytes": extra.pop("stored", None),
        "identical": extra.pop("identical", None),
        "cpu": {"tool": 1.0, "qemu": 0.5, "qemu-nbd": 0.0},
        "cpu_total": 1.5, "cpu_by_process": {}, "libvirtd_cpu": 0.0,
        "worker_peak_rss": extra.pop("rss", {}), "peak_rss": {}, **extra,
    }  # fmt: skip


def test_the_table_judges_each_target() -> None:
    rows = [
        _row(report.PEER, "full", 10.0, stored=2_000_000_000),
        _row(report.PEER_Z, "full", 12.0, stored=1_100_000_000),
        _row(report.VB, "full", 5.0, stored=1_000_000_000, rss={"w[1]": 100 * MiB}),
        _row(report.PEER, "restore", 9.0, identical=True),
        _row(report.VB, "restore", 2.0, identical=True, rss={"w[1]": 400 * MiB}),
        _row(report.VB, "clone", 3.0, stored=10_000_000, new_fraction=0.01),
    ]
    info = {
        "machine": {"cpus": 2, "cpu": "x", "memory_gib": 1, "kernel": "k", "load": [0, 0, 0]},
        "versions": {}, "vm": None, "writes": None,
        "settings": {"target_workers": 2, "workers": [2], "writes": 200, "write_size": MiB,
                     "disk_cache": "none", "load_before": [0, 0, 0], "chunk_size": 4 * MiB,
                     "reps": 1, "seconds": 1.0, "write_align": 4096},
    }  # fmt: skip
    text, table = report.table(rows, info, "cold")
    verdicts = {line["step"]: line["met"] for line in table["lines"]}
    assert verdicts["full backup (2 workers)"] is False  # 2.0x < 2.5x
    assert verdicts["restore of the latest point"] is True  # 4.5x >= 3x
    assert verdicts["clone of the same template: new bytes"] is True
    assert verdicts["stored: full backup"] is True  # 1.0 GB <= 1.1 GB
    assert verdicts["transfer-worker peak RSS (any step)"] is False  # 400 MiB
    assert "NOT MET" in text
    assert "COLD run" in text
